"""Wide ResNet-38 ("model A" of Wu et al.), pre-activation, dilated to output stride 8 (SEAM_SPEC section 1).

Module and parameter names mirror the original state_dict (`b4_3/bn_branch2a`, `conv1a`, ...) so weight
conversion is a rename plus a transpose. BatchNorm always uses running statistics: the original keeps every BN in
eval mode during training, so no cross-device statistics are ever needed (`norm` swaps in another BatchNorm: the
segmentation retrain's batch-statistics BN, seam_jax.models.deeplab). Dropout (b6, b7) is active when
`train=True`. `remat` (a trainer section's switch, seam_jax.models.build) ties every block conv's backward to its
cotangent and recomputes the REMAT_BLOCKS in the backward pass (tied_vjp): less memory, the same results.
"""
import functools
from typing import Any, Callable

from flax.core import lift
import flax.linen as nn
import jax
import jax.extend
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


def cotangent_zero(ct):
  """-0.0 computed from the cotangent pytree `ct`: x + it == x bit for bit (signed zeros, infinities and NaNs of x
  included, whatever `ct` holds), but XLA cannot evaluate it before `ct` exists."""
  c = sum(l.reshape(-1)[0].astype(jnp.float32) for l in jax.tree.leaves(ct) if jnp.issubdtype(l.dtype, jnp.inexact))
  return jnp.where(jnp.isfinite(c), -(jnp.abs(c) * 0.), -0.)


def tied_vjp(f):
  """f(*args, **kwargs) whose VJP re-runs f (the operations traced once, so the same ones, dropout masks included)
  on its array arguments tied to the output cotangent (+ cotangent_zero): the same values and gradients, but the
  backward keeps only the arguments, and nothing of it can be computed before the cotangent arrives.

  Of a conv (late backward): the recomputed output is dead code, and XLA:CPU's scheduler can no longer build what
  the backward derives from forward values (conv_wgrad's kernel-gradient taps, the transposed kernels of the input
  gradients) during the forward pass and hold it until the backward: at 448 x 448 that was most of a step's memory.
  Of a block: the block's forward runs again in the backward (rematerialisation). jax.checkpoint cannot do this on
  XLA:CPU, whose pipeline drops the optimization barriers before its last CSE pass, which then merges the
  recomputation back into the forward pass; tied to the cotangent, the recomputation is a different computation."""
  def wrapped(*args, **kwargs):
    leaves, tree = jax.tree.flatten((args, kwargs))
    dyn = [i for i, l in enumerate(leaves) if isinstance(l, jax.Array)]
    static = [None if i in dyn else l for i, l in enumerate(leaves)]

    def g_traced(*xs):
      full = list(static)
      for i, x in zip(dyn, xs):
        full[i] = x
      args_, kwargs_ = jax.tree.unflatten(tree, full)
      return f(*args_, **kwargs_)
    # Traced once: the backward re-runs exactly the forward's operations (flax would draw new rngs on a new trace).
    xs = [leaves[i] for i in dyn]
    jaxpr, shapes = jax.make_jaxpr(g_traced, return_shape=True)(*xs)
    out_tree = jax.tree.structure(shapes)
    g = lambda *xs: jax.tree.unflatten(out_tree, jax.extend.core.jaxpr_as_fun(jaxpr)(*xs))

    @jax.custom_vjp
    def h(*xs):
      return g(*xs)

    def bwd(xs, ct):
      z = cotangent_zero(ct)
      return jax.vjp(g, *(x + z.astype(x.dtype) if jnp.issubdtype(x.dtype, jnp.inexact) else x for x in xs))[1](ct)
    h.defvjp(lambda *xs: (g(*xs), xs), bwd)
    return h(*xs)
  return wrapped


def conv(features, k, name, stride=1, dilation=1, dtype=jnp.float32, remat=False):
  """Bias-free conv with the original's symmetric zero padding (= dilation for 3x3); on CPU its kernel gradient
  runs as matmuls (seam_jax.models.conv_wgrad: measured ~2x faster there); with `remat` its VJP is tied_vjp's."""
  pad = dilation if k == 3 else 0
  fn = conv_wgrad.conv_general_dilated()
  fn = tied_vjp(fn or jax.lax.conv_general_dilated) if remat else fn
  return nn.Conv(features, (k, k), strides=stride, padding=((pad, pad), (pad, pad)), kernel_dilation=dilation,
                 use_bias=False, dtype=dtype, name=name, conv_general_dilated=fn)


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
  remat: bool = False               # conv(remat=...)

  @nn.compact
  def __call__(self, x):
    cv = functools.partial(conv, dtype=self.dtype, remat=self.remat)
    a = nn.relu(self.norm('bn_branch2a', self.dtype)(x))
    same = x.shape[-1] == self.out and self.stride == 1
    shortcut = x if same else cv(self.out, 1, 'conv_branch1', self.stride)(a)
    r = cv(self.mid, 3, 'conv_branch2a', self.stride, self.first_dilation)(a)
    r = nn.relu(self.norm('bn_branch2b1', self.dtype)(r))
    r = cv(self.out, 3, 'conv_branch2b1', 1, self.dilation)(r)
    return shortcut + r, a


