"""CAM inference: exact bucketed/batched inference vs an un-batched reference of the spec's recipe, compile count,
scheduling, resume, output format and bad input."""
import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
import torch

from configs import demo, sections
from seam_jax.common import bucketing, errors, files
from seam_jax.common import ops
from seam_jax.data import input_pipeline, voc
from seam_jax.infer import cam_inference, score_dicts
from seam_jax.models import build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCALES = (1.0, 0.5)
BUCKET = 32
# id -> (H, W, label classes); A, B share padded view shapes, C adds two more. Only classes 3 and 11 have a
# non-zero CAM (see random_variables): class 19 of C exercises a labelled class with an all-zero CAM.
IMAGES = {'2007_00000A': (40, 56, (3, 11)), '2007_00000B': (44, 60, (3,)), '2007_00000C': (70, 40, (11, 19))}
U = 2. ** -24   # float32 unit roundoff


def reorder_rtol(variables):
  """Difference, relative to the activation scale, of two float32 forwards of the network that differ only in
  summation order (padded vs unpadded convolutions, other batch sizes). Two orders of a conv's K-term sum
  (K = kh kw c_in; partial sums within the scale) differ by ~2 sqrt(K) u of the scale with rounding errors of random
  sign (Higham & Mary 2019; K u at worst); BatchNorm, relu and the residual sums keep relative errors, so the convs'
  errors add along the network: 2 u sum_l sqrt(K_l)."""
  return 2 * U * sum(np.sqrt(np.prod(k.shape[:-1])) for k in jax.tree.leaves(variables['params']) if k.ndim == 4)


def head_tolerances(variables, cam, conv6):
  """(CAM, cam_rv) absolute tolerances of one view between two summation orders, from that view's cam (1, H, W, 21)
  and conv6 features. Class c's CAM sums conv6 channels k (each within rtol of its scale max|conv6_k|) with fc8
  weights w_kc (+-1 here): off by <= e_c = rtol sum_k |w_kc| max|conv6_k|. The PCM's input cdn = relu(cam) / its
  class maximum m_c is then off by <= 2 e_c / m_c (value and maximum; classes with m_c = 0 are 0 on both sides), its
  affinities relu(g_i . g_j) of unit feature vectors by <= 2 x 2 rtol relatively, and cam_rv (in cdn units), the
  affinity-weighted mean of cdn, by the sum of the two."""
  rtol = reorder_rtol(variables)
  e = rtol * np.abs(np.asarray(conv6)).max(axis=(0, 1, 2)) @ np.abs(variables['params']['fc8']['kernel'][0, 0])
  fg_max = np.maximum(np.asarray(cam), 0).max(axis=(0, 1, 2))
  live = fg_max[1:] > 0
  return e.max(), np.max(2 * e[1:][live] / fg_max[1:][live]) + 4 * rtol


def random_variables(model, seed=0):
  """Random weights without compiling an init: He-normal kernels and non-trivial BatchNorm statistics (so the
  padding of a view would leak into its outputs if the masking were wrong).

  fc8 is special: class 3 = (sum of conv6 channels 0-2) - (channels 3-5), class 11 = the negative, every other
  class 0. The PCM keeps only the winning class per pixel, a discontinuous choice: where two classes tie (e.g.
  both peak at the same pixel) a 1-ulp difference between convs of different shapes flips the winner. Classes with
  disjoint positive support never tie, so every output is a continuous function of the network's values.
  """
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  rng = np.random.default_rng(seed)

  def draw(path, s):
    name = path[-1].key
    if name == 'kernel' and path[1].key == 'fc8':
      k = np.zeros(s.shape, np.float32)
      k[0, 0, :3, 3 + 1], k[0, 0, 3:6, 3 + 1] = 1, -1
      k[0, 0, :, 11 + 1] = -k[0, 0, :, 3 + 1]
      return k
    if name == 'kernel':
      return rng.normal(0, np.sqrt(2 / np.prod(s.shape[:-1])), s.shape).astype(np.float32)
    if name in ('scale', 'var'):
      return rng.uniform(0.5, 1.5, s.shape).astype(np.float32)
    return rng.normal(0, 0.2, s.shape).astype(np.float32)  # bias, mean
  return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope='module')
