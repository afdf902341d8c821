"""Random walk (SEAM_SPEC section 7): sparse == dense squaring, NumPy == JAX == a torch re-implementation of the
original's dense algorithm, a hand-checked tiny graph, and the driver (resume, outputs, errors)."""
import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from configs import demo
from seam_jax import models
from seam_jax.common import bucketing, errors, files
from seam_jax.data import voc
from seam_jax.infer import random_walk as rwm
from seam_jax.models import export
from seam_jax.models.affinity import pair_affinity, search_offsets
from torch_reference import models as torch_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
U, U64 = 2. ** -24, 2. ** -53   # float32 / float64 unit roundoff

# Float tolerances. Every quantity of the walk is non-negative (affinities, A**beta, T, CAMs), so rounding errors
# are bounded relative to each element, with no cancellation, and relative errors of factors add (to first order):
# a sum of k non-negative terms in any order is within (k - 1) u of exact (Higham, Accuracy and Stability of
# Numerical Algorithms, 4.2), a product of two rounded factors adds their errors.


def walk_rtol(n, pairs, beta, logt, method):
  """Relative error of a float32 walk cams @ T^(2^logt) over n nodes, from exact inputs (worst case).

  T: a**beta (<= beta u), column sums of <= 2 pairs + 1 such terms (<= (beta + 2 pairs) u), one division (u):
  e_T = (2 beta + 2 pairs + 1) u. 'sparse': 2^logt products v @ T, each multiplying in e_T and adding k = 2 pairs + 1
  rounded products (k u); 'dense': logt squarings, each doubling the error and adding k = n rounded products, then
  cams @ T^(2^logt): both 2^logt (e_T + k u)."""
  terms = 2 * pairs + 1 if method == 'sparse' else n
  return 2 ** logt * (2 * beta + 2 * pairs + 1 + terms) * U


def scores_rtol(n, pairs, alpha, beta, logt, method):
  """Relative error of the upsampled walk scores from float32 CAMs (worst case): the float32 pooled CAMs (a 64-term
  mean: 63 u; the background 1 - max (u) to the power alpha: (alpha + 2) u), the walk ('float64': the NumPy walk,
  rounded to float32 once), and the x8 bilinear upsampling: per axis two products and a sum with exact weights
  (multiples of 1/16), <= 2 u; 4 u per axis allowed (torch may interpolate as v0 + w (v1 - v0))."""
  walk = U if method == 'float64' else walk_rtol(n, pairs, beta, logt, method)
  return (rwm.STRIDE ** 2 + alpha + 1) * U + walk + 8 * U


def pair_affinity_rtol(channels, aff):
  """Relative difference of two float32 evaluations of a = exp(-m), m = mean_c |x_from - x_to|, from the same
  features: the C-term mean in another order moves m by <= 2 (C - 1) u m, so a by as much relatively, and two exp
  implementations (each within 2 ulp = 4 u) differ by <= 8 u more; m <= -log(min a)."""
  return (2 * (channels - 1) * -np.log(np.min(aff)) + 8) * U


def random_aff(rng, dh, dw, radius):
  """Smooth-ish random affinities in (0, 1] with the layout of pair_affinity on a (dh, dw) grid."""
  feats = rng.normal(size=(1, dh, dw, 6)).cumsum(1) * 0.3
  return np.asarray(pair_affinity(jnp.asarray(feats, jnp.float32), radius))[0]


