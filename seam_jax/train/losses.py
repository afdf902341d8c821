"""SEAM training losses (SEAM_SPEC section 3), pure functions on NHWC arrays.

Channel 0 is the background, channels 1..K the foreground classes (K = 20 for VOC; any K: nothing here depends on
it). `label` is (N, K + 1) with label[:, 0] = 1.
The equivariant transform is a parameter (seam_jax.train.equivariance): any object with `image(x)` (applied to the
input batch) and `cam(x)` (applied to a CAM batch of the original view), so rescale, flip or rotation constraints share
the same loss.
"""
import jax
import jax.numpy as jnp

from seam_jax.common import ops


# -------------------------------------------------------------------------------------------------------- losses
def multilabel_soft_margin(logits, labels):
  """torch's multilabel_soft_margin_loss, (N, C) inputs:
  mean_n [ -1/C sum_c ( y log sigmoid(x) + (1 - y) log sigmoid(-x) ) ]."""
  per = labels * jax.nn.log_sigmoid(logits) + (1. - labels) * jax.nn.log_sigmoid(-logits)
  return -jnp.mean(per)


def adaptive_min_pooling_loss(x):
  """Adaptive min pooling (AMP) of foreground maps x (N, h, w, C):
  m = max_c x (per pixel); y = the k = h*w // 4 smallest m per image; loss = sum relu(y) / (k * N)."""
  n, h, w, _ = x.shape
  k = h * w // 4
  m = jnp.max(x, axis=-1).reshape(n, h * w)
  smallest = -jax.lax.top_k(-m, k)[0]
  return jnp.sum(jax.nn.relu(smallest)) / (k * n)


def er_loss(cam1, cam2):
  """Equivariant regularisation: mean over (N, h, w, c >= 1) of |cam1 - cam2| (background channel excluded)."""
  return jnp.mean(jnp.abs(cam1[..., 1:] - cam2[..., 1:]))


def with_background(cam):
  """Replace channel 0 by 1 - max_{c >= 1} cam_c."""
  return jnp.concatenate([1. - jnp.max(cam[..., 1:], axis=-1, keepdims=True), cam[..., 1:]], axis=-1)


def max_onehot(cam):
  """Keep channel 0; over channels >= 1 zero every value not equal to the per-pixel max over channels >= 1
  (ties keep all tied values)."""
  fg = cam[..., 1:]
  fg = jnp.where(fg != jnp.max(fg, axis=-1, keepdims=True), 0., fg)
  return jnp.concatenate([cam[..., :1], fg], axis=-1)


def topk_mean(x, ratio):
  """Mean of the k = int(C * h * w * ratio) largest values of each flattened image of x (N, h, w, C), averaged
  over the batch (mean over (N, k))."""
  n, h, w, c = x.shape
  k = int(c * h * w * ratio)
  return jnp.mean(jax.lax.top_k(x.reshape(n, -1), k)[0])


def ecr_loss(cam1, cam2, rv1, rv2, ratio):
  """Equivariant cross regularisation:
  topk_mean(|onehot(sg(cam2)) - rv1|) + topk_mean(|onehot(sg(cam1)) - rv2|), with cam1/cam2 already carrying
  the background channel 1 - max fg and sg = stop_gradient."""
  e1 = jnp.abs(max_onehot(jax.lax.stop_gradient(cam2)) - rv1)
  e2 = jnp.abs(max_onehot(jax.lax.stop_gradient(cam1)) - rv2)
  return topk_mean(e1, ratio) + topk_mean(e2, ratio)


def seam_loss(outputs1, outputs2, label, equivariance, topk_ratio=0.2):
  """The SEAM objective for one batch; returns (loss, metrics).

  outputs1 = (cam1, rv1) of the net on the batch, outputs2 = (cam2, rv2) on equivariance.image(batch), each
  (N, H, W, K + 1); label (N, K + 1) with the background column 1. With L = label broadcast over pixels:
    cls = (MLSM(mean_hw cam1, L) + MLSM(mean_hw cam2, L)) / 2     (foreground channels only)
    amp = (AMP(rv1 * L) + AMP(rv2 * L)) / 2                       (foreground channels only)
    cam1, rv1 <- equivariance.cam(maxnorm(.)) * L;  cam2, rv2 <- maxnorm(.) * L
    ER = mean |cam1 - cam2| (fg);  then channel 0 of cam1, cam2 <- 1 - max fg
    ECR = topk_mean(|onehot(sg cam2) - rv1|) + topk_mean(|onehot(sg cam1) - rv2|)
    loss = cls + amp + ER + ECR
  Logged like the original: 'cls' holds cls + amp; 'mlsm' and 'amp' are also reported separately.
  """
  cam1, rv1 = outputs1
  cam2, rv2 = outputs2
  lab = label[:, None, None, :].astype(jnp.float32)
  mlsm = (multilabel_soft_margin(jnp.mean(cam1, axis=(1, 2))[:, 1:], label[:, 1:]) +
          multilabel_soft_margin(jnp.mean(cam2, axis=(1, 2))[:, 1:], label[:, 1:])) / 2
  amp = (adaptive_min_pooling_loss((rv1 * lab)[..., 1:]) + adaptive_min_pooling_loss((rv2 * lab)[..., 1:])) / 2
  cam1 = equivariance.cam(ops.max_norm(cam1)) * lab
  rv1 = equivariance.cam(ops.max_norm(rv1)) * lab
  cam2 = ops.max_norm(cam2) * lab
  rv2 = ops.max_norm(rv2) * lab
  er = er_loss(cam1, cam2)
  ecr = ecr_loss(with_background(cam1), with_background(cam2), rv1, rv2, topk_ratio)
  loss = mlsm + amp + er + ecr
  return loss, {'loss': loss, 'cls': mlsm + amp, 'mlsm': mlsm, 'amp': amp, 'er': er, 'ecr': ecr}


def cam_loss(outputs, label):
  """The plain-CAM baseline SEAM is compared with: the classification loss on the CAM branch alone, no ER, ECR or
  PCM terms (cam_rv is unused). outputs = (cam, rv) of the net on the batch, (N, H, W, K + 1); label (N, K + 1):
    loss = MLSM(mean_hw cam, L)   (foreground channels only)
  Returns (loss, metrics) like seam_loss ('cls' = 'mlsm' = loss)."""
  cam, _ = outputs
  mlsm = multilabel_soft_margin(jnp.mean(cam, axis=(1, 2))[:, 1:], label[:, 1:])
  return mlsm, {'loss': mlsm, 'cls': mlsm, 'mlsm': mlsm}
