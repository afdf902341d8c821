"""Flax models vs the PyTorch reference of the original (tests/torch_reference.py), same random weights."""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from seam_jax import models
from seam_jax.models import affinity
from seam_jax.models import convert
from torch_reference import models as ref_lib

FULL_SEAM_PARAMS = 105_358_208   # SEAM_SPEC section 1: 105.36 M
U = 2. ** -24       # float32 unit roundoff
BF16_U = 2. ** -8   # bfloat16 unit roundoff (8 significand bits)


def reorder_rtol(variables):
  """|difference| / max|output| of two float32 forwards of a network that differ only in summation order (PyTorch
  vs XLA convolutions).

  A conv output is a K-term sum (K = kh kw c_in) whose partial sums s_k stay within the activation scale (N(0, 1/K)
  weights); its rounding error sum_k delta_k s_k (|delta_k| <= u) is at most ~K u of the scale, and ~sqrt(K) u with
  rounding errors of random sign (Higham & Mary, SIAM J. Sci. Comput. 2019), so two orders differ by ~2 sqrt(K) u.
  BatchNorm, relu and the residual sums keep relative errors, so the convs' errors add along the network:
  2 u sum_l sqrt(K_l) of the scale (an upper bound of their independent sum), and the scale is <= max|output|.
  """
  return 2 * U * sum(np.sqrt(np.prod(k.shape[:-1])) for k in jax.tree.leaves(variables['params']) if k.ndim == 4)


def cam_rv_atol(cam, rtol):
  """Absolute tolerance of cam_rv (in normalised-CAM units, <= 1) when the CAM and the PCM features are within rtol
  of their scale: the PCM's input cdn = relu(cam) / its per-(image, class) maximum m is off by <= 2 rtol max|cam| / m
  (value and maximum), the affinities relu(g_i . g_j) of unit feature vectors by <= 2 x 2 rtol relatively, and cam_rv,
  the affinity-weighted mean of cdn, by the sum of the two. cam: (N, H, W, 21) of one side."""
  fg_max = np.maximum(np.asarray(cam)[..., 1:], 0).max(axis=(1, 2))
  return (2 * np.abs(cam).max() / fg_max[fg_max > 0].min() + 4) * rtol


def nchw(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


def converted(ref, kind, width_div, dtype='float32'):
  cfg = convert.model_config(width_div, dtype)
  return models.build(kind, cfg), convert.state_dict_to_variables(ref_lib.state_dict_numpy(ref), kind, cfg)


def image(shape, seed=0):
  return np.random.RandomState(seed).randn(*shape).astype(np.float32)


@pytest.fixture(scope='module')
def narrow_seam():
  ref = ref_lib.randomize_(ref_lib.SEAMRef(16), seed=0).eval()
  return ref, *converted(ref, 'seam', 16)


def test_seam_parity_narrow_odd_size(narrow_seam):
  ref, model, variables = narrow_seam
  x = image((2, 50, 66, 3))
  with torch.no_grad():
    cam, cam_rv = ref(nchw(x))
  jcam, jrv = model.apply(variables, jnp.asarray(x))
  assert jcam.shape == jrv.shape == (2, 50, 66, 21)
  rtol = reorder_rtol(variables)
  rv_atol = cam_rv_atol(nhwc(cam), rtol)
  assert rtol < 1e-3 and np.abs(nhwc(cam_rv)).max() > 100 * rv_atol   # the tolerances are far below the values
  np.testing.assert_allclose(jcam, nhwc(cam), rtol=0, atol=rtol * np.abs(nhwc(cam)).max())
  np.testing.assert_allclose(jrv, nhwc(cam_rv), rtol=0, atol=rv_atol)


def test_affinity_parity_narrow_odd_size():
  ref = ref_lib.randomize_(ref_lib.AffinityRef(16), seed=1).eval()
  model, variables = converted(ref, 'affinity', 16)
  x = image((2, 50, 66, 3), seed=1)
  with torch.no_grad():
    feats, aff = ref(nchw(x))
  jf = model.apply(variables, jnp.asarray(x))
  h, w = jf.shape[1:3]
  assert (h, w) == (7, 9) and affinity.effective_radius(h, w, 5) == 3   # small map: reduced radius
  ja = affinity.pair_affinity(jf, affinity.effective_radius(h, w, 5))
  feat_atol = reorder_rtol(variables) * np.abs(nhwc(feats)).max()
  np.testing.assert_allclose(jf, nhwc(feats), rtol=0, atol=feat_atol)
  # a = exp(-mean_c |f_from - f_to|) <= 1 moves by <= |change of the mean| <= 2 feat_atol, plus the pair arithmetic.
  aff_atol = 2 * feat_atol + pair_affinity_rtol(jf.shape[-1], aff.numpy())
  assert aff_atol < 1e-2 * aff.numpy().max()
  np.testing.assert_allclose(np.asarray(ja).reshape(aff.shape), aff.numpy(), rtol=0, atol=aff_atol)


@pytest.mark.parametrize('h,w', [(13, 15), (11, 20), (12, 11)])
def test_pair_affinity_and_indices_full_radius(h, w):
  f = image((2, h, w, 6), seed=h)
  expected = ref_lib.pair_affinity(nchw(f), 5).numpy()
  got = np.asarray(affinity.pair_affinity(jnp.asarray(f), 5))
  assert got.shape[1] == 34 == expected.shape[1]
  np.testing.assert_allclose(got.reshape(expected.shape), expected, rtol=pair_affinity_rtol(6, expected), atol=0)
  ind_from, ind_to = affinity.pair_indices(h, w, 5)
  ref_from, ref_to = ref_lib.pair_indices(h, w, 5)
  np.testing.assert_array_equal(ind_from, ref_from.numpy())
  np.testing.assert_array_equal(ind_to.reshape(-1), ref_to.numpy())


@pytest.fixture(scope='module')
def full_seam():
  return ref_lib.randomize_(ref_lib.SEAMRef(1), seed=2).eval()


def test_full_width_seam_parity(full_seam):
  """The real ResNet38 (width_div=1) end to end at a small input."""
  model, variables = converted(full_seam, 'seam', 1)
  x = image((1, 56, 56, 3), seed=2)
  with torch.no_grad():
    cam, cam_rv = full_seam(nchw(x))
  jcam, jrv = model.apply(variables, jnp.asarray(x))
  rtol = reorder_rtol(variables)
  rv_atol = cam_rv_atol(nhwc(cam), rtol)
  assert rtol < 1e-3 and np.abs(nhwc(cam_rv)).max() > 100 * rv_atol   # the tolerances are far below the values
  np.testing.assert_allclose(jcam, nhwc(cam), rtol=0, atol=rtol * np.abs(nhwc(cam)).max())
  np.testing.assert_allclose(jrv, nhwc(cam_rv), rtol=0, atol=rv_atol)


def test_full_param_count(full_seam):
  shapes = convert.abstract_variables('seam', convert.model_config(1))
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes['params'])) == FULL_SEAM_PARAMS
  assert sum(p.numel() for p in full_seam.parameters()) == FULL_SEAM_PARAMS


