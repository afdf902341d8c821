"""Wide ResNet-38 ("model A" of Wu et al.), pre-activation, dilated to output stride 8 (SEAM_SPEC section 1).

Module and parameter names mirror the original state_dict (`b4_3/bn_branch2a`, `conv1a`, ...) so weight
conversion is a rename plus a transpose. BatchNorm always uses running statistics: the original keeps every BN in
eval mode during training, so no cross-device statistics are ever needed (`norm` swaps in another BatchNorm: the
segmentation retrain's batch-statistics BN, seam_jax.models.deeplab). Dropout (b6, b7) is active when
`train=True`.
"""
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from seam_jax.models import conv_wgrad

# (name, kind, in, mid, out, stride, first_dilation, dilation, dropout); channel counts of the full model.
BLOCKS = (
    ('b2', 'basic', 64, 128, 128, 2, 1, 1, 0.), ('b2_1', 'basic', 128, 128, 128, 1, 1, 1, 0.),
    ('b2_2', 'basic', 128, 128, 128, 1, 1, 1, 0.),
    ('b3', 'basic', 128, 256, 256, 2, 1, 1, 0.), ('b3_1', 'basic', 256, 256, 256, 1, 1, 1, 0.),
    ('b3_2', 'basic', 256, 256, 256, 1, 1, 1, 0.),
    ('b4', 'basic', 256, 512, 512, 2, 1, 1, 0.),
    *((f'b4_{i}', 'basic', 512, 512, 512, 1, 1, 1, 0.) for i in range(1, 6)),
    ('b5', 'basic', 512, 512, 1024, 1, 1, 2, 0.), ('b5_1', 'basic', 1024, 512, 1024, 1, 2, 2, 0.),
    ('b5_2', 'basic', 1024, 512, 1024, 1, 2, 2, 0.),
    ('b6', 'bottleneck', 1024, 0, 2048, 1, 4, 4, 0.3),
    ('b7', 'bottleneck', 2048, 0, 4096, 1, 4, 4, 0.5),
)
LAYERS = ('conv1a',) + tuple(b[0] for b in BLOCKS)  # the backbone's parameterised layers, in order
# Side outputs returned as features: the bn-relu input activation `a` of these blocks.
SIDE_OUTPUTS = {'b4': 'conv3', 'b5': 'conv4', 'b6': 'conv5'}
# Layers the original never trains (besides every BatchNorm).
FROZEN = ('conv1a', 'b2', 'b2_1', 'b2_2')


def conv(features, k, name, stride=1, dilation=1, dtype=jnp.float32):
  """Bias-free conv with the original's symmetric zero padding (= dilation for 3x3); on CPU its kernel gradient
  runs as matmuls (seam_jax.models.conv_wgrad: measured ~2x faster there)."""
  pad = dilation if k == 3 else 0
  return nn.Conv(features, (k, k), strides=stride, padding=((pad, pad), (pad, pad)), kernel_dilation=dilation,
                 use_bias=False, dtype=dtype, name=name, conv_general_dilated=conv_wgrad.conv_general_dilated())


def bn(name, dtype=jnp.float32):
  return nn.BatchNorm(use_running_average=True, momentum=0.9, epsilon=1e-5, dtype=dtype, name=name)


class BasicBlock(nn.Module):
  """Pre-activation basic block; returns (output, bn-relu side output)."""
  mid: int
  out: int
  stride: int = 1
  first_dilation: int = 1
  dilation: int = 1
  dtype: Any = jnp.float32
  norm: Callable = bn               # (name, dtype) -> BatchNorm module

  @nn.compact
  def __call__(self, x):
    a = nn.relu(self.norm('bn_branch2a', self.dtype)(x))
    same = x.shape[-1] == self.out and self.stride == 1
    shortcut = x if same else conv(self.out, 1, 'conv_branch1', self.stride, dtype=self.dtype)(a)
    r = conv(self.mid, 3, 'conv_branch2a', self.stride, self.first_dilation, self.dtype)(a)
    r = nn.relu(self.norm('bn_branch2b1', self.dtype)(r))
    r = conv(self.out, 3, 'conv_branch2b1', 1, self.dilation, self.dtype)(r)
    return shortcut + r, a


class BottleneckBlock(nn.Module):
  """Pre-activation bottleneck block with projection shortcut and channel dropout; returns (output, side)."""
  out: int
  dilation: int = 1
  dropout: float = 0.
  dtype: Any = jnp.float32
  norm: Callable = bn

  @nn.compact
  def __call__(self, x, train=False):
    drop = nn.Dropout(self.dropout, broadcast_dims=(1, 2), deterministic=not train)  # Dropout2d
    a = nn.relu(self.norm('bn_branch2a', self.dtype)(x))
    shortcut = conv(self.out, 1, 'conv_branch1', dtype=self.dtype)(a)
    r = conv(self.out // 4, 1, 'conv_branch2a', dtype=self.dtype)(a)
    r = drop(nn.relu(self.norm('bn_branch2b1', self.dtype)(r)))
    r = conv(self.out // 2, 3, 'conv_branch2b1', 1, self.dilation, self.dtype)(r)
    r = drop(nn.relu(self.norm('bn_branch2b2', self.dtype)(r)))
    r = conv(self.out, 1, 'conv_branch2b2', dtype=self.dtype)(r)
    return shortcut + r, a


def channels(c, width_div):
  """A channel count of the full model scaled down by `width_div` (at least 1)."""
  return max(c // width_div, 1)


class ResNet38(nn.Module):
  """NHWC image -> dict of features conv3 (stride 4), conv4, conv5, conv6 (stride 8).

  `width_div` divides every channel count: 1 is the real network, larger values give narrow test nets of the
  same code.
  """
  width_div: int = 1
  dtype: Any = jnp.float32
  norm: Callable = bn

  @nn.compact
  def __call__(self, x, train=False):
    w = lambda c: channels(c, self.width_div)
    x = conv(w(64), 3, 'conv1a', dtype=self.dtype)(x.astype(self.dtype))
    feats = {}
    for name, kind, _, mid, out, stride, fd, d, p in BLOCKS:
      if kind == 'basic':
        x, side = BasicBlock(w(mid), w(out), stride, fd, d, self.dtype, self.norm, name=name)(x)
      else:
        x, side = BottleneckBlock(w(out), d, p, self.dtype, self.norm, name=name)(x, train)
      if name in SIDE_OUTPUTS:
        feats[SIDE_OUTPUTS[name]] = side
    feats['conv6'] = nn.relu(self.norm('bn7', self.dtype)(x))
    return feats


class BackboneNet(nn.Module):
  """Base of the networks built on ResNet38 (SEAM, AffinityNet): the width divisor, the dtype, scaled channel
  counts of their heads and the backbone's features under the parameter name 'backbone'."""
  width_div: int = 1
  dtype: Any = jnp.float32

  def ch(self, c):
    return channels(c, self.width_div)

  def features(self, x, train=False, norm=bn):
    return ResNet38(self.width_div, self.dtype, norm, name='backbone')(x, train)
