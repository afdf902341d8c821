"""Multi-scale + flip test of the segmentation net (RETRAIN_SPEC section 4, SSC test.py), batched and bucketed over
this process's devices.

Per image: ImageNorm (float32) of the OpenCV-decoded image; per scale s of seg.scales the cv2 INTER_CUBIC resize
(fx = fy = s) of the NORMALISED image, and with seg.flip its mirror (6 x 2 = 12 views). Each view's logits (the net
upsamples its stride-8 output to the view size, then the test resizes it to the image size, both bilinear with
align_corners=True; a mirror's output is un-flipped) are averaged (QUIRK Q6: the mean of the logits), softmaxed over
the 21 classes and, with seg.crf, refined by a dense CRF (seg.crf_iters = 1 mean-field iteration; Gaussian sxy 3
compat 3, bilateral sxy 32 srgb 13 compat 10, on the de-normalised input truncated to uint8: QUIRK Q10); the argmax
is written as a palette PNG <seg_pred_dir>/<id>.png (scored by the eval_seg stage: seam_jax.infer.evaluation, pred_type
png).

Throughput: views of many images are zero-padded to multiples of seg.bucket and batched by padded shape
(seam_jax.common.bucketing). The padding is exact: every spatial conv's input is zeroed outside the view's valid
region (the masking of seam_jax.models.seam's padded inference), so each view's stride-8 logits on [:ceil(h/8),
:ceil(w/8)] equal the unpadded network's; the two upsamplings are one precomputed matrix per axis on the host.
With several processes each one does its share of the list.
"""
import concurrent.futures
import dataclasses
import os
import time

from absl import logging
import cv2
import flax.linen as nn
import numpy as np
from tqdm import tqdm

from seam_jax import layout
from seam_jax import models
from seam_jax.common import bucketing, distributed, files, pools
from seam_jax.data import seg_data
from seam_jax.infer import cam_inference, crf
from seam_jax.models import convert
from seam_jax.models import seam

CRF_BILATERAL_SXY = 32   # QUIRK Q6 (SSC DenseCRF: PSA/DeepLab use 80 / 67)


class SegEngine(bucketing.DeviceLoop):
  """DeepLab's eval forward on padded views over this process's devices: batch {'x' (B, Hp, Wp, 3) normalised
  padded views, 'valid' (B, 2) their unpadded (H, W)} -> stride-8 logits (B, Hp/8, Wp/8, 21) float32."""

  def __init__(self, variables, model_config, batch_size, mesh=None):
    model = models.build('deeplab', model_config)

    def forward(v, b):
      with nn.intercept_methods(seam.mask_spatial_conv_inputs(b['valid'], b['x'].shape[1:3])):
        return model.apply(v, b['x'], upsample=False)
    super().__init__(forward, {k: variables[k] for k in ('params', 'batch_stats')}, batch_size, mesh,
                     model_config.get('fast_compile', False))


@dataclasses.dataclass(frozen=True)
class SegTestOptions:
  scales: tuple = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
  flip: bool = True
  bucket: int = 64
  crf: bool = True
  crf_iters: int = 1

  @classmethod
  def from_config(cls, seg_config):
    s = seg_config
    if not s.scales:
      raise ValueError('seg.scales is empty')
    return cls(tuple(float(v) for v in s.scales), bool(s.flip), int(s.bucket), bool(s.crf), int(s.crf_iters))


def multiscale_views(img_norm, scales, flip):
  """[(view, flipped)]: per scale the cv2 INTER_CUBIC resize (fx = fy = s) of the normalised float32 image, then
  its mirror if `flip` (the original's Multiscale + TEST_FLIP order)."""
  out = []
  for s in scales:
    v = cv2.resize(img_norm, None, fx=s, fy=s, interpolation=cv2.INTER_CUBIC)
    out.append((v, False))
    if flip:
      out.append((np.ascontiguousarray(v[:, ::-1]), True))
  return out


def prepare_views(img_norm, opts):
  """The test views of a normalised image as bucketing pieces: {'x': the view zero-padded to the bucket, 'valid':
  its (h, w)}, meta ((h, w), flipped), crop = the valid stride-8 region."""
  pieces = []
  for v, flipped in multiscale_views(img_norm, opts.scales, opts.flip):
    h, w = v.shape[:2]
    x = np.zeros((bucketing.padded(h, opts.bucket), bucketing.padded(w, opts.bucket), 3), np.float32)
    x[:h, :w] = v
    pieces.append(bucketing.Piece({'x': x, 'valid': np.array([h, w], np.int32)}, ((h, w), flipped),
                                  bucketing.grid_size(h, w)))
  return pieces


