"""CAM inference: exact bucketed/batched inference vs an un-batched reference of the spec's recipe, compile count,
scheduling, resume, output format and bad input."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
import pytest
import torch

from configs import demo
from seam_jax.common import bucketing, errors, files
from seam_jax.common import ops
from seam_jax.data import input_pipeline, voc
from seam_jax.infer import evaluation, cam_inference
from seam_jax.models import build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCALES = (1.0, 0.5)
BUCKET = 32
# id -> (H, W, label classes); A, B share padded view shapes, C adds two more. Only classes 3 and 11 have a
# non-zero CAM (see random_variables): class 19 of C exercises a labelled class with an all-zero CAM.
IMAGES = {'2007_00000A': (40, 56, (3, 11)), '2007_00000B': (44, 60, (3,)), '2007_00000C': (70, 40, (11, 19))}


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
  mc = ml_collections.ConfigDict({'width_div': 32, 'dtype': 'float32'})
  model = build('seam', mc)
  return mc, model, random_variables(model)


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
  mc, _, variables = net
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
    stats = cam_inference.run_inference(config, engine)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  return config, engine, stats, len(compiles)


def reference_cams(model, variables, img, label):
  """The spec's recipe, view by view on unpadded inputs: cam_rv[1:] -> resize to (H, W) (align_corners=False)
  -> x label -> un-flip -> sum -> clip -> per-class min/max normalisation."""
  apply = jax.jit(model.apply)
  h, w = img.shape[:2]
  total = np.zeros((20, h, w), np.float32)
  for view, flipped, _ in input_pipeline.inference_views(img, SCALES, True):
    rv = apply(variables, jnp.asarray(view[None]))[1][..., 1:]
    cam = np.moveaxis(np.asarray(ops.resize_bilinear(rv, (h, w), align_corners=False)[0]), -1, 0) * label[:, None, None]
    total += cam[:, :, ::-1] if flipped else cam
  total[total < 0] = 0
  mx, mn = total.max((1, 2), keepdims=True), total.min((1, 2), keepdims=True)
  total[total < mn + 1e-5] = 0
  norm = (total - mn - 1e-5) / (mx - mn + 1e-5)
  return {c: norm[c] for c in range(20) if label[c] > 1e-5}


def test_upsample_matrix_matches_torch():
  rv = np.random.default_rng(0).normal(size=(1, 3, 5, 7)).astype(np.float32)
  up = torch.nn.functional.interpolate(torch.from_numpy(rv), (37, 50), mode='bilinear', align_corners=True)
  want = torch.nn.functional.interpolate(up, (75, 99), mode='bilinear', align_corners=False)[0].numpy()
  for flip in (False, True):
    got = cam_inference.upsample_matrix(5, 37, 75, False) @ rv[0] @ cam_inference.upsample_matrix(7, 50, 99, flip).T
    np.testing.assert_allclose(got, want[..., ::-1] if flip else want, atol=2e-6)


def test_inference_matches_unbatched_reference(net, run):
  _, model, variables = net
  config, _, stats, _ = run
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
      ref = reference_cams(model, variables, img, labels[i])
      for c in cls:
        np.testing.assert_allclose(cams[c], ref[c], atol=2e-5, err_msg=f'{i} class {c}')
    label_png = np.asarray(Image.open(os.path.join(config.infer.label_dir, i + '.png')))
    np.testing.assert_array_equal(label_png, evaluation.cam_to_label(cams, (h, w), config.infer.bg_threshold))
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
  config.infer.force, config.infer.max_pending = True, 1  # every image flushed on its own, half-empty batches
  try:
    stats = cam_inference.run_inference(config, engine)
  finally:
    config.infer.force, config.infer.max_pending = False, 16
  assert stats['images'] == 3 and engine.compilations == compiled
  for i in IMAGES:
    after = files.load_npy_dict(os.path.join(cam_dir, i + '.npy'))
    for c in before[i]:
      np.testing.assert_allclose(after[c], before[i][c], atol=1e-6)
  os.remove(os.path.join(cam_dir, '2007_00000B.npy'))
  mtime = os.path.getmtime(os.path.join(cam_dir, '2007_00000A.npy'))
  stats = cam_inference.run_inference(config, engine)
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
      np.testing.assert_allclose(rv, hw[0] * 1000. + hw[1] + v.arrays['xs'][0, 0, 0])


def test_padding_is_exact_on_its_own(net, run):
  """The masked network on a padded batch equals SEAM on each unpadded view (upsampled as SEAM does), for the
  PCM's cam_rv and the classifier's cam (branch 'cam')."""
  _, model, variables = net
  engine = run[1]  # 64 x 64 is compiled already
  apply = jax.jit(model.apply)
  img = np.random.default_rng(1).integers(0, 256, (37, 45, 3)).astype(np.uint8)
  views = cam_inference.prepare_views(img, (1.0,), True, BUCKET)
  x = np.zeros((8, 64, 64, 3), np.float32)
  xs = np.zeros((8, 8, 8, 3), np.float32)
  valid = np.tile([64, 64], (8, 1)).astype(np.int32)
  x[:2], xs[:2], valid[:2] = ([v.arrays[k] for v in views] for k in ('x', 'xs', 'valid'))
  batch = {'x': x, 'valid': valid, 'xs': xs}
  out = np.asarray(engine(batch))
  out_cam = np.asarray(cam_inference.CamEngine(variables, net[0], 8, branch='cam')(batch))  # the CAM baseline
  for k, v in enumerate(views):
    cam, ref = (np.asarray(r[0, ..., 1:]) for r in apply(variables, jnp.asarray(v.arrays['x'][None, :37, :45])))
    for o, want in ((out, ref), (out_cam, cam)):
      got = ops.resize_bilinear(jnp.asarray(o[k:k + 1, :5, :6]), (37, 45), align_corners=True)[0]
      np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max())
  plain = np.asarray(apply(variables, jnp.asarray(views[1].arrays['x'][None]))[1][0, :37, :45, 1:])
  assert np.abs(plain - ref).max() > 1e-2 * np.abs(ref).max()  # unmasked padding would change the result


def test_bad_input_names_the_file(net, run, tmp_path):
  config, engine, _, _ = run
  bad = os.path.join(config.data.voc_root, 'JPEGImages', '2007_00000Z.jpg')
  with open(bad, 'wb') as f:
    f.write(b'not a jpeg')
  labels = voc.load_cls_labels(config.data.cls_labels)
  c = make_config(str(tmp_path), ['2007_00000Z'], {'2007_00000Z': labels['2007_00000A']})
  c.data.voc_root = config.data.voc_root
  with pytest.raises(errors.DataError, match='2007_00000Z.jpg'):
    cam_inference.run_inference(c, engine)
  voc.write_list(os.path.join(c.data.list_dir, 'train.txt'), ['2007_00000A', 'nolabel'])
  with pytest.raises(errors.DataError, match='nolabel'):
    cam_inference.run_inference(c, engine)


def test_entry_point_reports_a_missing_checkpoint(run, tmp_path):
  config, _, _, _ = run
  args = [f'--config.{k}={v}' for k, v in (('data.voc_root', config.data.voc_root),
                                           ('data.list_dir', config.data.list_dir),
                                           ('data.cls_labels', config.data.cls_labels),
                                           ('infer.cam_dir', tmp_path / 'cams'),
                                           ('infer.checkpoint', tmp_path / 'no_such_export'))]
  r = subprocess.run([sys.executable, 'infer.py', '--config=configs/demo.py', *args], cwd=ROOT, capture_output=True,
                     text=True, timeout=120, env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu'))
  assert r.returncode != 0 and 'no_such_export' in r.stderr and 'Traceback' not in r.stderr
