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
  """Absolute tolerance of cam_rv (in normalised-CAM units, <= 1) when every CAM channel c and the PCM features are
  within rtol of their scale (<= max|cam_c|): the PCM's input cdn = relu(cam) / its per-(image, class) maximum m_c is
  off by <= 2 rtol max|cam_c| / m_c (value and maximum; classes with m_c = 0 are 0 on both sides), the affinities
  relu(g_i . g_j) of unit feature vectors by <= 2 x 2 rtol relatively, and cam_rv, the affinity-weighted mean of cdn,
  by the sum of the two. cam: (N, H, W, 21) of one side."""
  cam = np.asarray(cam)[..., 1:]
  fg_max, scale = np.maximum(cam, 0).max(axis=(1, 2)), np.abs(cam).max(axis=(1, 2))
  return (2 * np.max(scale[fg_max > 0] / fg_max[fg_max > 0]) + 4) * rtol


def pair_affinity_rtol(channels, aff):
  """Relative difference of two float32 evaluations of a = exp(-m), m = mean_c |x_from - x_to|, on the same
  features: the C-term mean summed in another order moves m by <= 2 (C - 1) u m (a by as much, relatively), and
  two exp implementations, each within 2 ulp (<= 4 u), by <= 8 u more; m <= -log(min a)."""
  return (2 * (channels - 1) * -np.log(np.min(aff)) + 8) * U


def rms(a):
  return float(np.sqrt(np.mean(np.square(np.asarray(a, np.float64)))))


def two_class_head(variables):
  """`variables` with fc8 replaced: class 3 = (conv6 channels 0-2) - (channels 3-5), class 11 its negative, the
  others 0. The PCM keeps only the winning class per pixel, a discontinuous choice where classes tie; these two have
  disjoint positive support and never tie, so cam_rv is a continuous function of the network's values."""
  k = np.zeros(variables['params']['fc8']['kernel'].shape, np.float32)
  k[0, 0, :3, 3 + 1], k[0, 0, 3:6, 3 + 1] = 1, -1
  k[0, 0, :, 11 + 1] = -k[0, 0, :, 3 + 1]
  return {**variables, 'params': {**variables['params'], 'fc8': {'kernel': k}}}


def assert_seam_parity(variables, outputs, ref_outputs):
  """Flax (cam, cam_rv) against the PyTorch reference's (NCHW tensors), within the summation-order tolerances."""
  (jcam, jrv), (cam, cam_rv) = outputs, (nhwc(t) for t in ref_outputs)
  rtol = reorder_rtol(variables)
  rv_atol = cam_rv_atol(cam, rtol)
  assert rtol < 1e-2 and rv_atol < 0.05 * np.abs(cam_rv).max()   # the tolerances are well below the values
  np.testing.assert_allclose(jcam, cam, rtol=0, atol=rtol * np.abs(cam).max())
  np.testing.assert_allclose(jrv, cam_rv, rtol=0, atol=rv_atol)


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


@pytest.mark.slow
def test_seam_parity_narrow_odd_size(narrow_seam):
  ref, model, variables = narrow_seam
  x = image((2, 50, 66, 3))
  with torch.no_grad():
    cam, cam_rv = ref(nchw(x))
  jcam, jrv = model.apply(variables, jnp.asarray(x))
  assert jcam.shape == jrv.shape == (2, 50, 66, 21)
  assert_seam_parity(variables, (jcam, jrv), (cam, cam_rv))


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


@pytest.mark.slow
def test_full_width_seam_parity(full_seam):
  """The real ResNet38 (width_div=1) end to end at a small input."""
  model, variables = converted(full_seam, 'seam', 1)
  x = image((1, 56, 56, 3), seed=2)
  with torch.no_grad():
    cam, cam_rv = full_seam(nchw(x))
  jcam, jrv = model.apply(variables, jnp.asarray(x))
  assert_seam_parity(variables, (jcam, jrv), (cam, cam_rv))


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


@pytest.mark.slow
def test_bfloat16_compute_close_to_float32(narrow_seam):
  _, model, variables = narrow_seam
  bf16 = models.build('seam', convert.model_config(16, 'bfloat16'))
  x = jnp.asarray(image((1, 34, 42, 3), seed=3))
  init_shapes = jax.eval_shape(bf16.init, jax.random.PRNGKey(0), x)
  assert {a.dtype for a in jax.tree.leaves(init_shapes)} == {jnp.dtype('float32')}   # params stay float32
  cam, _ = model.apply(variables, x)
  cam16, rv16 = jax.jit(bf16.apply)(variables, x)
  assert cam16.dtype == rv16.dtype == jnp.float32
  # bfloat16 compute rounds every conv's input, kernel and output to 8 significand bits: three independent roundings
  # of random sign (RMS BF16_U / sqrt(3) each) move a conv output by ~BF16_U of the activation scale (RMS). The L
  # convs' errors are independent, so they add in quadrature: RMS ~ sqrt(L) BF16_U of the output's RMS (x2 margin);
  # the largest of N such errors is within sqrt(2 ln N) of their RMS (the maximum of N Gaussian samples).
  bound = 2 * np.sqrt(sum(1 for k in jax.tree.leaves(variables['params']) if k.ndim == 4)) * BF16_U
  err = np.asarray(cam16 - cam)
  assert rms(err) <= bound * rms(cam), (rms(err) / rms(cam), bound)
  assert np.abs(err).max() <= np.sqrt(2 * np.log(err.size)) * bound * rms(cam)
  assert bound < 0.1   # the tolerance is well below the values
  # cam_rv, on a two-class head (a continuous cam_rv, see two_class_head): the float32 PCM carries the error its
  # inputs arrive with (cam_rv_atol): the CAM's, measured (RMS, relative), and the PCM features', taken at the same
  # relative size (they come from a shallower part of the same network).
  two = two_class_head(variables)
  (cam, rv), (cam16, rv16) = model.apply(two, x), jax.jit(bf16.apply)(two, x)
  fg = [3 + 1, 11 + 1]
  rv_bound = cam_rv_atol(cam, rms((cam16 - cam)[..., fg]) / rms(np.asarray(cam)[..., fg]))
  assert rms(rv16 - rv) <= rv_bound, (rms(rv16 - rv), rv_bound)
  assert rv_bound < 0.5 * rms(rv)   # and below the values


def _check_channel_dropout(inp, out, p):
  """`out` = whole (n, c) channels zeroed, the others scaled by 1/(1-p); returns the fraction dropped."""
  kept = np.any(out != 0, axis=(1, 2), keepdims=True)
  np.testing.assert_allclose(out, np.where(kept, inp / (1 - p), 0.), rtol=1e-6, atol=1e-6)
  live = np.any(inp != 0, axis=(1, 2), keepdims=True)
  return 1 - kept[live].mean()


@pytest.mark.slow
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
