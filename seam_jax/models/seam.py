"""SEAM network: ResNet38 + CAM classifier + pixel correlation module (PCM) (SEAM_SPEC section 2)."""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from seam_jax import ops
from seam_jax.models.resnet38 import ResNet38

NEW_LAYERS = ('fc8', 'f8_3', 'f8_4', 'f9')

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


class SEAM(nn.Module):
  """NHWC normalised image -> (cam, cam_rv), each (N, H, W, 21) at input size (align_corners=True)."""
  width_div: int = 1
  num_classes: int = 21
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train=False):
    w = lambda c: max(c // self.width_div, 1)
    d = ResNet38(self.width_div, self.dtype, name='backbone')(x, train)
    h = nn.Dropout(0.5, broadcast_dims=(1, 2), deterministic=not train)(d['conv6'])
    cam = conv1x1(self.num_classes, 'fc8', xavier(), self.dtype)(h).astype(jnp.float32)
    size = cam.shape[1:3]
    cdn = normalized_fg_cam(cam)
    f8_3 = nn.relu(conv1x1(w(64), 'f8_3', kaiming, self.dtype)(jax.lax.stop_gradient(d['conv4'])))
    f8_4 = nn.relu(conv1x1(w(128), 'f8_4', kaiming, self.dtype)(jax.lax.stop_gradient(d['conv5'])))
    xs = ops.resize_bilinear(x.astype(jnp.float32), size, align_corners=True)
    f = jnp.concatenate([xs, f8_3.astype(jnp.float32), f8_4.astype(jnp.float32)], axis=-1)
    f = conv1x1(w(192), 'f9', xavier_gain4, self.dtype)(f)
    rv = pcm(cdn, f)
    out = x.shape[1:3]
    return ops.resize_bilinear(cam, out), ops.resize_bilinear(rv, out)
