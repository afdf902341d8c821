"""SEAM network: ResNet38 + CAM classifier + pixel correlation module (PCM) (SEAM_SPEC section 2)."""
import flax.linen as nn
import jax
import jax.numpy as jnp

from seam_jax.common import ops
from seam_jax.models.resnet38 import BackboneNet

NEW_LAYERS = ('fc8', 'f8_3', 'f8_4', 'f9')
CLASS_HEAD = 'fc8'   # the layer whose width is the class count (K + 1): a checkpoint of another K differs only there

xavier = nn.initializers.xavier_uniform
kaiming = nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')   # torch kaiming_normal_ (fan_in, relu)
xavier_gain4 = nn.initializers.variance_scaling(16.0, 'fan_avg', 'uniform')  # xavier_uniform_(gain=4)


def conv1x1(features, name, init, dtype=jnp.float32):
  return nn.Conv(features, (1, 1), use_bias=False, kernel_init=init, dtype=dtype, name=name)


def normalized_fg_cam(cam, eps=1e-5):
  """The PCM's input, computed without gradient: relu, per-(n,c) max-normalise, background = 1 - max fg, and
  only the winning foreground class keeps its value at each pixel (ties keep all tied). NHWC."""
  cam = jax.lax.stop_gradient(jax.nn.relu(cam))
  mx = jnp.max(cam, axis=(1, 2), keepdims=True) + eps
  cdn = jax.nn.relu(cam - eps) / mx
  fg = cdn[..., 1:]
  fg_max = jnp.max(fg, axis=-1, keepdims=True)
  fg = jnp.where(fg < fg_max, 0., fg)
  return jnp.concatenate([1. - fg_max, fg], axis=-1)


def l2_norm(x, axis=-1):
  """||x||_2 over `axis` (kept) whose gradient at x = 0 is 0 like torch.norm's, not NaN like jnp.linalg.norm's
  (an all-zero feature vector occurs, e.g. in the zero padding of a training crop)."""
  sq = jnp.sum(x * x, axis=axis, keepdims=True)
  nonzero = sq > 0
  return jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, sq, 1.)), 0.)


def pcm(cam, f, eps=1e-5):
  """Pixel correlation module: cam_rv[j] = sum_i cam[i] * aff[i, j] / (sum_i aff[i, j] + eps),
  aff = relu(g_i . g_j) with g the channel-L2-normalised features `f` (NHWC, float32)."""
  n, h, w, c = f.shape
  g = f.reshape(n, h * w, c).astype(jnp.float32)
  g = g / (l2_norm(g) + eps)
  aff = jax.nn.relu(jnp.einsum('nic,njc->nij', g, g, precision=ops.HIGHEST))     # symmetric (n, hw, hw)
  colsum = jnp.sum(aff, axis=1)                                                   # (n, hw): sums over i
  cam = cam.reshape(n, h * w, -1).astype(jnp.float32)
  rv = jnp.einsum('nij,nic->njc', aff, cam, precision=ops.HIGHEST) / (colsum[..., None] + eps)
  return rv.reshape(n, h, w, -1)


class SEAM(BackboneNet):
  """NHWC normalised image -> (cam, cam_rv), each (N, H, W, num_classes) at input size (align_corners=True);
  num_classes = K + 1, background first (VOC: 21)."""
  num_classes: int = 21

  def pcm_features(self, d, xs):
    """The PCM's features f9([image at stride 8, relu f8_3(conv4), relu f8_4(conv5)]), backbone not trained by
    them."""
    f8_3 = nn.relu(conv1x1(self.ch(64), 'f8_3', kaiming, self.dtype)(jax.lax.stop_gradient(d['conv4'])))
    f8_4 = nn.relu(conv1x1(self.ch(128), 'f8_4', kaiming, self.dtype)(jax.lax.stop_gradient(d['conv5'])))
    f = jnp.concatenate([xs.astype(jnp.float32), f8_3.astype(jnp.float32), f8_4.astype(jnp.float32)], axis=-1)
    return conv1x1(self.ch(192), 'f9', xavier_gain4, self.dtype)(f)

  def cam_head(self, h):
    return conv1x1(self.num_classes, 'fc8', xavier(), self.dtype)(h).astype(jnp.float32)

  @nn.compact
  def __call__(self, x, train=False):
    d = self.features(x, train)
    cam = self.cam_head(nn.Dropout(0.5, broadcast_dims=(1, 2), deterministic=not train)(d['conv6']))
    xs = ops.resize_bilinear(x.astype(jnp.float32), cam.shape[1:3], align_corners=True)
    rv = pcm(normalized_fg_cam(cam), self.pcm_features(d, xs))
    out = x.shape[1:3]
    return ops.resize_bilinear(cam, out), ops.resize_bilinear(rv, out)


