"""Segmentation retrain (RETRAIN_SPEC) as a pipeline: the training data (augmentations as the spec writes them out,
OpenCV decoding, errors naming files), initialisation from a SEAM export, bit-exact resume, and a tiny end-to-end
train_seg -> test_seg -> eval_seg run through the stage registry plus predict.py on ordinary files."""
import json
import os
import subprocess
import sys

import cv2
import jax
import numpy as np
import pytest

from configs import demo
from seam_jax import layout, runner
from seam_jax.common import files
from seam_jax.common.errors import DataError
from seam_jax.data import input_pipeline, seg_data, voc
from seam_jax.models import convert, export
from seam_jax.train import seg_task, trainer

pytestmark = pytest.mark.slow   # over ~20 s: `pytest -m "not slow"` leaves it out


@pytest.fixture(scope='module', autouse=True)
def compilation_cache(tmp_path_factory):
  """The training runs below compile the same step several times: let JAX's persistent cache reuse it (speed only)."""
  if jax.config.jax_compilation_cache_dir is None:
    jax.config.update('jax_compilation_cache_dir', str(tmp_path_factory.mktemp('jax_cache')))


def small_config(workdir, **seg):
  """The demo's tiny variant at `workdir` (width 32, seg batch 4 in BN groups of 2, fast compile) from a random init
  (no pretraining export)."""
  c = demo.get_config('tiny')
  c.workdir = str(workdir)
  c.pretrain.enabled = False
  c.seg.update(dict(init_from_seam=False, crop_size=32, max_steps=4, log_every=2), **seg)
  return c

def test_init_from_a_seam_export(tmp_path):
  """seg.init_from_seam: the backbone (weights and BN statistics) of this run's SEAM export, the head from init."""
  config = small_config(tmp_path, init_from_seam=True)
  seam_vars = convert.init_variables('seam', config.model, seed=8)
  export.save_export(layout.export_dir(config, 'seam'), seam_vars, 'seam', config.model)
  task = seg_task.seg_task(config, make_loader=lambda seed: (None, 0))
  assert task.hparams.init_weights == layout.export_dir(config, 'seam')
  variables = trainer.init_variables(config, task, jax.random.PRNGKey(0))
  for col in ('params', 'batch_stats'):
    for a, b in zip(jax.tree.leaves(variables[col]['backbone']), jax.tree.leaves(seam_vars[col]['backbone'])):
      np.testing.assert_array_equal(a, b)
  fresh = trainer.random_init(config, task)(jax.random.PRNGKey(0))
  np.testing.assert_array_equal(variables['params']['cls_conv']['kernel'], fresh['params']['cls_conv']['kernel'])

# ------------------------------------------------------------------------------------------------ data
def spec_augment(img, label, rng, crop, scale_range, deltas, flip_prob):
  """RETRAIN_SPEC section 2 written out step by step, drawing from `rng` in the original's order."""
  d = [int(rng.integers(-v, v + 1)) for v in deltas]
  hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV).astype(np.int64)
  hsv[..., 0] = (hsv[..., 0] + d[0]) % 180
  hsv[..., 1:] = np.clip(hsv[..., 1:] + d[1:], 0, 255)
  img = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)
  if rng.random() < flip_prob:
    img, label = img[:, ::-1].copy(), label[:, ::-1].copy()
  s = rng.random() * (scale_range[1] - scale_range[0]) + scale_range[0]
  img = cv2.resize(img, None, fx=s, fy=s, interpolation=cv2.INTER_CUBIC)
  label = cv2.resize(label, None, fx=s, fy=s, interpolation=cv2.INTER_NEAREST)
  img = img.astype(np.float32)
  for c in range(3):
    img[..., c] = (img[..., c] / 255 - voc.MEAN[c].item()) / voc.STD[c].item()   # float32 arithmetic
  out_img, out_lab = np.zeros((crop, crop, 3), np.float32), np.full((crop, crop), 255, np.uint8)
  h, w = label.shape
  offs = []
  for space in (w - crop, h - crop):     # the original draws the column offset first
    offs.append((0, int(rng.integers(space + 1))) if space > 0 else (int(rng.integers(-space + 1)), 0))
  (cl, il), (ct, it) = offs
  ch, cw = min(h, crop), min(w, crop)
  out_img[ct:ct + ch, cl:cl + cw] = img[it:it + ch, il:il + cw]
  out_lab[ct:ct + ch, cl:cl + cw] = label[it:it + ch, il:il + cw]
  return out_img, out_lab


