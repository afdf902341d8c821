"""Issue 22 end to end: the tiny pipeline (python -m seam_jax, configs/demo.py:tiny) on a generated 7-class set in
COCO format and as images + a label CSV (seam_jax.data.demo_formats), and the VOC recipe unchanged by this work.

Each run leaves the user's folder (images, JSON, CSV) byte-identical, takes its class count (7) from the data into
every stage's outputs, and on the CSV set (no masks) skips the evaluation stages with a line saying why."""
import glob
import hashlib
import json
import os
import subprocess
import sys
import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from seam_jax.data import demo_formats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow
K = len(demo_formats.CLASSES)   # 7
# The commit before issue 22's wiring: the VOC recipe's outputs must be the same files, byte for byte.
BEFORE = '2bc1c4e'
EVAL_STAGES = ('eval_cam', 'eval_crf', 'eval_rw', 'eval_seg')


def checksums(folder):
  out = {}
  for d, _, fs in os.walk(folder):
    for f in fs:
      with open(os.path.join(d, f), 'rb') as fh:
        out[os.path.relpath(os.path.join(d, f), folder)] = hashlib.sha1(fh.read()).hexdigest()
  return out


@pytest.fixture(scope='module')
def user_set(tmp_path_factory):
  """The generated 7-class set in both formats (the user's data: nothing may be written into it)."""
  root = str(tmp_path_factory.mktemp('user_data'))
  return demo_formats.generate(root, num_train=12, num_val=6, num_aug=4, image_size=(48, 64), workers=1)