def fuse_logits(outs, hw):
  """Mean over the views of their logits at the image size: outs [(stride-8 logits (h8, w8, C), ((h, w), flipped))]
  -> (C, H, W) float32 (align_corners=True twice, as one matrix per axis; mirrored views un-flipped)."""
  acc = None
  for logits, (vhw, flipped) in outs:
    mh = cam_inference.upsample_matrix(logits.shape[0], vhw[0], hw[0], False, True)
    mw = cam_inference.upsample_matrix(logits.shape[1], vhw[1], hw[1], bool(flipped), True)
    up = mh @ np.moveaxis(np.asarray(logits, np.float32), -1, 0) @ mw.T
    acc = up if acc is None else acc + up
  return acc / np.float32(len(outs))


def softmax(logits, axis=0):
  e = np.exp(logits - logits.max(axis, keepdims=True))
  return e / e.sum(axis, keepdims=True)


def label_map(img_norm, outs, opts):
  """uint8 (H, W) class map of one image from its views' outputs (module doc: fuse, softmax, CRF, argmax)."""
  probs = softmax(fuse_logits(outs, img_norm.shape[:2]))
  if opts.crf:
    probs = crf.crf_inference(seg_data.denormalize_uint8(img_norm), probs, opts.crf_iters, probs.shape[0],
                              bi_sxy=CRF_BILATERAL_SXY)
  return np.argmax(probs, axis=0).astype(np.uint8)


def segment(engine, opts, items, load, save, threads=2, max_pending=8, desc='seg'):
  """Segment `items` through `engine`: load(item) -> (key, payload, uint8 RGB image or None), then on host threads
  save(key, payload, image, label) (label None, without device work, for an item whose image is None). Views of
  different images share batches (bucketing.schedule); up to `threads` images are prepared and finished at once."""
  def prepare(item):
    key, payload, img = load(item)
    if img is None:
      return key, (payload, None, None), []
    norm = seg_data.normalize32(img)
    return key, (payload, img, norm), prepare_views(norm, opts)

  def finish(result):
    key, (payload, img, norm), outs = result
    save(key, payload, img, None if img is None else label_map(norm, outs, opts))

  threads = max(int(threads), 1)
  with concurrent.futures.ThreadPoolExecutor(threads) as prep, concurrent.futures.ThreadPoolExecutor(threads) as post:
    results = bucketing.schedule(engine, pools.prefetch(prepare, items, prep, 2 * threads), max_pending)
    for _ in tqdm(pools.prefetch(finish, results, post, 2 * threads), total=len(items), desc=desc, unit='img'):
      pass


def load_engine(config, weights=None):
  """SegEngine over this process's devices with the weights at `weights` (default layout.seg_weights)."""
  variables = convert.load_variables(weights or layout.seg_weights(config), 'deeplab', config.model)
  return SegEngine(variables, config.model, config.seg.test_batch_size)


def run_test(config, engine=None):
  """Label PNGs of config.seg.test_list in layout.seg_pred_dir for every id not done yet (all with seg.force); with
  several processes each does its share and all meet at a barrier. Returns this process's stats."""
  s = config.seg
  opts = SegTestOptions.from_config(s)
  ids = layout.read_ids(config, s.test_list)
  out_dir = layout.seg_pred_dir(config)
  share = distributed.process_share(ids)
  todo = [i for i in share if s.force or not os.path.isfile(os.path.join(out_dir, i + '.png'))]
  stats = {'images': len(todo), 'skipped': len(share) - len(todo), 'seconds': 0., 'img_per_s': 0.}
  if todo:
    engine = engine or load_engine(config)
    load = lambda i: (i, None, seg_data.load_image_cv2(layout.image_path(config, i)))
    save = lambda i, _, img, label: files.save_label_png(os.path.join(out_dir, i + '.png'), label)
    t0 = time.time()
    segment(engine, opts, todo, load, save, s.threads, s.max_pending, desc='test_seg')
    dt = time.time() - t0
    stats.update(seconds=dt, img_per_s=len(todo) / dt, compilations=engine.compilations)
  logging.info('test_seg: %d images segmented, %d already done; labels in %s', stats['images'], stats['skipped'],
               out_dir)
  distributed.barrier('test_seg')
  return stats