def net():
  """(model config, SEAM, its random variables, jitted forward x -> ((cam, cam_rv), intermediates with the backbone's
  features))."""
  mc = sections.model(width_div=32)
  model = build('seam', mc)
  forward = jax.jit(functools.partial(model.apply, capture_intermediates=lambda m, _: m.name == 'backbone',
                                      mutable=['intermediates']))
  return mc, model, random_variables(model), forward


def write_voc(root):
  rng = np.random.default_rng(0)
  labels = {}
  for i, (h, w, cls) in IMAGES.items():
    yy, xx = np.mgrid[:h, :w]
    img = np.stack([128 + 100 * np.sin(xx / (5 + c) + yy / (7 + 2 * c)) for c in range(3)], -1)
    img = np.clip(img + rng.normal(0, 20, img.shape), 0, 255).astype(np.uint8)
    os.makedirs(os.path.join(root, 'JPEGImages'), exist_ok=True)
    Image.fromarray(img).save(os.path.join(root, 'JPEGImages', i + '.jpg'), quality=95)
    labels[i] = np.isin(np.arange(20), cls).astype(np.float32)
  return labels


def make_config(tmp, ids, labels):
  c = demo.get_config()
  c.data.voc_root = os.path.join(tmp, 'VOC2012')
  c.data.list_dir = os.path.join(tmp, 'lists')
  c.data.cls_labels = os.path.join(tmp, 'lists', 'cls_labels.npy')
  voc.write_list(os.path.join(c.data.list_dir, 'train.txt'), ids)
  files.save_npy_dict(c.data.cls_labels, labels)
  c.model.width_div = 32
  c.infer.list, c.infer.scales, c.infer.bucket, c.infer.batch_size = 'train', SCALES, BUCKET, 8
  c.infer.cam_dir, c.infer.label_dir = os.path.join(tmp, 'cam'), os.path.join(tmp, 'cam_png')
  c.infer.overlay_dir = os.path.join(tmp, 'overlay')
  c.infer.threads = 2
  return c


@pytest.fixture(scope='module')
def run(net, tmp_path_factory):
  """One inference over the three images with a fresh engine: (config, engine, stats, XLA compilations seen)."""
  mc, _, variables, _ = net
  tmp = str(tmp_path_factory.mktemp('infer'))
  labels = write_voc(os.path.join(tmp, 'VOC2012'))
  config = make_config(tmp, list(IMAGES), labels)
  compiles = []

  def listener(event, duration, **kwargs):
    del duration, kwargs
    if event == '/jax/core/compile/backend_compile_duration':
      compiles.append(event)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    engine = cam_inference.CamEngine(variables, mc, config.infer.batch_size)
    stats = cam_inference.run_inference(config, engine=engine)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  return config, engine, stats, len(compiles)


def seam_outputs(forward, variables, view):
  """SEAM on an unpadded normalised view (H, W, 3): cam and cam_rv channels 1..20 at (H, W), and their tolerances
  against another summation order (head_tolerances)."""
  (cam, rv), state = forward(variables, jnp.asarray(view[None]))
  cam_atol, rv_atol = head_tolerances(variables, cam, state['intermediates']['backbone']['__call__'][0]['conv6'])
  return np.asarray(cam[0, ..., 1:]), np.asarray(rv[0, ..., 1:]), cam_atol, rv_atol


def upsampled(row, hw):
  """A stride-8 map (h, w, C) upsampled to the view size (H, W) as SEAM does (align_corners=True)."""
  return np.asarray(ops.resize_bilinear(jnp.asarray(row[None]), hw, align_corners=True)[0])