def test_augment_follows_the_spec():
  r = np.random.default_rng(9)
  img = cv2.GaussianBlur(r.integers(0, 256, (25, 61, 3)).astype(np.uint8), (0, 0), 2)   # 13-37 rows x 30-91 cols
  label = r.integers(0, 21, (25, 61)).astype(np.uint8)
  aug = seg_data.SegAugment(crop_size=48, scale_range=(0.5, 1.5), hsv_deltas=(10, 10, 10), flip_prob=0.5)
  placements = set()
  for seed in range(12):
    out = aug({'image': img, 'label': label}, np.random.default_rng(seed))
    want_img, want_lab = spec_augment(img, label, np.random.default_rng(seed), 48, (0.5, 1.5), (10, 10, 10), 0.5)
    assert out['image'].dtype == np.float32 and out['label'].dtype == np.uint8
    np.testing.assert_array_equal(out['image'], want_img)
    np.testing.assert_array_equal(out['label'], want_lab)
    pad = out['label'] == 255
    assert pad.any() and np.all(out['image'][pad] == 0)         # QUIRK Q4: padding 0 after normalisation
    placements.add((np.argmax(~pad.all(1)), np.argmax(~pad.all(0))))
  assert len(placements) > 3                                   # the short image lands at random offsets


def test_crf_image_is_the_truncated_denormalised_input():
  """QUIRK Q10: about 1 in 5 values comes back one level lower, none differs otherwise."""
  img = np.random.default_rng(10).integers(0, 256, (90, 110, 3)).astype(np.uint8)
  diff = seg_data.denormalize_uint8(seg_data.normalize32(img)).astype(int) - img
  assert set(np.unique(diff)) <= {-1, 0}
  assert 0.1 < np.mean(diff == -1) < 0.3


def test_source_errors_name_the_file(tmp_path):
  root = tmp_path / 'VOC2012'
  (root / 'JPEGImages').mkdir(parents=True)
  (tmp_path / 'rw').mkdir()
  cv2.imwrite(str(root / 'JPEGImages' / 'a.jpg'), np.zeros((10, 12, 3), np.uint8))
  (root / 'JPEGImages' / 'b.jpg').write_bytes(b'not a jpeg')
  files.save_label_png(str(tmp_path / 'rw' / 'a.png'), np.zeros((10, 13), np.uint8))
  files.save_label_png(str(tmp_path / 'rw' / 'b.png'), np.zeros((10, 12), np.uint8))
  source = seg_data.SegSource(str(root), ['a', 'b'], str(tmp_path / 'rw'))
  with pytest.raises(DataError, match=r'a.png: label of size \(10, 13\) does not match its image \(10, 12\)'):
    source[0]
  with pytest.raises(DataError, match='cannot decode image .*b.jpg'):
    source[1]
  with pytest.raises(DataError, match='pseudo labels missing .*c.png'):
    seg_data.check_labels(str(tmp_path / 'rw'), ['a', 'c'])

class RandomSegSource:
  """Tiny random segmentation set (grain data source with a stable repr)."""

  def __init__(self, n, size, seed=0):
    r = np.random.default_rng(seed)
    self.images = r.normal(size=(n, size, size, 3)).astype(np.float32)
    self.labels = r.integers(0, 21, (n, size, size)).astype(np.uint8)

  def __len__(self):
    return len(self.images)

  def __getitem__(self, i):
    return {'image': self.images[i], 'label': self.labels[i]}

  def __repr__(self):
    return f'RandomSegSource(n={len(self)})'


def keep(record, rng):
  del rng
  return record


