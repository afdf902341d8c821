"""Opt-in BatchNorm calibration for starts without ImageNet weights (config.model.calibrate_bn)."""
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from seam_jax import models


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
  np.testing.assert_allclose(st['mean'], h.mean((0, 1, 2)), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(st['var'], h.var((0, 1, 2)), rtol=1e-4, atol=1e-5)
  # Every BN changed, params untouched; after calibration the deepest features are unit-scale.
  before = flax.traverse_util.flatten_dict(v['batch_stats'])
  after = flax.traverse_util.flatten_dict(cal['batch_stats'])
  assert before.keys() == after.keys()
  assert all(not np.allclose(before[p], after[p]) for p in before)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), v['params'], cal['params']))