def engine_views(engine, img):
  """[(the engine's cam_rv row for the view, cropped to its stride-8 size, the normalised view, ((H, W), flipped))]
  for each inference view of img, each view alone in a batch."""
  out = []
  for piece in cam_inference.prepare_views(img, SCALES, True, BUCKET):
    row = np.asarray(engine({k: np.stack([a] * engine.batch_size) for k, a in piece.arrays.items()}))[0]
    (h, w), _ = piece.meta
    out.append((row[:piece.crop[0], :piece.crop[1]], piece.arrays['x'][:h, :w], piece.meta))
  return out


def recipe_cams(rows, hw, label):
  """The spec's recipe on per-view stride-8 cam_rv rows [(rv, ((H_v, W_v), flipped))]: upsample to the view
  (align_corners=True, as SEAM does) -> resize to hw (align_corners=False) -> x label -> un-flip -> sum -> clip ->
  per-class min/max normalisation.

  Returns ({c: normalised CAM} of the label classes, the sum s (20, H, W) before the normalisation, a bound on how
  far merge_views' float32 arithmetic on the same rows moves s. Per view and axis, merge_views applies one
  interpolation matrix, the product of the two, its rows within 5 u of exact in l1 (test_upsample_matrix_matches_torch)
  over <= 4 taps (4 u of max|rv|), and this recipe two float32 resizes, each with 2 taps within u of exact and 3
  rounded operations (5 u): (2 x 9 + 2 x 10) u max|rv| for both axes; adding the views rounds by <= u max|s| per
  view and side. x2 margin."""
  h, w = hw
  total = np.zeros((20, h, w), np.float32)
  bound = 0.
  for rv, (view_hw, flipped) in rows:
    r = ops.resize_bilinear(jnp.asarray(upsampled(rv, view_hw)[None]), hw, align_corners=False)
    cam = np.moveaxis(np.asarray(r[0]), -1, 0) * label[:, None, None]
    total += cam[:, :, ::-1] if flipped else cam
    bound += 2 * 38 * U * np.abs(rv).max()
  total[total < 0] = 0
  s = total.copy()
  bound += 2 * 2 * len(rows) * U * s.max()
  mx, mn = total.max((1, 2), keepdims=True), total.min((1, 2), keepdims=True)
  total[total < mn + 1e-5] = 0
  norm = (total - mn - 1e-5) / (mx - mn + 1e-5)
  return {c: norm[c] for c in range(20) if label[c] > 1e-5}, s, bound


def test_upsample_matrix_matches_torch():
  rv = np.random.default_rng(0).normal(size=(1, 3, 5, 7)).astype(np.float32)
  up = torch.nn.functional.interpolate(torch.from_numpy(rv).double(), (37, 50), mode='bilinear', align_corners=True)
  want = torch.nn.functional.interpolate(up, (75, 99), mode='bilinear', align_corners=False)[0].numpy()
  # torch in float64 is exact to float32 precision; ours is float32: each interpolation weight is within u of exact
  # (w1 and 1 - w1 rounded), so a row of the product of two 2-tap matrices is within 4 u (l1) and its float32
  # rounding adds u, per matrix; the two float32 products add 5 and 7 rounded terms with non-negative weights of sum
  # 1 (5 u and 7 u of max|rv|): (5 + 5 + 5 + 7) u max|rv| in all, x2 margin.
  atol = 2 * 22 * U * np.abs(rv).max()
  for flip in (False, True):
    got = cam_inference.upsample_matrix(5, 37, 75, False) @ rv[0] @ cam_inference.upsample_matrix(7, 50, 99, flip).T
    np.testing.assert_allclose(got, want[..., ::-1] if flip else want, rtol=0, atol=atol)