# ------------------------------------------------------------------------- exact inference on zero-padded views
def _level_sizes(n):
  """Spatial sizes reached from n by successive stride-2 steps (ceil(n / 2) each)."""
  sizes = [n]
  while sizes[-1] > 1:
    sizes.append(-(-sizes[-1] // 2))
  return sizes


def valid_mask(valid, full_hw, hw):
  """(B, h, w, 1) bool: the valid region of each view at feature size `hw`, reached from the padded input size
  `full_hw` by k stride-2 steps; `valid` (B, 2) holds the unpadded (H, W), valid size at level k = ceil(H / 2^k)."""
  masks = []
  for axis in range(2):
    k = _level_sizes(full_hw[axis]).index(hw[axis])
    n = (valid[:, axis] + 2 ** k - 1) // 2 ** k
    masks.append(jnp.arange(hw[axis])[None, :] < n[:, None])
  return (masks[0][:, :, None] & masks[1][:, None, :])[..., None]


def mask_spatial_conv_inputs(valid, full_hw):
  """Flax interceptor: zero the padding of the input of every conv with a kernel larger than 1x1 (exact inference
  on zero-padded inputs of any network: the conv then sees the zeros its own padding would give)."""
  def interceptor(next_fn, args, kwargs, context):
    mod = context.module
    if isinstance(mod, nn.Conv) and context.method_name == '__call__' and max(mod.kernel_size) > 1:
      x = args[0]
      args = (x * valid_mask(valid, full_hw, x.shape[1:3]).astype(x.dtype),) + tuple(args[1:])
    return next_fn(*args, **kwargs)
  return interceptor


class PaddedSEAM(SEAM):
  """SEAM's eval forward on zero-padded views, exact on each view's valid region (same parameters as SEAM).

  The masks reach inside the network: every spatial conv's input is zeroed outside the view's valid region at its
  resolution (the zeros the conv's own padding would give), and the CAM and the PCM features are zeroed outside it
  at stride 8 (the PCM and its max-normalisation are global over pixels); the stride-8 cam_rv is returned before
  SEAM's upsampling. x (B, Hp, Wp, 3) normalised padded views, valid (B, 2) unpadded (H, W), xs (B, Hp/8, Wp/8, 3)
  each view resized to its stride-8 size (align_corners=True), zero-padded. Returns cam_rv channels 1..K at
  stride 8, (B, Hp/8, Wp/8, K) float32, meaningful on [:ceil(H/8), :ceil(W/8)]. branch 'cam' returns the
  classifier's CAM channels 1..K instead (the plain-CAM baseline).
  """
  branch: str = 'cam_rv'

  @nn.compact
  def __call__(self, x, valid, xs):  # pylint: disable=arguments-renamed
    if self.branch not in ('cam_rv', 'cam'):
      raise ValueError(f'unknown CAM branch {self.branch!r}: expected cam_rv or cam')
    with nn.intercept_methods(mask_spatial_conv_inputs(valid, x.shape[1:3])):
      d = self.features(x)
    cam = self.cam_head(d['conv6'])
    if self.branch == 'cam':
      return cam[..., 1:]
    m8 = valid_mask(valid, x.shape[1:3], d['conv6'].shape[1:3])
    cdn = normalized_fg_cam(jnp.where(m8, cam, 0.))  # relu'd max over valid pixels only
    rv = pcm(cdn, jnp.where(m8, self.pcm_features(d, xs), 0))  # zero features: padding pixels have zero affinity
    return rv[..., 1:]