class BottleneckBlock(nn.Module):
  """Pre-activation bottleneck block with projection shortcut and channel dropout; returns (output, side)."""
  out: int
  dilation: int = 1
  dropout: float = 0.
  dtype: Any = jnp.float32
  norm: Callable = bn
  remat: bool = False

  @nn.compact
  def __call__(self, x, train=False):
    cv = functools.partial(conv, dtype=self.dtype, remat=self.remat)
    drop = nn.Dropout(self.dropout, broadcast_dims=(1, 2), deterministic=not train)  # Dropout2d
    a = nn.relu(self.norm('bn_branch2a', self.dtype)(x))
    shortcut = cv(self.out, 1, 'conv_branch1')(a)
    r = cv(self.out // 4, 1, 'conv_branch2a')(a)
    r = drop(nn.relu(self.norm('bn_branch2b1', self.dtype)(r)))
    r = cv(self.out // 2, 3, 'conv_branch2b1', 1, self.dilation)(r)
    r = drop(nn.relu(self.norm('bn_branch2b2', self.dtype)(r)))
    r = cv(self.out, 1, 'conv_branch2b2')(r)
    return shortcut + r, a


def _tied_remat(fn):
  """flax.core.lift.checkpoint with tied_vjp in place of jax.checkpoint (variables and rngs lifted)."""
  def inner(scope_fn, repack_fn, variable_groups, rng_groups, *args):
    def rematted(variable_groups, rng_groups, *args):
      scope = scope_fn(variable_groups, rng_groups)
      return fn(scope, *args), repack_fn(scope)
    return tied_vjp(rematted)(variable_groups, rng_groups, *args)
  return lift.pack(inner, (True,), (True,), (True,), name='remat')


# Blocks recomputed in the backward pass with remat: the stride 2 and 4 ones, whose activations take the most memory
# for the least compute (benchmarks/README.md, "Memory"; in SEAM and AffinityNet b2* are frozen: nothing recomputed).
REMAT_BLOCKS = ('b2', 'b2_1', 'b2_2', 'b3', 'b3_1', 'b3_2')
REMAT_CLASSES = {c: nn.transforms.lift_transform(_tied_remat, c) for c in (BasicBlock, BottleneckBlock)}


def block_class(kind, name, remat):
  """The module class of block `name`: recomputed in the backward pass when `remat` and name in REMAT_BLOCKS."""
  cls = BasicBlock if kind == 'basic' else BottleneckBlock
  return REMAT_CLASSES[cls] if remat and name in REMAT_BLOCKS else cls


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
  remat: bool = False

  @nn.compact
  def __call__(self, x, train=False):
    w = lambda c: channels(c, self.width_div)
    x = conv(w(64), 3, 'conv1a', dtype=self.dtype)(x.astype(self.dtype))
    feats = {}
    for name, kind, _, mid, out, stride, fd, d, p in BLOCKS:
      block = block_class(kind, name, self.remat)
      if kind == 'basic':
        x, side = block(w(mid), w(out), stride, fd, d, self.dtype, self.norm, self.remat, name=name)(x)
      else:
        x, side = block(w(out), d, p, self.dtype, self.norm, self.remat, name=name)(x, train)
      if name in SIDE_OUTPUTS:
        feats[SIDE_OUTPUTS[name]] = side
    feats['conv6'] = nn.relu(self.norm('bn7', self.dtype)(x))
    return feats


class BackboneNet(nn.Module):
  """Base of the networks built on ResNet38 (SEAM, AffinityNet): the width divisor, the dtype, scaled channel
  counts of their heads and the backbone's features under the parameter name 'backbone'."""
  width_div: int = 1
  dtype: Any = jnp.float32
  remat: bool = False

  def ch(self, c):
    return channels(c, self.width_div)

  def features(self, x, train=False, norm=bn):
    return ResNet38(self.width_div, self.dtype, norm, self.remat, name='backbone')(x, train)