@pytest.mark.slow
def test_inference_matches_unbatched_reference(net, run):
  """Each view's padded, batched network row equals SEAM on the unpadded view up to summation order, and the saved
  CAMs are the spec's recipe applied view by view to those rows (up to float32 rounding)."""
  _, _, variables, forward = net
  config, engine, stats, _ = run
  labels = voc.load_cls_labels(config.data.cls_labels)
  assert stats['images'] == 3 and stats['skipped'] == 0
  for i, (h, w, cls) in IMAGES.items():
    cams = files.load_npy_dict(os.path.join(config.infer.cam_dir, i + '.npy'))
    assert list(cams) == list(cls) and all(type(k) is int for k in cams)  # keys = label classes, ascending
    for c, v in cams.items():
      assert v.dtype == np.float32 and v.shape == (h, w) and v.max() <= 1
      # QUIRK: a CAM that is 0 everywhere normalises to (0 - 0 - 1e-5) / (0 - 0 + 1e-5) = -1
      assert v.max() > 0.99 if c in (3, 11) else np.all(v == -1)
    if i != '2007_00000B':  # two images of different sizes against the reference
      img = files.load_image(input_pipeline.image_path(config.data.voc_root, i))
      # The engine computes a view's row with the executable of its padded shape whatever the other rows hold: these
      # rows are the bits run_inference merged.
      rows = engine_views(engine, img)
      for row, view, (view_hw, _) in rows:
        _, want, _, rv_atol = seam_outputs(forward, variables, view)
        assert rv_atol < 1e-2 * np.abs(want).max()   # well below the values
        np.testing.assert_allclose(upsampled(row, view_hw), want, rtol=0, atol=rv_atol, err_msg=f'{i} {view_hw}')
      ref, s, bound = recipe_cams([(row, meta) for row, _, meta in rows], (h, w), labels[i])
      for c in cls:
        if c not in (3, 11):   # an all-zero CAM: -1 on both sides
          np.testing.assert_array_equal(cams[c], ref[c])
          continue
        # Both sums s are within `bound` of each other, and so are their minima and maxima. Where s >= min + 1e-5 +
        # 2 bound, neither side zeroes s (the spec's threshold s < min + 1e-5, a jump), and the normalisation
        # (s - min - 1e-5) / D, D = max - min + 1e-5, of a value in [0, 1] moves by <= 2 bound (1 + 1) / D, plus its
        # own roundings (<= 4 u per side).
        mn, mx = s[c].min(), s[c].max()
        clear = s[c] >= mn + 1e-5 + 2 * bound
        atol = 4 * bound / (mx - mn + 1e-5) + 8 * U
        assert clear.mean() > 0.9 and atol < 1e-3, (clear.mean(), atol)   # a small band, a tolerance below values
        np.testing.assert_allclose(cams[c][clear], ref[c][clear], rtol=0, atol=atol, err_msg=f'{i} class {c}')
    label_png = np.asarray(Image.open(os.path.join(config.infer.label_dir, i + '.png')))
    np.testing.assert_array_equal(label_png, score_dicts.threshold_label(cams, (h, w), config.infer.bg_threshold))
    for c in cls:
      assert os.path.isfile(os.path.join(config.infer.overlay_dir, f'{i}_{voc.CLASSES[c + 1]}.png'))