def random_cam(rng, h, w, classes):
  return {c: (rng.random((h // 6 + 1, w // 6 + 1)).repeat(6, 0).repeat(6, 1)[:h, :w]).astype(np.float32)
          for c in classes}


# --------------------------------------------------------------------------------------------------- hand case
def test_transition_and_walk_hand_case():
  # A 2 x 3 grid with radius 2: one "from" pixel (node 1) linked to nodes 2, 3, 4, 5 (offsets (0,1), (1,-1),
  # (1,0), (1,1)); node 0 has only its self-loop.
  a = np.array([0.5, 0.25, 1.0, 0.0], np.float32).reshape(4, 1, 1)
  beta = 2
  t = rwm.transition_sparse(a, 2, 3, 2, beta).toarray()
  w = a.ravel() ** beta                        # 0.25, 0.0625, 1, 0
  expected = np.eye(6)
  expected[1, 2:] = expected[2:, 1] = w
  expected /= expected.sum(0, keepdims=True)   # column j: A[:, j] / (1 + ...)
  # The weights are dyadic (a**2 exact in float32), so the column sums are exact and each entry is one correctly
  # rounded division on both sides: equal bits.
  np.testing.assert_array_equal(t, expected)
  np.testing.assert_array_equal(t[:, 1], np.array([0, 1, .25, .0625, 1, 0]) / 2.3125)
  # A column sums <= 5 entries (each rounded by <= u64 relative) with 4 float64 additions: within 5 u64 of 1 (x2).
  np.testing.assert_allclose(t.sum(0), 1., rtol=0, atol=2 * 5 * U64)
  v = np.array([[1., 0, 0, 0, 0, 2], [0, 1, 0, 0, 0, 0]])
  # Two products of the same non-negative T on each side, each <= 5 rounded products summed (5 u64) in its order.
  np.testing.assert_allclose(rwm.walk_sparse(v, rwm.transition_sparse(a, 2, 3, 2, beta), 2), v @ expected @ expected,
                             rtol=2 * 2 * 5 * U64, atol=0)
  # Node 5's link weight is 0: its mass stays put; node 0 is isolated. Exactly: their columns are e_0 and e_5.
  np.testing.assert_array_equal(rwm.walk_sparse(v, rwm.transition_sparse(a, 2, 3, 2, beta), 64)[0, [0, 5]], [1, 2])


def test_edges_match_pair_layout():
  rows, cols, pair = rwm.edges(7, 9, 3)
  p = len(search_offsets(3))
  assert len(rows) == 2 * p * (7 - 2) * (9 - 4) + 63
  assert np.all(np.diff(cols) >= 0)                          # sorted for segment_sum
  assert np.array_equal(rows[pair < 0], cols[pair < 0])      # the diagonal
  keys = set(zip(rows.tolist(), cols.tolist()))
  assert len(keys) == len(rows) and all((c, r) in keys for r, c in keys)   # no duplicates, symmetric


def test_pooled_cams_background_and_padding():
  rng = np.random.default_rng(0)
  cam = random_cam(rng, 13, 17, [2, 14])
  pooled = rwm.pooled_cams(cam, 13, 17, 6.)
  assert pooled.shape == (21, 2, 3)
  full = np.zeros((21, 16, 24), np.float32)
  full[3, :13, :17], full[15, :13, :17] = cam[2], cam[14]
  full[0, :13, :17] = (1 - np.maximum(cam[2], cam[14])) ** 6
  # The same float32 values averaged over 8 x 8 blocks in another order: 64-term sums of non-negative terms differ
  # by <= 2 * 63 u relatively (the division by 64 is exact).
  np.testing.assert_allclose(pooled, full.reshape(21, 2, 8, 3, 8).mean((2, 4)), rtol=2 * 63 * U, atol=0)


# ------------------------------------------------------------------------------ implementations agree
def test_sparse_iteration_equals_dense_t64():
  rng = np.random.default_rng(1)
  dh, dw = 9, 12
  radius = rwm.effective_radius(dh, dw, 5)
  aff = random_aff(rng, dh, dw, radius)
  cams = rng.random((21, dh, dw))
  sparse = rwm.random_walk_numpy(aff, cams, radius, 8, 6)
  dense = rwm.random_walk_numpy(aff, cams, radius, 8, 6, dense=True)
  # float64, the same T: 64 sparse products (<= 2P + 1 rounded products summed) vs 6 squarings of n-term products
  # (each doubling the error) then one more, all non-negative: within 64 (2P + 1 + n) u64 relatively.
  rtol = 2 ** 6 * (2 * len(search_offsets(radius)) + 1 + dh * dw) * U64
  np.testing.assert_allclose(sparse, dense, rtol=rtol, atol=0)
  assert not np.allclose(sparse, cams, rtol=1e-2)     # the walk did something (moved values by over 1%)


def torch_original_walk(aff, cam, h, w, radius, alpha=6., beta=8, logt=6):
  """The original's infer_aff algorithm in torch, written from the spec: dense A from the pairs, A**beta, column
  normalisation, logt squarings, 8x8 average-pooled CAMs @ T, bilinear (align_corners=False) upsample, argmax."""
  hp, wp = -(-h // 8) * 8, -(-w // 8) * 8
  dh, dw = hp // 8, wp // 8
  i_from, i_to = torch_reference.pair_indices(dh, dw, radius)
  i_from = i_from.repeat(len(i_to) // len(i_from))
  a = torch.from_numpy(np.array(aff)).reshape(-1)
  n = dh * dw
  mat = torch.eye(n)
  mat[i_from, i_to] = a
  mat[i_to, i_from] = a
  mat = mat ** beta
  trans = mat / mat.sum(0, keepdim=True)
  for _ in range(logt):
    trans = trans @ trans
  full = torch.zeros(21, h, w)
  for c, v in cam.items():
    full[c + 1] = torch.from_numpy(v)
  full[0] = (1 - full[1:].amax(0)) ** alpha
  full = F.pad(full, (0, wp - w, 0, hp - h))
  rw = F.avg_pool2d(full[None], 8, 8).reshape(21, -1) @ trans
  up = F.interpolate(rw.reshape(1, 21, dh, dw), (hp, wp), mode='bilinear', align_corners=False)[0]
  return up[:, :h, :w].numpy()


def agree_except_near_ties(label, ref_scores, rtol):
  """label == argmax of ref_scores wherever no score error within rtol (relative) can swap the top two."""
  top2 = np.sort(ref_scores, axis=0)[-2:]
  clear = (top2[1] - top2[0]) > rtol * (top2[1] + top2[0])
  assert clear.mean() > 0.9
  np.testing.assert_array_equal(label[clear], np.argmax(ref_scores, 0)[clear])


def test_present_channels_only_walk_and_upsample_bit_exactly():
  """Skipping the all-zero channels changes nothing: each channel's products and taps are the same operations in
  the same order, so the results are bit-identical to walking and upsampling all 21."""
  rng = np.random.default_rng(2)
  h, w = 70, 90
  dh, dw = bucketing.grid_size(h, w)
  radius = rwm.walk_radius(h, w, 5)
  aff = random_aff(rng, dh, dw, radius)
  cams = np.zeros((21, dh, dw))
  cams[[0, 4, 17]] = rng.random((3, dh, dw))
  cams[17, :, : dw // 2] = 0                       # a class on half the image only
  np.testing.assert_array_equal(rwm.present_channels(cams), [0, 4, 17])
  walked = rwm.random_walk_numpy(aff, cams, radius, 8, 6)
  trans = rwm.transition_sparse(aff, dh, dw, radius, 8)
  full = rwm.walk_sparse(cams.reshape(21, -1), trans, 64).reshape(21, dh, dw)
  np.testing.assert_array_equal(walked, full)
  label, scores = rwm.labels_numpy(walked, (h, w))
  up = rwm.upsample_numpy(np.asarray(full, np.float32), (dh * 8, dw * 8))[:, :h, :w]
  np.testing.assert_array_equal(scores, up)
  np.testing.assert_array_equal(label, np.argmax(up, axis=0))
  assert set(np.unique(label)) == {0, 4, 17}


@pytest.mark.parametrize('h, w', [(100, 90), (45, 70)])
def test_numpy_and_jax_match_torch_original(h, w):
  rng = np.random.default_rng(h)
  dh, dw = bucketing.grid_size(h, w)
  radius = rwm.walk_radius(h, w, 5)
  assert radius == (5 if (h, w) == (100, 90) else 2)
  aff = random_aff(rng, dh, dw, radius)
  cam = random_cam(rng, h, w, [0, 7, 11])
  ref = torch_original_walk(aff, cam, h, w, radius)
  cams = rwm.pooled_cams(cam, h, w, 6.)
  label, scores = rwm.labels_numpy(rwm.random_walk_numpy(aff, cams, radius, 8, 6), (h, w))
  # Same float32 affinities and CAMs on every side; the torch original walks densely in float32. Scores of absent
  # classes are exact zeros everywhere, so relative tolerances suffice (atol 0).
  bound = functools.partial(scores_rtol, dh * dw, len(search_offsets(radius)), 6., 8, 6)
  rtol = bound('float64') + bound('dense')
  np.testing.assert_allclose(scores, ref, rtol=rtol, atol=0)
  agree_except_near_ties(label, ref, rtol)
  for method in ('sparse', 'dense'):
    rw = jax.jit(lambda a, c, m=method: rwm.walk_jax(a, c, radius, 8, 6, m))(aff[None], cams[None])
    labels_j, scores_j = rwm.labels_jax(rw)
    rtol = bound(method) + bound('dense')
    np.testing.assert_allclose(np.moveaxis(np.asarray(scores_j[0, :h, :w]), -1, 0), ref, rtol=rtol, atol=0)
    agree_except_near_ties(np.asarray(labels_j[0, :h, :w]), ref, rtol)


def test_walk_jax_batches_images_independently():
  rng = np.random.default_rng(5)
  aff = np.stack([random_aff(rng, 6, 7, 2) for _ in range(2)])
  cams = rng.random((2, 21, 6, 7)).astype(np.float32)
  both = rwm.walk_jax(aff, cams, 2, 8, 6)
  rtol = walk_rtol(6 * 7, len(search_offsets(2)), 8, 6, 'sparse')   # float32 vs float64 from the same inputs
  for i in range(2):
    np.testing.assert_allclose(both[i], rwm.random_walk_numpy(aff[i], cams[i], 2, 8, 6), rtol=rtol, atol=0)


# ----------------------------------------------------------------------------------------------------- driver
def random_variables(model, seed=0):
  """Random weights of the right shapes without model.init (whose XLA compile takes about a minute on CPU):
  kernels N(0, 1/fan_in), BatchNorm at identity."""
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = path[-1].key
    if name == 'kernel':
      return (rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1]))).astype(np.float32)
    return np.full(s.shape, 1. if name in ('scale', 'var') else 0., np.float32)
  return jax.tree_util.tree_map_with_path(fill, shapes)


IMAGE_SIZES = {'a': (40, 52), 'b': (40, 49), 'c': (33, 60)}   # a, b share the padded size (40, 56)


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp('rw')
  rng = np.random.default_rng(0)
  cfg = demo.get_config()
  cfg.workdir = str(root / 'work')
  cfg.data.voc_root = str(root / 'VOC2012')
  cfg.data.list_dir = str(root / 'lists')
  cfg.model.width_div = 32
  cfg.infer.cam_dir = str(root / 'cam')
  cfg.rw.out_dir = str(root / 'rw')
  cfg.rw.list = 'train'
  cfg.rw.workers = 1
  cfg.rw.batch_size = 2
  voc.write_list(os.path.join(cfg.data.list_dir, 'train.txt'), list(IMAGE_SIZES))
  for i, (h, w) in IMAGE_SIZES.items():
    os.makedirs(os.path.join(cfg.data.voc_root, 'JPEGImages'), exist_ok=True)
    img = (rng.random((h // 4 + 1, w // 4 + 1, 3)) * 255).repeat(4, 0).repeat(4, 1)[:h, :w].astype(np.uint8)
    Image.fromarray(img).save(os.path.join(cfg.data.voc_root, 'JPEGImages', i + '.jpg'))
    files.save_npy_dict(os.path.join(cfg.infer.cam_dir, i + '.npy'), random_cam(rng, h, w, [3, 8]))
  model = models.build('affinity', cfg.model)
  variables = random_variables(model)
  export.save_export(os.path.join(cfg.workdir, 'affinity', 'export'), variables, 'affinity', cfg.model)
  return cfg, model, variables


def read_png(path):
  return np.asarray(Image.open(path))


@pytest.fixture(scope='module')
def direct(setup):
  """Per image id: the torch original's walk scores from pair affinities computed directly (AffinityNet on the padded
  image), scores_rtol(method) of this image, and the error a difference of those affinities may add."""
  cfg, model, variables = setup
  apply = jax.jit(model.apply)
  out = {}
  for i, (h, w) in IMAGE_SIZES.items():
    img = voc.normalize(np.asarray(Image.open(os.path.join(cfg.data.voc_root, 'JPEGImages', i + '.jpg'))))
    feats = apply(variables, rwm.pad_image(img, bucketing.padded_size(h, w))[None])
    radius = rwm.walk_radius(h, w, cfg.aff.radius)
    aff = np.asarray(pair_affinity(feats, radius))[0]
    cam = files.load_npy_dict(os.path.join(cfg.infer.cam_dir, i + '.npy'))
    ref = torch_original_walk(aff, cam, h, w, radius, cfg.rw.alpha, cfg.rw.beta, cfg.rw.logt)
    # The driver runs the same convolutions (same shapes) on the same image, so its features are these bits; only
    # the pair arithmetic, fused into its program, may add in another order (pair_affinity_rtol). That error of a
    # reaches T twice beta-fold (a**beta and its column sum) and each of the 2^logt products multiplies it in.
    grid = bucketing.grid_size(h, w)
    aff_term = 2 ** cfg.rw.logt * 2 * cfg.rw.beta * pair_affinity_rtol(feats.shape[-1], aff)
    bound = functools.partial(scores_rtol, grid[0] * grid[1], len(search_offsets(radius)), cfg.rw.alpha,
                              cfg.rw.beta, cfg.rw.logt)
    out[i] = ref, bound, aff_term
  return out


@pytest.mark.slow
def test_driver_matches_direct_computation_and_resumes(setup, direct):
  cfg, _, _ = setup
  cfg = cfg.copy_and_resolve_references()
  cfg.rw.save_scores = True
  rwm.run(cfg)
  for i, (h, w) in IMAGE_SIZES.items():
    ref, bound, aff_term = direct[i]
    rtol = bound('float64') + bound('dense') + aff_term   # the NumPy backend against the torch original
    out = read_png(os.path.join(cfg.rw.out_dir, i + '.png'))
    assert out.shape == (h, w)
    agree_except_near_ties(out, ref, rtol)
    scores = files.load_npy_dict(os.path.join(cfg.rw.out_dir, i + '.npy'))
    assert sorted(scores) == [0, 4, 9]
    np.testing.assert_allclose(scores[9], ref[9], rtol=rtol, atol=0)
  # Resume: nothing is redone (mtimes unchanged) unless forced.
  png = os.path.join(cfg.rw.out_dir, 'a.png')
  os.utime(png, (1, 1))
  rwm.run(cfg)
  assert os.path.getmtime(png) == 1
  cfg.rw.list = os.path.join(cfg.data.list_dir, 'a.txt')   # one image: one compilation
  voc.write_list(cfg.rw.list, ['a'])
  rwm.run(cfg, force=True)
  assert os.path.getmtime(png) != 1


def test_scores_switched_on_later_are_written(setup, tmp_path):
  """The resume check covers every output: labels walked without scores, then rw.save_scores on -> the walk runs
  again for the images without a score file (only those), and writes it."""
  cfg, _, _ = setup
  c = cfg.copy_and_resolve_references()
  c.rw.out_dir = str(tmp_path / 'rw')
  c.rw.list = os.path.join(c.data.list_dir, 'bc.txt')   # b, c: the padded sizes (40, 56) and (40, 64)
  voc.write_list(c.rw.list, ['b', 'c'])
  assert rwm.run(c)['files_written'] == 2
  assert not any(f.endswith('.npy') for f in os.listdir(c.rw.out_dir))
  c.rw.save_scores = True
  files.save_npy_dict(os.path.join(c.rw.out_dir, 'c.npy'), {0: np.ones(IMAGE_SIZES['c'], np.float32)})
  stats = rwm.run(c)
  assert (stats['images'], stats['skipped'], stats['files_written']) == (1, 1, 2)
  scores = files.load_npy_dict(os.path.join(c.rw.out_dir, 'b.npy'))
  assert sorted(scores) == [0, 4, 9] and scores[0].shape == IMAGE_SIZES['b']
  assert rwm.run(c)['images'] == 0


@pytest.mark.slow
def test_driver_jax_backend_matches_numpy(setup, direct, tmp_path):
  cfg, _, _ = setup
  outs = {}
  for backend in ('numpy', 'jax'):
    c = cfg.copy_and_resolve_references()
    c.rw.backend = backend
    c.rw.workers = 2 if backend == 'numpy' else 1      # the process-pool path
    c.rw.out_dir = str(tmp_path / backend)
    c.rw.save_scores = backend == 'numpy'
    rwm.run(c)
    outs[backend] = {i: read_png(os.path.join(c.rw.out_dir, i + '.png')) for i in IMAGE_SIZES}
  for i, (h, w) in IMAGE_SIZES.items():
    scores = np.zeros((voc.NUM_CLASSES, h, w), np.float32)   # absent classes score 0 in both backends
    for k, v in files.load_npy_dict(os.path.join(tmp_path, 'numpy', i + '.npy')).items():
      scores[k] = v
    np.testing.assert_array_equal(outs['numpy'][i], np.argmax(scores, 0))
    # The float32 JAX walk against the float64 NumPy one: labels agree except where their errors could swap a tie.
    _, bound, aff_term = direct[i]
    agree_except_near_ties(outs['jax'][i], scores, bound(cfg.rw.jax_method) + bound('float64') + aff_term)
  assert not os.path.exists(os.path.join(tmp_path, 'jax', 'a.npy'))   # scores only when asked


def test_missing_cam_is_a_data_error(setup, tmp_path):
  cfg, _, _ = setup
  c = cfg.copy_and_resolve_references()
  c.rw.out_dir = str(tmp_path / 'out')
  c.rw.cam_dir = str(tmp_path / 'nocams')
  with pytest.raises(errors.DataError, match='nocams'):
    rwm.run(c)


def test_cli_reports_missing_checkpoint(setup, tmp_path):
  cfg, _, _ = setup
  args = [f'--config.{k}={v}' for k, v in (('data.list_dir', cfg.data.list_dir), ('infer.cam_dir', cfg.infer.cam_dir),
                                           ('rw.list', 'train'), ('rw.out_dir', tmp_path / 'o'),
                                           ('rw.checkpoint', tmp_path / 'none'))]
  r = subprocess.run([sys.executable, 'random_walk.py', '--config=configs/demo.py', *args], cwd=ROOT,
                     capture_output=True, text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert r.returncode != 0
  assert 'checkpoint not found' in r.stderr and str(tmp_path / 'none') in r.stderr
  assert 'Traceback' not in r.stderr
