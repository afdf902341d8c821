"""Dense CRF refinement of CAM dicts into the background/foreground score maps AffinityNet learns from
(SEAM_SPEC section 4).

For a background power alpha: v = stacked CAMs (K, H, W), bg = (1 - max_k v) ** alpha, probs = [bg, v] (NOT
renormalised); a fully connected CRF (pydensecrf) with unary -log(clip(probs, 1e-5, 1)), Gaussian pairwise sxy=3
compat=3 and bilateral sxy=80 srgb=13 compat=10 on the uint8 RGB image (pydensecrf needs it writable and
C-contiguous), 10 mean-field iterations. Output score dict {0: bg, c + 1: fg class c} (seam_jax.infer.score_dicts) in
`<crf_dir>_<alpha>/<id>.npy` for every alpha (4 and 24 by default: the "la" and "ha" maps of AffinityNet training).
K is the run's class count (seam_jax.layout.num_classes; VOC 20): the files are checked against it.
"""
import functools
import os

import numpy as np
import pydensecrf.densecrf as dcrf
from pydensecrf.utils import unary_from_softmax

from seam_jax import layout
from seam_jax.common import files, per_image, pools
from seam_jax.infer import score_dicts


def crf_inference(img, probs, t=10, labels=21, bi_sxy=80):
  """Mean-field marginals (labels, H, W) float32 of a dense CRF over uint8 HWC `img` with unary from `probs`
  (labels, H, W) (`bi_sxy`: the bilateral kernel's spatial std; the segmentation test uses 32, RETRAIN_SPEC
  section 4)."""
  h, w = img.shape[:2]
  d = dcrf.DenseCRF2D(w, h, labels)
  d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
  d.addPairwiseGaussian(sxy=3, compat=3)
  d.addPairwiseBilateral(sxy=bi_sxy, srgb=13, rgbim=np.require(img, np.uint8, 'CW'), compat=10)
  return np.array(d.inference(t), np.float32).reshape((labels, h, w))


def cam_to_crf(cam_dict, img, alpha, t=10, num_classes=score_dicts.NUM_FG):
  """{0: bg, c + 1: CRF score of class c} for a CAM dict {c: HxW} of K = num_classes classes (keys kept in dict
  order, as the original)."""
  if not cam_dict:  # no foreground label: a one-label CRF is the constant 1
    return {0: np.ones(img.shape[:2], np.float32)}
  labels, probs = score_dicts.power_stack(cam_dict, img.shape[:2], alpha, num_classes, 'CAM dict of the image')
  return dict(zip(labels.tolist(), crf_inference(img, probs, t, labels=len(labels))))


def _crf_one(task, alphas, iters, force, num_classes):
  """Write the missing (all with `force`) outputs of one image, one per alpha; returns the number written."""
  image_path, cam_path, outs = task
  todo = [(a, p) for a, p in zip(alphas, outs) if force or not os.path.isfile(p)]
  img = files.load_image(image_path)
  cams = score_dicts.read(cam_path, img.shape[:2], score_dicts.CAM, num_classes)
  for alpha, path in todo:
    score_dicts.write(path, cam_to_crf(cams, img, alpha, iters, num_classes), img.shape[:2], score_dicts.SCORES,
                      num_classes)
  return len(todo)


def run_crf(config, *, force=False):
  """CRF outputs of config.infer.list for every alpha of config.infer.crf_alphas (seam_jax.common.per_image: this
  process's share, missing outputs or all with `force`, in a pool of infer.crf_workers, a barrier at the end), for
  the run's K classes. Returns this process's stats (per_image.run)."""
  ic = config.infer
  task = lambda i: (layout.image_path(config, i), layout.cam_path(config, i),
                    layout.per_image_outputs(config, 'crf', i))   # one output per alpha, in their order

  def work(todo, done):
    fn = functools.partial(_crf_one, alphas=tuple(ic.crf_alphas), iters=ic.crf_iters, force=force,
                           num_classes=layout.num_classes(config))
    for n in pools.pool_imap(fn, todo, ic.crf_workers, chunksize=4):
      done(n)

  return per_image.run('crf', [task(i) for i in layout.read_ids(config, ic.list)], lambda t: t[2], work, force,
                       inputs=lambda t: t[:2])