def run_pipeline(workdir, *flags, cwd=ROOT):
  env = dict(os.environ, PYTHONPATH=cwd, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=4')
  proc = subprocess.run([sys.executable, '-m', 'seam_jax', f'--config={cwd}/configs/demo.py:tiny',
                         f'--config.workdir={workdir}', *flags], cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=1800)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc.stdout


def check_class_count(workdir, val_ids, classes):
  """Every stage's outputs are K wide: labels, CAM dicts, random-walk labels, segmentation labels."""
  info = json.load(open(os.path.join(workdir, 'lists', 'dataset.json')))
  assert info['classes'] == list(classes) and info['num_classes'] == K
  labels = np.load(os.path.join(workdir, 'lists', 'cls_labels.npy'), allow_pickle=True).item()
  assert {np.asarray(v).shape for v in labels.values()} == {(K,)}
  assert any(np.asarray(v)[K - 1] for v in labels.values())   # the last class occurs
  cams = [np.load(p, allow_pickle=True).item() for p in glob.glob(os.path.join(workdir, 'cam', '*.npy'))]
  assert cams and all(set(c) <= set(range(K)) for c in cams) and any(K - 1 in c for c in cams)
  for folder in ('rw', 'seg_pred'):
    pngs = glob.glob(os.path.join(workdir, folder, '*.png'))
    assert pngs
    values = np.unique(np.concatenate([np.asarray(Image.open(p)).ravel() for p in pngs]))
    assert set(values.tolist()) <= set(range(K + 1)) | {255}, (folder, values)
  assert sorted(os.path.basename(p)[:-4] for p in glob.glob(os.path.join(workdir, 'seg_pred', '*.png'))) == \
      sorted(val_ids)


def format_flags(user_set, fmt):
  """The flags that point a run at the generated set in `fmt` ('coco' or 'csv')."""
  ext = {'coco': 'json', 'csv': 'csv'}[fmt]
  return [f'--config.data.format={fmt}', f'--config.data.train_annotations={user_set[f"train_{ext}"]}',
          f'--config.data.val_annotations={user_set[f"val_{ext}"]}', f'--config.data.image_dir={user_set["image_dir"]}']


def test_coco_format_pipeline(user_set, tmp_path):
  before = checksums(os.path.dirname(user_set['voc_root']))
  workdir = str(tmp_path / 'run')
  out = run_pipeline(workdir, *format_flags(user_set, 'coco'))
  assert '] demo:' not in out   # the demo generator writes the VOC layout only
  assert '] eval_seg: done in' in out
  assert checksums(os.path.dirname(user_set['voc_root'])) == before
  val_ids = [l.strip() for l in open(os.path.join(workdir, 'lists', 'val.txt')) if l.strip()]
  check_class_count(workdir, val_ids, demo_formats.CLASSES)   # COCO: ordered by category id
  # The masks were rasterised into the run's own folder and equal the VOC masks mapped to the COCO classes.
  lut = demo_formats.class_lut()
  for i in val_ids:
    ours = np.asarray(Image.open(os.path.join(workdir, 'gt', i + '.png')))
    voc_mask = np.asarray(Image.open(os.path.join(user_set['voc_root'], 'SegmentationClass', i + '.png')))
    assert np.array_equal(ours, lut[voc_mask])
  res = json.load(open(os.path.join(workdir, 'eval', 'seg', 'results.json')))
  assert set(res['per_class']) == {'background', *demo_formats.CLASSES}
  assert res['num_images'] == len(val_ids)


def test_csv_format_pipeline(user_set, tmp_path):
  before = checksums(os.path.dirname(user_set['voc_root']))
  workdir = str(tmp_path / 'run')
  out = run_pipeline(workdir, *format_flags(user_set, 'csv'))
  for name in EVAL_STAGES:
    assert f'] {name}: skipped: no ground truth' in out, name
  assert '] test_seg: done in' in out and not os.path.exists(os.path.join(workdir, 'eval'))
  assert checksums(os.path.dirname(user_set['voc_root'])) == before
  val_ids = [l.strip() for l in open(os.path.join(workdir, 'lists', 'val.txt')) if l.strip()]
  check_class_count(workdir, val_ids, sorted(demo_formats.CLASSES))   # CSV: the names sorted
  status = subprocess.run([sys.executable, '-m', 'seam_jax', 'status', f'--config={ROOT}/configs/demo.py:tiny',
                           f'--config.workdir={workdir}', *format_flags(user_set, 'csv')],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert status.returncode == 0, status.stderr[-2000:]
  lines = dict(l.split(': ', 1) for l in status.stdout.splitlines() if ': ' in l)
  assert lines['eval_cam'].startswith('skipped (no ground truth')
  assert all(lines[n] == 'complete' for n in ('prepare', 'train', 'rw', 'test_seg')), status.stdout


# Files whose bytes name the run, not its results (timings, logs, records of the config fields, orbax's own files).
VOLATILE = ('stages.json', '.lock', 'config.json', 'metrics.jsonl', 'records' + os.sep, os.sep + 'tb' + os.sep,
            'report' + os.sep, os.sep + 'ckpt' + os.sep, os.sep + 'variables' + os.sep, '_METADATA', 'manifest')
NEW_FILES = {os.path.join('lists', 'dataset.json')}   # what issue 22 adds to a VOC run


def results(workdir):
  """{relative path: content digest} of the run's result files; a workdir path inside a file (results.json names
  its folders) counts as the same path, and model.json's num_classes (what this work adds) is set aside."""
  out = {}
  for p in checksums(workdir):
    if any(v in os.sep + p for v in VOLATILE):
      continue
    with open(os.path.join(workdir, p), 'rb') as f:
      data = f.read().replace(workdir.encode(), b'<workdir>')
    if os.path.basename(p) == 'model.json':
      meta = json.loads(data)
      assert meta.pop('num_classes', 21) == 21, p
      data = json.dumps(meta, sort_keys=True).encode()
    out[p] = hashlib.sha1(data).hexdigest()
  return out


def test_voc_recipe_unchanged(tmp_path):
  """The tiny VOC demo pipeline of the commit before this work and of this code: the same files, byte for byte
  (only dataset.json is new, and model.json says num_classes 21), so VOC runs are unchanged by the class-set
  plumbing. Both run without the demo's pretraining stage, which issue 23 replaced (a new synthetic set)."""
  git = subprocess.run(['git', '-C', ROOT, 'archive', BEFORE], capture_output=True)
  assert git.returncode == 0, (f'this test needs the repository history (commit {BEFORE}, the code before issue '
                               f'22): {git.stderr.decode()[-500:]}')
  old_root = tmp_path / 'old_code'
  with tarfile.open(fileobj=io.BytesIO(git.stdout)) as tar:
    tar.extractall(old_root, filter='data')
  old, new = str(tmp_path / 'old'), str(tmp_path / 'new')
  same = ('--noreport', '--config.pretrain.enabled=False')
  run_pipeline(old, *same, cwd=str(old_root))
  run_pipeline(new, *same)
  a, b = results(old), results(new)
  assert set(b) - set(a) == NEW_FILES and not set(a) - set(b), sorted(set(a) ^ set(b))[:10]
  changed = sorted(p for p in a if a[p] != b[p])
  assert not changed, changed[:10]
  assert len(a) > 100   # every stage's outputs were compared (CAMs, CRF, walk, seg predictions, evaluations)
