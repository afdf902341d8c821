"""Dense CRF refinement of CAM dicts into the background/foreground score maps AffinityNet learns from
(SEAM_SPEC section 4).

For a background power alpha: v = stacked CAMs (K, H, W), bg = (1 - max_k v) ** alpha, probs = [bg, v] (NOT
renormalised); a fully connected CRF (pydensecrf) with unary -log(clip(probs, 1e-5, 1)), Gaussian pairwise sxy=3
compat=3 and bilateral sxy=80 srgb=13 compat=10 on the uint8 RGB image (pydensecrf needs it writable and
C-contiguous), 10 mean-field iterations. Output dict {0: bg, c + 1: fg class c} in `<crf_dir>_<alpha>/<id>.npy`
for every alpha (4 and 24 by default: the "la" and "ha" maps of AffinityNet training).
"""
import functools
import os

from absl import logging
import numpy as np
import pydensecrf.densecrf as dcrf
from pydensecrf.utils import unary_from_softmax
from tqdm import tqdm

from seam_jax import layout
from seam_jax.common import distributed, errors, files, pools


def crf_inference(img, probs, t=10, labels=21, bi_sxy=80):
  """Mean-field marginals (labels, H, W) float32 of a dense CRF over uint8 HWC `img` with unary from `probs`
  (`bi_sxy`: the bilateral kernel's spatial std; the segmentation test uses 32, RETRAIN_SPEC section 4)."""
  h, w = img.shape[:2]
  d = dcrf.DenseCRF2D(w, h, labels)
  d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
  d.addPairwiseGaussian(sxy=3, compat=3)
  d.addPairwiseBilateral(sxy=bi_sxy, srgb=13, rgbim=np.require(img, np.uint8, 'CW'), compat=10)
  return np.array(d.inference(t), np.float32).reshape((labels, h, w))


def cam_to_crf(cam_dict, img, alpha, t=10):
  """{0: bg, c + 1: CRF score of class c} for a CAM dict {c: HxW} (keys kept in dict order, as the original)."""
  h, w = img.shape[:2]
  keys = list(cam_dict)
  if not keys:  # no foreground label: a one-label CRF is the constant 1
    return {0: np.ones((h, w), np.float32)}
  v = np.stack([np.asarray(cam_dict[k], np.float32) for k in keys])
  if v.shape[1:] != (h, w):
    raise errors.DataError(f'CAM of shape {v.shape[1:]} does not match its image of shape {(h, w)}')
  bg = np.power(1 - v.max(0, keepdims=True), alpha)
  scores = crf_inference(img, np.concatenate([bg, v]), t, labels=len(keys) + 1)
  out = {0: scores[0]}
  out.update({k + 1: scores[i + 1] for i, k in enumerate(keys)})
  return out


def _crf_one(task, alphas, iters, force):
  """Write every missing alpha output of one image; returns the number of files written."""
  image_path, cam_path, outs = task
  todo = [(a, p) for a, p in zip(alphas, outs) if force or not os.path.isfile(p)]
  if not todo:
    return 0
  img = files.load_image(image_path)
  cams = files.load_npy_dict(cam_path)
  if not isinstance(cams, dict):
    raise errors.DataError(f'{cam_path} does not hold a dict class -> CAM')
  for alpha, path in todo:
    try:
      res = cam_to_crf(cams, img, alpha, iters)
    except errors.DataError as e:
      raise errors.DataError(f'{cam_path}: {e}') from None
    files.save_npy_dict(path, res)
  return len(todo)


def crf_tasks(config, ids):
  """(image path, CAM path, output path per alpha of infer.crf_alphas) of each id."""
  cam_dir = layout.cam_dir(config)
  return [(layout.image_path(config, i), os.path.join(cam_dir, i + '.npy'),
           tuple(os.path.join(layout.crf_dir(config, a), i + '.npy') for a in config.infer.crf_alphas)) for i in ids]


def run_tasks(tasks, alphas, iters=10, force=False, workers=0):
  """CRF for every task in a process pool (workers 0 = all cores, 1 = in-process); returns files written."""
  fn = functools.partial(_crf_one, alphas=tuple(alphas), iters=iters, force=force)
  written = 0
  with tqdm(total=len(tasks), desc='crf', leave=False) as bar:
    for n in pools.pool_imap(fn, tasks, workers, chunksize=4):
      written += n
      bar.update(1)
  return written


def run_crf(config):
  """CRF outputs of config.infer.list for every alpha of config.infer.crf_alphas (resume unless infer.force). With
  several processes each does its share (its own pool of infer.crf_workers) and all meet at a barrier at the end."""
  ic = config.infer
  if not ic.crf_alphas:
    logging.info('crf: no alphas configured, skipped')
    return 0
  tasks = crf_tasks(config, layout.read_ids(config, ic.list))
  # Inputs checked over the whole list, so that every process stops with the same error.
  missing = [p for img, cam, outs in tasks if ic.force or not all(os.path.isfile(o) for o in outs)
             for p in (img, cam) if not os.path.isfile(p)]
  if missing:
    raise errors.DataError(f'{len(missing)} input files missing, e.g. {missing[0]}')
  share = distributed.process_share(tasks)
  written = run_tasks(share, ic.crf_alphas, ic.crf_iters, ic.force, ic.crf_workers)
  logging.info('crf: wrote %d files for %d images (of %d in the list) into %s', written, len(share), len(tasks),
               ', '.join(layout.crf_dir(config, a) for a in ic.crf_alphas))
  distributed.barrier('crf')
  return written
