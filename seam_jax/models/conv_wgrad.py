"""A drop-in `lax.conv_general_dilated` (flax nn.Conv's `conv_general_dilated`) whose kernel gradient is one matmul
per kernel tap instead of XLA's convolution.

XLA:CPU computes a convolution's kernel gradient as another convolution whose window spans the whole feature map
(e.g. 56 x 56) with the batch in the feature position: on ResNet38's 3x3 convs that costs ~4x the forward
convolution, where PyTorch (oneDNN) needs ~2x. As matmuls, dW[i, j] = sum over pixels of x_shifted(i, j)^T dy, it is
the forward's FLOPs at matmul speed: measured single-threaded on this project's CPU (benchmarks/README.md), a
512 -> 512 3x3 conv at 56 x 56 takes 610 -> 350 ms for forward + kernel gradient (PyTorch: 320 ms). The input
gradient stays XLA's (transposed convolution, already fast). Same result up to float32 summation order.

`conv_general_dilated()` returns this function on CPU and None (flax's default, lax) elsewhere: GPU/TPU libraries
have fast kernel gradients, and the taps would cost memory traffic there. SEAM_JAX_CONV_WGRAD=xla|matmul overrides
the choice (benchmarks).
"""
import functools
import os

import jax
import jax.numpy as jnp
from jax import lax

NHWC = ('NHWC', 'HWIO', 'NHWC')


def conv_general_dilated():
  """The conv function for flax nn.Conv on this backend (None = lax.conv_general_dilated)."""
  mode = os.environ.get('SEAM_JAX_CONV_WGRAD', 'auto')
  if mode not in ('auto', 'xla', 'matmul'):
    raise ValueError(f'SEAM_JAX_CONV_WGRAD must be auto, xla or matmul, got {mode!r}')
  if mode == 'matmul' or (mode == 'auto' and jax.default_backend() == 'cpu'):
    return conv_matmul_wgrad
  return None


def _lax_conv(x, w, strides, padding, dilation):
  return lax.conv_general_dilated(x, w, strides, padding, rhs_dilation=dilation, dimension_numbers=NHWC)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x, w, strides, padding, dilation):
  return _lax_conv(x, w, strides, padding, dilation)


def _conv_fwd(x, w, strides, padding, dilation):
  return _lax_conv(x, w, strides, padding, dilation), (x, w)


def kernel_grad(x, g, kernel_hw, strides, padding, dilation):
  """dW (kh, kw, ci, co) of an NHWC conv: for each tap (i, j), the strided window of the padded input that met
  kernel entry (i, j), contracted with the output gradient g over batch and pixels."""
  with jax.named_scope('conv_kernel_grad'):   # names its operations in profiles (benchmarks/profile.py)
    xp = jnp.pad(x, ((0, 0),) + tuple(padding) + ((0, 0),))
    (ho, wo), (sh, sw), (dh, dw) = g.shape[1:3], strides, dilation
    gm = g.reshape(-1, g.shape[-1])
    taps = [xp[:, i * dh:i * dh + (ho - 1) * sh + 1:sh, j * dw:j * dw + (wo - 1) * sw + 1:sw].reshape(-1, x.shape[-1])
            for i in range(kernel_hw[0]) for j in range(kernel_hw[1])]
    dims = (((0,), (0,)), ((), ()))
    out = jnp.stack([lax.dot_general(t, gm, dims, preferred_element_type=jnp.float32) for t in taps])
    return out.reshape(tuple(kernel_hw) + out.shape[1:])


def _conv_bwd(strides, padding, dilation, res, g):
  x, w = res
  _, vjp_x = jax.vjp(lambda x_: _lax_conv(x_, w, strides, padding, dilation), x)
  return vjp_x(g)[0], kernel_grad(x, g, w.shape[:2], strides, padding, dilation).astype(w.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv_matmul_wgrad(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                      dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
  """lax.conv_general_dilated with the kernel gradient as matmuls; the plain NHWC/HWIO case (explicit padding, no
  input dilation, one feature group, default precision) only, anything else goes to lax unchanged."""
  plain = (not isinstance(padding, str) and lhs.ndim == 4 and feature_group_count == 1 and precision is None
           and not kwargs and all(d == 1 for d in (lhs_dilation or (1, 1)))
           and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) ==
           lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC))
  if not plain:
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                    dimension_numbers, feature_group_count, precision=precision, **kwargs)
  return _conv(lhs, rhs, tuple(window_strides), tuple(tuple(p) for p in padding), tuple(rhs_dilation or (1, 1)))
