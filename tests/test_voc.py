"""seam_jax.data.voc: normalisation exactness, list formats, atomic writes, clear errors."""
import os

import numpy as np
import pytest

from seam_jax.common import errors, files
from seam_jax.data import voc


def test_normalize_matches_the_original_float64_then_cast():
  img = np.arange(256, dtype=np.uint8)[:, None, None].repeat(3, 2)
  ref = np.empty(img.shape, np.float32)
  for c, (m, s) in enumerate(zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))):
    ref[..., c] = (img[..., c] / 255. - m) / s
  out = voc.normalize(img)
  assert out.dtype == np.float32 and np.array_equal(out, ref)


def test_both_list_formats(tmp_path):
  p = tmp_path / 'l.txt'
  p.write_text('/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png\n2008_000123\n\n')
  assert voc.read_list(str(p)) == ['2007_000032', '2008_000123']
  assert voc.resolve_list('train', 'lists') == os.path.join('lists', 'train.txt')
  with pytest.raises(errors.DataError, match='nope.txt'):
    voc.read_list(str(tmp_path / 'nope.txt'))


def test_labels_for_names_missing_ids():
  with pytest.raises(errors.DataError, match='b'):
    voc.labels_for(['a', 'b'], {'a': np.zeros(20, np.float32)}, 'cls.npy')


def test_atomic_writes_leave_no_temp_files(tmp_path):
  files.save_npy_dict(str(tmp_path / 'x.npy'), {3: np.ones((2, 2), np.float32)})
  files.save_label_png(str(tmp_path / 'x.png'), np.full((3, 4), 7, np.uint8))
  assert sorted(os.listdir(tmp_path)) == ['x.npy', 'x.png']
  assert files.load_npy_dict(str(tmp_path / 'x.npy'))[3].shape == (2, 2)
  np.testing.assert_array_equal(voc.load_mask(str(tmp_path / 'x.png')), 7)


def test_corrupt_files_name_the_file(tmp_path):
  bad = tmp_path / 'bad.jpg'
  bad.write_bytes(b'not a jpeg')
  with pytest.raises(errors.DataError, match='bad.jpg'):
    files.load_image(str(bad))
  with pytest.raises(errors.DataError, match='missing.png'):
    voc.load_mask(str(tmp_path / 'missing.png'))


def test_layout_derives_every_path_from_workdir():
  """Path fields left '' follow config.workdir; an explicit field overrides just that path."""
  from configs import voc12
  from seam_jax import layout
  c = voc12.get_config()
  c.workdir = '/runs/a'
  derived = [layout.list_dir(c), layout.cls_labels(c), layout.cam_dir(c), layout.crf_dir(c, 4), *layout.score_dirs(c),
             layout.rw_dir(c), layout.eval_dir(c, 'cam'), layout.seam_weights(c), layout.affinity_weights(c),
             layout.task_dir(c, 'seam')]
  assert all(p.startswith('/runs/a/') for p in derived), derived
  assert layout.crf_dir(c, 24) == '/runs/a/crf_24.0' and layout.score_dirs(c) == ('/runs/a/crf_4.0', '/runs/a/crf_24.0')
  c.infer.cam_dir = '/elsewhere/cams'
  assert layout.cam_dir(c) == '/elsewhere/cams' and layout.rw_cam_dir(c) == '/elsewhere/cams'
  assert layout.eval_pred_dir(c) == '/elsewhere/cams'