@pytest.mark.parametrize('kind', ['seam', 'affinity'])
def test_trainable_mask_and_groups_match_original(kind):
  ref = (ref_lib.SEAMRef if kind == 'seam' else ref_lib.AffinityRef)(32)
  params = convert.abstract_variables(kind, convert.model_config(32))['params']
  frozen = [m for top in ref.not_training for m in top.modules()]
  names = {name for name, _ in ref.named_parameters()}

  def expected(name):
    module = ref.get_submodule(name.rsplit('.', 1)[0])
    if isinstance(module, torch.nn.BatchNorm2d) or any(module is m for m in frozen):
      return 'frozen'
    return (2 if any(module is m for m in ref.from_scratch_layers) else 0) + (name.endswith('.bias'))

  groups = flax.traverse_util.flatten_dict(models.param_groups(params))
  mask = flax.traverse_util.flatten_dict(models.trainable_mask(params))
  got = {convert.torch_name('params', p): g for p, g in groups.items()}
  assert set(got) == names
  assert got == {n: expected(n) for n in names}
  assert all(mask[p] == (g != 'frozen') for p, g in groups.items())
  assert {g for g in got.values()} == {'frozen', 0, 2}


def test_bfloat16_compute_close_to_float32(narrow_seam):
  _, model, variables = narrow_seam
  bf16 = models.build('seam', convert.model_config(16, 'bfloat16'))
  x = jnp.asarray(image((1, 34, 42, 3), seed=3))
  init_shapes = jax.eval_shape(bf16.init, jax.random.PRNGKey(0), x)
  assert {a.dtype for a in jax.tree.leaves(init_shapes)} == {jnp.dtype('float32')}   # params stay float32
  cam, rv = model.apply(variables, x)
  cam16, rv16 = jax.jit(bf16.apply)(variables, x)
  assert cam16.dtype == rv16.dtype == jnp.float32
  assert np.abs(cam16 - cam).max() < 0.05 * np.abs(cam).max()
  # cam_rv keeps only the winning class per pixel: bf16 noise may flip a few winners, so compare on average.
  assert np.abs(rv16 - rv).mean() < 0.02 * np.abs(rv).max()


def _check_channel_dropout(inp, out, p):
  """`out` = whole (n, c) channels zeroed, the others scaled by 1/(1-p); returns the fraction dropped."""
  kept = np.any(out != 0, axis=(1, 2), keepdims=True)
  np.testing.assert_allclose(out, np.where(kept, inp / (1 - p), 0.), rtol=1e-6, atol=1e-6)
  live = np.any(inp != 0, axis=(1, 2), keepdims=True)
  return 1 - kept[live].mean()


def test_dropout_is_channelwise_in_train_mode(narrow_seam):
  _, model, variables = narrow_seam
  x = jnp.asarray(image((4, 50, 66, 3), seed=4))
  _, state = model.apply(variables, x, train=True, rngs={'dropout': jax.random.PRNGKey(0)},
                         capture_intermediates=True)
  inter = state['intermediates']
  conv6 = np.asarray(inter['backbone']['__call__'][0]['conv6'])
  dropped = [_check_channel_dropout(conv6, np.asarray(inter['Dropout_0']['__call__'][0]), 0.5)]
  for block, p in (('b6', 0.3), ('b7', 0.5)):
    b = inter['backbone'][block]
    for bn, out in zip(('bn_branch2b1', 'bn_branch2b2'), b['Dropout_0']['__call__']):
      dropped.append(_check_channel_dropout(np.maximum(np.asarray(b[bn]['__call__'][0]), 0), np.asarray(out), p))
  assert all(0.1 < d < 0.9 for d in dropped), dropped
  # Eval mode: no dropout, deterministic.
  a, b = model.apply(variables, x), model.apply(variables, x)
  np.testing.assert_array_equal(a[0], b[0])
