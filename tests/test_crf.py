"""Dense CRF: equals direct pydensecrf calls, improves a noisy CAM on demo images, pool == serial, resume."""
import os

import numpy as np
import pydensecrf.densecrf as dcrf
import pytest
import scipy.ndimage as ndi

from configs import demo
from seam_jax.common import errors, files
from seam_jax.data import demo_data, voc
from seam_jax.infer import crf, evaluation


@pytest.fixture(scope='module')
def demo_set(tmp_path_factory):
  """A few generated VOC-layout images with noisy blurred-mask CAM dicts."""
  root = str(tmp_path_factory.mktemp('crf') / 'VOC2012')
  demo_data.generate(root, num_train=6, num_val=1, num_aug=0, image_size=(64, 96), seed=0)
  ids = voc.read_list(os.path.join(root, 'ImageSets', 'Segmentation', 'train.txt'))
  cam_dir = os.path.join(os.path.dirname(root), 'cam')
  rng = np.random.default_rng(0)
  for i in ids:
    gt = voc.load_mask(os.path.join(root, 'SegmentationClass', i + '.png'))
    cams = {int(c) - 1: np.clip(ndi.gaussian_filter((gt == c).astype(np.float32), 5) * 1.5
                                + rng.normal(0, 0.15, gt.shape), 0, 1).astype(np.float32)
            for c in np.unique(gt) if 0 < c < 255}
    files.save_npy_dict(os.path.join(cam_dir, i + '.npy'), cams)
  return root, ids, cam_dir


def test_crf_inference_equals_direct_pydensecrf():
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, (13, 17, 3)).astype(np.uint8)
  probs = rng.uniform(0, 1, (3, 13, 17)).astype(np.float32)
  probs[1, :4] = 0  # clipped to 1e-5 in the unary
  d = dcrf.DenseCRF2D(17, 13, 3)
  d.setUnaryEnergy(np.ascontiguousarray(-np.log(np.clip(probs, 1e-5, 1)).reshape(3, -1)))
  d.addPairwiseGaussian(sxy=3, compat=3)
  d.addPairwiseBilateral(sxy=80, srgb=13, rgbim=img.copy(), compat=10)
  want = np.array(d.inference(10)).reshape(3, 13, 17)
  got = crf.crf_inference(img, probs, t=10, labels=3)
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got, want)


def test_cam_to_crf_background_and_keys():
  rng = np.random.default_rng(1)
  img = rng.integers(0, 256, (9, 11, 3)).astype(np.uint8)
  cams = {14: rng.uniform(0, 1, (9, 11)).astype(np.float32), 2: rng.uniform(0, 1, (9, 11)).astype(np.float32)}
  out = crf.cam_to_crf(cams, img, 24.0)
  assert list(out) == [0, 15, 3]  # background, then the dict's classes + 1 in dict order
  bg = (1 - np.maximum(cams[14], cams[2])) ** 24.0  # not renormalised with the CAMs
  want = crf.crf_inference(img, np.stack([bg, cams[14], cams[2]]), labels=3)
  for k, w in zip(out, want):
    np.testing.assert_array_equal(out[k], w)
  with pytest.raises(errors.DataError, match='does not match'):
    crf.cam_to_crf(cams, img[:5], 4.0)


def test_crf_improves_a_noisy_cam(demo_set):
  root, ids, cam_dir = demo_set
  before = np.zeros((21, 22), np.int64)
  after = before.copy()
  for i in ids:
    img = files.load_image(os.path.join(root, 'JPEGImages', i + '.jpg'))
    gt = voc.load_mask(os.path.join(root, 'SegmentationClass', i + '.png'))
    cams = files.load_npy_dict(os.path.join(cam_dir, i + '.npy'))
    keys = np.array([0] + [c + 1 for c in cams])
    v = np.stack(list(cams.values()))
    before += evaluation.confusion(gt, keys[np.argmax(np.concatenate([(1 - v.max(0))[None] ** 4, v]), 0)])
    out = crf.cam_to_crf(cams, img, 4.0)
    after += evaluation.confusion(gt, keys[np.argmax(np.stack(list(out.values())), 0)])
  b, a = evaluation.scores(before)['miou_present'], evaluation.scores(after)['miou_present']
  assert a > b + 0.2, (b, a)


def crf_config(root, cam_dir, ids, out):
  c = demo.get_config()
  c.data.voc_root = root
  c.data.list_dir = os.path.dirname(cam_dir)
  voc.write_list(os.path.join(c.data.list_dir, 'crflist.txt'), ids)
  c.infer.list, c.infer.cam_dir, c.infer.crf_dir = 'crflist', cam_dir, out
  c.infer.crf_alphas = (4.0, 24.0)   # the original's (the demo recipe's are 1 and 4)
  return c


def test_run_crf_pool_equals_serial_and_resumes(demo_set):
  root, ids, cam_dir = demo_set
  base = os.path.dirname(cam_dir)
  c = crf_config(root, cam_dir, ids, os.path.join(base, 'pool'))
  c.infer.crf_workers = 2
  assert crf.run_crf(c)['files_written'] == 2 * len(ids)
  c_serial = crf_config(root, cam_dir, ids, os.path.join(base, 'serial'))
  c_serial.infer.crf_workers = 1
  assert crf.run_crf(c_serial)['files_written'] == 2 * len(ids)
  for a in ('4.0', '24.0'):
    for i in ids:
      p, s = (files.load_npy_dict(os.path.join(base, f'{k}_{a}', i + '.npy')) for k in ('pool', 'serial'))
      assert list(p) == list(s) and all(np.array_equal(p[k], s[k]) for k in p)
  la, ha = (files.load_npy_dict(os.path.join(base, f'pool_{a}', ids[0] + '.npy')) for a in ('4.0', '24.0'))
  assert not np.allclose(la[0], ha[0])  # the two alphas give different background scores
  os.remove(os.path.join(base, 'pool_24.0', ids[1] + '.npy'))
  c.infer.crf_workers = 1
  stats = crf.run_crf(c)
  assert stats['files_written'] == 1           # resume: only the missing file
  assert (stats['images'], stats['skipped']) == (1, len(ids) - 1)
  assert crf.run_crf(c, force=True)['files_written'] == 2 * len(ids)
  c.infer.crf_alphas = ()
  assert crf.run_crf(c, force=True)['files_written'] == 0


def test_missing_input_names_the_file(demo_set):
  root, ids, cam_dir = demo_set
  base = os.path.dirname(cam_dir)
  c = crf_config(root, os.path.join(base, 'cam_empty'), ids[:1], os.path.join(base, 'miss'))
  c.infer.crf_workers = 1
  with pytest.raises(errors.DataError, match=f'cam_empty/{ids[0]}.npy'):
    crf.run_crf(c)
  c = crf_config(root, cam_dir, ['2099_999999'], os.path.join(base, 'miss'))
  with pytest.raises(errors.DataError, match='2099_999999.jpg'):
    crf.run_crf(c)