def test_resume_is_bit_exact(tmp_path):
  """A run stopped after 2 of 4 steps and resumed equals the straight run, BN running statistics included (they
  move: the trainer keeps the step's batch_stats)."""
  def run(workdir, stop=None):
    config = small_config(workdir, batch_size=8)   # 8 (fake CPU) devices, 1 image each: BN groups span 2 devices
    loader = lambda seed: (input_pipeline.make_loader(RandomSegSource(16, 32), keep, global_batch_size=8,
                                                      seed=seed), 16)
    task = seg_task.seg_task(config, make_loader=loader)
    if stop:
      trainer.train(config, task, stop_step=stop)
    return trainer.train(config, task), trainer.random_init(config, task)(jax.random.split(jax.random.PRNGKey(0))[0])
  straight, _ = run(tmp_path / 'a')
  resumed, init = run(tmp_path / 'b', stop=2)
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(a, b)
  moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(init['batch_stats']),
                                                    jax.tree.leaves(straight['batch_stats']))]
  assert all(moved)
  assert os.path.isdir(tmp_path / 'a' / 'seg' / 'export')

# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope='module')
def demo_run(tmp_path_factory):
  """Tiny demo set -> train_seg (2 steps) -> test_seg (2 scales x flip, CRF) -> eval_seg through the stage registry;
  the ground-truth masks of the train list stand in for the random walk's labels (same PNG format)."""
  root = tmp_path_factory.mktemp('e2e')
  c = small_config(root / 'work', batch_size=8, bn_group=4, crop_size=48, max_steps=2, scales=(0.75, 1.0), crf=True)
  runner.run_stages(c, ['demo', 'prepare'])
  for i in layout.read_ids(c, c.seg.train_list):
    files.save_label_png(os.path.join(layout.rw_dir(c), i + '.png'),
                         voc.load_mask(os.path.join(layout.gt_dir(c), i + '.png')))
  first = runner.run_stages(c, ['train_seg', 'test_seg', 'eval_seg'])
  again = runner.run_stages(c, ['train_seg', 'test_seg', 'eval_seg'])
  return c, root, first, again


def test_train_test_eval_end_to_end(demo_run):
  c, _, first, again = demo_run
  assert [r['status'] for r in first] == ['ran'] * 3 and [r['status'] for r in again] == ['skipped'] * 3
  assert os.path.isfile(os.path.join(layout.export_dir(c, 'seg'), export.META))
  for i in layout.read_ids(c, c.seg.test_list):
    pred = files.load_index_png(os.path.join(layout.seg_pred_dir(c), i + '.png'), np.arange(21))
    assert pred.shape == files.image_size(layout.image_path(c, i))
  with open(os.path.join(layout.eval_dir(c, 'seg'), 'results.json')) as f:
    res = json.load(f)
  assert res['pred_type'] == 'png' and res['num_images'] == len(layout.read_ids(c, c.seg.test_list))
  assert 0 <= res['miou'] <= 1 and first[2]['summary']['seg']['miou'] == res['miou']


def test_predict_on_ordinary_files(demo_run, tmp_path):
  """predict.py on a folder with two images and an unreadable one: one error line naming it, exit code 1, the
  others segmented (label PNG + side-by-side overlay)."""
  c, root, _, _ = demo_run
  src = tmp_path / 'photos'
  src.mkdir()
  ids = layout.read_ids(c, c.seg.test_list)[:2]
  for k, i in enumerate(ids):
    img = seg_data.load_image_cv2(layout.image_path(c, i))
    cv2.imwrite(str(src / f'photo{k}.png'), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
  (src / 'broken.jpg').write_bytes(b'\xff\xd8 not really a jpeg')
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run(
      [sys.executable, os.path.join(repo, 'predict.py'), f'--config={repo}/configs/demo.py:tiny',
       f'--config.workdir={c.workdir}', '--config.seg.scales=(1.0,)', f'--input={src}', f'--output={tmp_path / "out"}'],
      capture_output=True, text=True, timeout=900, cwd=str(root), check=False)
  errors = [l for l in proc.stderr.splitlines() if l.startswith('error:')]
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert len(errors) == 1 and 'broken.jpg' in errors[0] and 'Traceback' not in proc.stderr
  for k, i in enumerate(ids):
    h, w = files.image_size(layout.image_path(c, i))
    assert files.load_index_png(str(tmp_path / 'out' / f'photo{k}.png'), np.arange(21)).shape == (h, w)
    assert files.load_image(str(tmp_path / 'out' / f'photo{k}_overlay.png')).shape == (h, 2 * w, 3)
  assert not (tmp_path / 'out' / 'broken.png').exists()
