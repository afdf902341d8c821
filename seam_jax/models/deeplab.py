"""DeepLab-v1 (LargeFOV-style) segmentation network on ResNet38, and the BatchNorm its original training really used
(RETRAIN_SPEC sections 1.2 and 1.3).

Head (SSC lib/net/deeplabv1.py, QUIRK Q2): conv_fov 3x3 dilation 12 (512, no bias) -> bn_fov -> relu -> conv_fov2
1x1 (512, no bias) -> bn_fov2 -> relu -> dropout 0.5 (element-wise) -> cls_conv 1x1 (K + 1, with bias) -> bilinear
upsample (align_corners=True) to the input size. Head init: Kaiming normal, fan_out, ReLU gain (std =
sqrt(2 / (C_out k^2))); the cls_conv bias keeps PyTorch's default U(+-1/sqrt(fan_in)). Names mirror the original
state dict (`backbone.b4_3.bn_branch2a`, `conv_fov`, `cls_conv`, ...).

BatchNorm in training (`bn_mode`; evaluation always uses the running statistics):
  'group'  (QUIRK Q1, the default): every BN, backbone and head, normalises each group of `bn_group` consecutive
           images of the global batch with that group's own statistics (the original: plain BatchNorm2d under
           nn.DataParallel on 2 GPUs, 5 images each) and updates the running statistics from group 0 only
           (DataParallel keeps replica 0's), PyTorch-style with momentum 0.0003 (`bn_momentum` 0.9997 in Flax's
           convention) and the unbiased variance.
  'sync'   statistics of the whole global batch: under jit over the 'data' mesh the mean over the sharded batch axis
           is a cross-device mean, i.e. synchronised BN. Running statistics as above.
  'frozen' running statistics, never updated (SEAM's BN).
Scale and offset are never trained (the original puts them in no optimizer group): seam_jax.models.param_groups
masks every BN parameter; gradients still flow through them.
"""
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from seam_jax.common import ops
from seam_jax.models import resnet38
from seam_jax.models.resnet38 import BackboneNet

NEW_LAYERS = ('conv_fov', 'bn_fov', 'conv_fov2', 'bn_fov2', 'cls_conv')
CLASS_HEAD = 'cls_conv'   # the layer whose width is the class count (K + 1)
BN_MODES = ('group', 'sync', 'frozen')
BN_MOMENTUM = 1. - 0.0003   # PyTorch momentum 0.0003 (bn_mom / TRAIN_BN_MOM) in Flax's convention

kaiming_fan_out = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')   # torch kaiming_normal_(fan_out, relu)


def torch_bias_init(fan_in):
  """PyTorch's default conv bias init U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1. / np.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class GroupBatchNorm(nn.Module):
  """Training-mode BatchNorm on the statistics of each group of `group_size` consecutive images (0 = the whole
  batch): y = (x - mean_g) / sqrt(var_g + eps) * scale + bias, var_g biased. When 'batch_stats' is mutable the
  running statistics move towards group 0's: r <- momentum r + (1 - momentum) s, with the unbiased variance
  var_0 * m / (m - 1), m = pixels per channel of the group (PyTorch). Variables as flax.linen.BatchNorm's."""
  group_size: int = 0
  momentum: float = BN_MOMENTUM
  epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones((c,), jnp.float32))
    n, g = x.shape[0], self.group_size or x.shape[0]
    if n % g:
      raise ValueError(f'batch of {n} images does not split into BatchNorm groups of {g}')
    xg = x.astype(jnp.float32).reshape((n // g, g) + x.shape[1:])
    axes = tuple(range(1, xg.ndim - 1))
    mean = jnp.mean(xg, axes, keepdims=True)
    var = jnp.mean(jnp.square(xg - mean), axes, keepdims=True)
    if self.is_mutable_collection('batch_stats') and not self.is_initializing():
      m = xg[0].size // c
      ra_mean.value = self.momentum * ra_mean.value + (1. - self.momentum) * mean[0].reshape(c)
      ra_var.value = self.momentum * ra_var.value + (1. - self.momentum) * var[0].reshape(c) * (m / max(m - 1, 1))
    y = (xg - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias
    return y.reshape(x.shape).astype(self.dtype)


def _group_bn(name, dtype, group_size, momentum):
  return GroupBatchNorm(group_size, momentum, dtype=dtype, name=name)


def batch_norm(mode, group_size, momentum=BN_MOMENTUM):
  """The `norm` factory (name, dtype) -> BatchNorm module of a training `mode` (module doc); `momentum` of the
  running statistics in Flax's convention."""
  if mode not in BN_MODES:
    raise ValueError(f'bn_mode must be one of {BN_MODES}, got {mode!r}')
  if mode == 'frozen':
    return resnet38.bn
  return functools.partial(_group_bn, group_size=int(group_size) if mode == 'group' else 0, momentum=float(momentum))


class DeepLab(BackboneNet):
  """NHWC normalised image -> (N, H, W, num_classes) float32 logits (num_classes = K + 1, background first; VOC: 21)
  at the input size (align_corners=True), or the stride-8 logits with `upsample=False`. `train` turns on the
  training BatchNorm of `bn_mode` and dropout (unless `dropout=False`: deterministic training-mode forwards for
  tests)."""
  num_classes: int = 21
  bn_mode: str = 'group'
  bn_group: int = 5
  bn_momentum: float = BN_MOMENTUM

  @nn.compact
  def __call__(self, x, train=False, upsample=True, dropout=None):
    norm = batch_norm(self.bn_mode if train else 'frozen', self.bn_group, self.bn_momentum)
    dropout = train if dropout is None else dropout
    d = self.features(x, dropout, norm)
    tied = resnet38.tied_vjp(jax.lax.conv_general_dilated) if self.remat else None   # remat: as the backbone's convs
    conv = functools.partial(nn.Conv, use_bias=False, kernel_init=kaiming_fan_out, dtype=self.dtype,
                             conv_general_dilated=tied)
    h = conv(self.ch(512), (3, 3), padding=((12, 12), (12, 12)), kernel_dilation=12, name='conv_fov')(d['conv6'])
    h = nn.relu(norm('bn_fov', self.dtype)(h))
    h = nn.relu(norm('bn_fov2', self.dtype)(conv(self.ch(512), (1, 1), name='conv_fov2')(h)))
    h = nn.Dropout(0.5, deterministic=not dropout)(h)
    logits = conv(self.num_classes, (1, 1), use_bias=True, bias_init=torch_bias_init(self.ch(512)),
                  name='cls_conv')(h).astype(jnp.float32)
    return ops.resize_bilinear(logits, x.shape[1:3], align_corners=True) if upsample else logits