def test_compilations_bounded_by_padded_shapes(run):
  _, engine, stats, xla_compiles = run
  view_shapes = {input_pipeline.view_size((h, w), s) for h, w, _ in IMAGES.values() for s in SCALES}
  padded = {tuple(-(-n // BUCKET) * BUCKET for n in vs) for vs in view_shapes}
  assert len(view_shapes) == 6 and len(padded) == 4
  assert stats['compilations'] == engine.compilations == xla_compiles == 4


def test_partial_batches_and_resume(run):
  config, engine, _, _ = run
  cam_dir = config.infer.cam_dir
  before = {i: files.load_npy_dict(os.path.join(cam_dir, i + '.npy')) for i in IMAGES}
  compiled = engine.compilations
  config.infer.max_pending = 1  # every image flushed on its own, half-empty batches
  try:
    stats = cam_inference.run_inference(config, force=True, engine=engine)
  finally:
    config.infer.max_pending = 16
  assert stats['images'] == 3 and engine.compilations == compiled
  # The same executable (one per padded shape) computes each view's batch row, whatever the other rows hold, and the
  # host merges the views in piece order: equal bits.
  for i in IMAGES:
    after = files.load_npy_dict(os.path.join(cam_dir, i + '.npy'))
    for c in before[i]:
      np.testing.assert_array_equal(after[c], before[i][c])
  os.remove(os.path.join(cam_dir, '2007_00000B.npy'))
  mtime = os.path.getmtime(os.path.join(cam_dir, '2007_00000A.npy'))
  stats = cam_inference.run_inference(config, engine=engine)
  assert (stats['images'], stats['skipped']) == (1, 2)
  assert os.path.isfile(os.path.join(cam_dir, '2007_00000B.npy'))
  assert os.path.getmtime(os.path.join(cam_dir, '2007_00000A.npy')) == mtime


def test_device_loop_batch_and_compile_cache():
  loop = bucketing.DeviceLoop(lambda v, b: b['x'] * v, np.float32(2), 3)
  n = jax.local_device_count()
  assert loop.mesh.size == n and loop.batch_size == -(-3 // n) * n   # rounded up to the local devices
  x = np.arange(loop.batch_size * 2, dtype=np.float32).reshape(loop.batch_size, 2)
  np.testing.assert_array_equal(np.asarray(loop({'x': x})), 2 * x)
  loop({'x': x + 1})
  assert loop.compilations == 1
  loop({'x': np.zeros((loop.batch_size, 3), np.float32)})
  assert loop.compilations == 2
  # 0 = auto: one row per device on CPU (these tests' backend).
  assert jax.devices()[0].platform == 'cpu' and bucketing.DeviceLoop(lambda v, b: b, 0., 0).batch_size == n
  with pytest.raises(ValueError, match='< 0'):
    bucketing.DeviceLoop(lambda v, b: b, 0., -1)


class FakeEngine:
  """Stands in for CamEngine: output = an id of the view (valid H * 1000 + W + first xs value)."""
  batch_size = 4

  def __init__(self):
    self.calls = 0

  def __call__(self, batch):
    self.calls += 1
    x, valid, xs = batch['x'], batch['valid'], batch['xs']
    ident = valid[:, 0] * 1000. + valid[:, 1] + xs[:, 0, 0, 0]
    return np.broadcast_to(ident[:, None, None, None], (x.shape[0], xs.shape[1], xs.shape[2], 20)).copy()


def test_schedule_routes_every_view_to_its_image():
  rng = np.random.default_rng(0)
  items = []
  for k in range(7):
    views = []
    for vi in range(3):
      hw = tuple(int(v) for v in rng.integers(9, 40, 2))
      ph, pw = (bucketing.padded(n, 16) for n in hw)
      xs = np.zeros((bucketing.low_res(ph), bucketing.low_res(pw), 3), np.float32)
      xs[0, 0, 0] = k / 10 + vi / 100
      arrays = {'x': np.zeros((ph, pw, 3), np.float32), 'valid': np.array(hw, np.int32), 'xs': xs}
      views.append(bucketing.Piece(arrays, (hw, bool(vi % 2)), bucketing.grid_size(*hw)))
    items.append((k, views, views))
  items.insert(3, (7, [], []))   # an item without pieces completes at once
  done = list(bucketing.schedule(FakeEngine(), iter(items), max_pending=2))
  assert sorted(d[0] for d in done) == list(range(8)) and (7, [], []) in done
  for k, views, outs in done:
    for v, (rv, (hw, flipped)) in zip(views, outs):
      assert (hw, flipped) == v.meta
      assert rv.shape[:2] == (bucketing.low_res(hw[0]), bucketing.low_res(hw[1]))
      # FakeEngine's float64 arithmetic, in its order: equal bits when the output is routed right.
      np.testing.assert_array_equal(rv, np.float64(hw[0] * 1000 + hw[1]) + np.float64(v.arrays['xs'][0, 0, 0]))


def test_padding_is_exact_on_its_own(net, run):
  """The masked network on a padded batch equals SEAM on each unpadded view (upsampled as SEAM does), for the
  PCM's cam_rv and the classifier's cam (branch 'cam')."""
  mc, _, variables, forward = net
  engine = run[1]  # 64 x 64 is compiled already
  img = np.random.default_rng(1).integers(0, 256, (37, 45, 3)).astype(np.uint8)
  views = cam_inference.prepare_views(img, (1.0,), True, BUCKET)
  x = np.zeros((8, 64, 64, 3), np.float32)
  xs = np.zeros((8, 8, 8, 3), np.float32)
  valid = np.tile([64, 64], (8, 1)).astype(np.int32)
  x[:2], xs[:2], valid[:2] = ([v.arrays[k] for v in views] for k in ('x', 'xs', 'valid'))
  batch = {'x': x, 'valid': valid, 'xs': xs}
  out = np.asarray(engine(batch))
  out_cam = np.asarray(cam_inference.CamEngine(variables, mc, 8, branch='cam')(batch))  # the CAM baseline
  for k, v in enumerate(views):
    # The same network up to summation order; the upsampling is the same op on both sides.
    cam, ref, cam_atol, rv_atol = seam_outputs(forward, variables, v.arrays['x'][:37, :45])
    assert cam_atol < 1e-2 * np.abs(cam).max() and rv_atol < 1e-2 * np.abs(ref).max()   # well below the values
    for o, want, atol in ((out, ref, rv_atol), (out_cam, cam, cam_atol)):
      np.testing.assert_allclose(upsampled(o[k, :5, :6], (37, 45)), want, rtol=0, atol=atol)
  (_, plain), _ = forward(variables, jnp.asarray(views[1].arrays['x'][None]))
  assert np.abs(np.asarray(plain[0, :37, :45, 1:]) - ref).max() > rv_atol  # unmasked padding would change the result


def test_bad_input_names_the_file(net, run, tmp_path):
  config, engine, _, _ = run
  bad = os.path.join(config.data.voc_root, 'JPEGImages', '2007_00000Z.jpg')
  with open(bad, 'wb') as f:
    f.write(b'not a jpeg')
  labels = voc.load_cls_labels(config.data.cls_labels)
  c = make_config(str(tmp_path), ['2007_00000Z'], {'2007_00000Z': labels['2007_00000A']})
  c.data.voc_root = config.data.voc_root
  with pytest.raises(errors.DataError, match='2007_00000Z.jpg'):
    cam_inference.run_inference(c, engine=engine)
  voc.write_list(os.path.join(c.data.list_dir, 'train.txt'), ['2007_00000A', 'nolabel'])
  with pytest.raises(errors.DataError, match='nolabel'):
    cam_inference.run_inference(c, engine=engine)


def test_entry_point_reports_a_missing_checkpoint(run, tmp_path):
  config, _, _, _ = run
  args = [f'--config.{k}={v}' for k, v in (('data.voc_root', config.data.voc_root),
                                           ('data.list_dir', config.data.list_dir), ('infer.list', 'train'),
                                           ('data.cls_labels', config.data.cls_labels),
                                           ('infer.cam_dir', tmp_path / 'cams'),
                                           ('infer.checkpoint', tmp_path / 'no_such_export'))]
  r = subprocess.run([sys.executable, 'infer.py', '--config=configs/demo.py', *args], cwd=ROOT, capture_output=True,
                     text=True, timeout=120, env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu'))
  assert r.returncode != 0 and 'no_such_export' in r.stderr and 'Traceback' not in r.stderr
