"""Opt-in BatchNorm calibration for starts without ImageNet weights (config.model.calibrate_bn)."""
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from seam_jax import models


@pytest.mark.slow
def test_calibrated_statistics_are_the_batch_statistics_of_each_bn_input():
  cfg = ml_collections.ConfigDict(dict(width_div=16, dtype='float32'))
  model = models.build('seam', cfg)
  v = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  x = 3. * jax.random.normal(jax.random.PRNGKey(1), (4, 32, 32, 3)) + 1.
  cal = models.calibrate_batchnorm(model, v, x)
  # The first BN (b2/bn_branch2a) sees conv1a's output directly.
  k = v['params']['backbone']['conv1a']['kernel']
  h = jax.lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  st = cal['batch_stats']['backbone']['b2']['bn_branch2a']
  # Both sides do the same float32 sums, perhaps in other orders. Two orders of an n-term sum differ by at most
  # 2 gamma_(n-1) sum|terms| (gamma_n = n u / (1 - n u), u = 2^-24): each h is a K = 27-term dot product
  # (eh = 2 gamma_26 (|x| * |k|)), the statistics are means over n = N H W positions; to first order the mean moves
  # by mean(eh) + 2 gamma_n mean|h|, the variance mean((h - m)^2) by 2 mean(|h - m| (eh + em)) + 2 gamma_n var.
  gamma = lambda n: n * 2. ** -24 / (1 - n * 2. ** -24)
  n = h.shape[0] * h.shape[1] * h.shape[2]
  eh = 2 * gamma(26) * jax.lax.conv_general_dilated(jnp.abs(x), jnp.abs(k), (1, 1), ((1, 1), (1, 1)),
                                                    dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  h, eh = np.asarray(h, np.float64), np.asarray(eh, np.float64)
  m, var = h.mean((0, 1, 2)), h.var((0, 1, 2))
  em = eh.mean((0, 1, 2)) + 2 * gamma(n) * np.abs(h).mean((0, 1, 2))
  assert np.all(np.abs(st['mean'] - m) <= em)
  assert np.all(np.abs(st['var'] - var) <= 2 * (np.abs(h - m) * (eh + em)).mean((0, 1, 2)) + 2 * gamma(n) * var)
  # Every BN changed, params untouched; after calibration the deepest features are unit-scale.
  before = flax.traverse_util.flatten_dict(v['batch_stats'])
  after = flax.traverse_util.flatten_dict(cal['batch_stats'])
  assert before.keys() == after.keys()
  assert all(not np.allclose(before[p], after[p]) for p in before)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), v['params'], cal['params']))
