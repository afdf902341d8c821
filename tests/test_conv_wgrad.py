"""The matmul kernel gradient of seam_jax.models.conv_wgrad against XLA's convolution gradient.

Both sum the same products (over batch, pixels and, for the input gradient, taps) in different orders, so they agree
to float32 summation-order error: relative to the largest gradient entry, about n * 2^-24 for n summed terms in the
worst case, sqrt(n) * 2^-24 typically; n is at most batch * H * W = 2 * 20 * 24 here, so 1e-4 bounds it.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seam_jax.models import conv_wgrad

RTOL = 1e-4


def conv(x, w, strides, padding, dilation, fn):
  return fn(x, w, strides, padding, rhs_dilation=dilation, dimension_numbers=conv_wgrad.NHWC)


@pytest.mark.parametrize('k,strides,dilation,cin,cout', [
    (3, (1, 1), (1, 1), 5, 7), (3, (2, 2), (1, 1), 4, 6), (3, (1, 1), (2, 2), 6, 3), (3, (1, 1), (4, 4), 3, 4),
    (1, (1, 1), (1, 1), 8, 5), (1, (2, 2), (1, 1), 4, 9), (3, (2, 1), (1, 2), 3, 3)])
def test_gradients_match_xla(k, strides, dilation, cin, cout):
  r = np.random.default_rng(0)
  x = jnp.asarray(r.normal(size=(2, 20, 24, cin)), jnp.float32)
  w = jnp.asarray(r.normal(size=(k, k, cin, cout)), jnp.float32)
  pad = tuple((d * (k // 2), d * (k // 2)) for d in dilation)
  target = jnp.asarray(r.normal(size=jax.eval_shape(
      lambda: conv(x, w, strides, pad, dilation, jax.lax.conv_general_dilated)).shape), jnp.float32)

  def grads(fn):
    loss = lambda x, w: jnp.sum(conv(x, w, strides, pad, dilation, fn) * target)
    return jax.jit(jax.value_and_grad(loss, (0, 1)))(x, w)
  (ref_loss, ref), (loss, got) = grads(jax.lax.conv_general_dilated), grads(conv_wgrad.conv_matmul_wgrad)
  np.testing.assert_array_equal(loss, ref_loss)                     # the forward is XLA's own convolution
  for a, b in zip(got, ref):
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_allclose(a, b, atol=RTOL * float(jnp.abs(b).max()))


def test_other_cases_go_to_lax_and_backend_choice(monkeypatch):
  x, w = jnp.ones((1, 6, 6, 4)), jnp.ones((3, 3, 2, 4))
  grouped = conv_wgrad.conv_matmul_wgrad(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=conv_wgrad.NHWC,
                                         feature_group_count=2)
  np.testing.assert_array_equal(grouped, jax.lax.conv_general_dilated(
      x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=conv_wgrad.NHWC, feature_group_count=2))
  monkeypatch.setenv('SEAM_JAX_CONV_WGRAD', 'xla')
  assert conv_wgrad.conv_general_dilated() is None
  monkeypatch.setenv('SEAM_JAX_CONV_WGRAD', 'matmul')
  assert conv_wgrad.conv_general_dilated() is conv_wgrad.conv_matmul_wgrad
  monkeypatch.setenv('SEAM_JAX_CONV_WGRAD', 'auto')
  assert (conv_wgrad.conv_general_dilated() is not None) == (jax.default_backend() == 'cpu')
  monkeypatch.setenv('SEAM_JAX_CONV_WGRAD', 'fast')
  with pytest.raises(ValueError, match='SEAM_JAX_CONV_WGRAD'):
    conv_wgrad.conv_general_dilated()


def test_flax_conv_bfloat16():
  """Through flax nn.Conv in bfloat16 (parameters float32): the same gradient as lax up to bfloat16 rounding of the
  inputs to the products (2^-8 relative)."""
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 12, 12, 4)), jnp.float32)
  make = lambda fn: nn.Conv(6, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, dtype=jnp.bfloat16,
                            conv_general_dilated=fn)
  params = make(None).init(jax.random.PRNGKey(0), x)
  grad = lambda fn: jax.grad(lambda p: jnp.sum(make(fn).apply(p, x).astype(jnp.float32) ** 2))(params)
  a, b = grad(conv_wgrad.conv_matmul_wgrad), grad(None)
  ka, kb = a['params']['kernel'], b['params']['kernel']
  assert ka.dtype == jnp.float32
  np.testing.assert_allclose(ka, kb, atol=4 * 2 ** -8 * float(jnp.abs(kb).max()))
