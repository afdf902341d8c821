"""Multi-scale + flip test of the segmentation net (RETRAIN_SPEC section 4, SSC test.py), batched and bucketed over
this process's devices.

Per image: ImageNorm (float32) of the OpenCV-decoded image; per scale s of seg.scales the cv2 INTER_CUBIC resize
(fx = fy = s) of the NORMALISED image, and with seg.flip its mirror (6 x 2 = 12 views). Each view's logits (the net
upsamples its stride-8 output to the view size, then the test resizes it to the image size, both bilinear with
align_corners=True; a mirror's output is un-flipped) are averaged (QUIRK Q6: the mean of the logits), softmaxed over
the K + 1 classes (the run's data set: seam_jax.layout.dataset; VOC 21) and, with seg.crf, refined by a dense CRF
(seg.crf_iters = 1 mean-field iteration; Gaussian sxy 3 compat 3, bilateral sxy 32 srgb 13 compat 10, on the
de-normalised input truncated to uint8: QUIRK Q10); the argmax is written as a palette PNG <seg_pred_dir>/<id>.png in
the data set's colours (scored by the eval_seg stage: seam_jax.infer.evaluation, pred_type png).

Bounded memory (issue 21): an image whose longer side is above seg.max_side (0: no limit) is tested at that size
(`bound_image`: the cv2 INTER_AREA downscale of the uint8 image, keeping its aspect) and its label map is brought
back to the image size (cv2 INTER_NEAREST), so views, fused logits, softmax and CRF stay of bounded size whatever
the photo's pixel count. VOC images (<= 500 pixels a side) are within the default limit: the recipe is unchanged.

Throughput: views of many images are zero-padded to multiples of seg.bucket and batched by padded shape
(seam_jax.common.bucketing). The padding is exact: every spatial conv's input is zeroed outside the view's valid
region (the masking of seam_jax.models.seam's padded inference), so each view's stride-8 logits on [:ceil(h/8),
:ceil(w/8)] equal the unpadded network's; the two upsamplings are one precomputed matrix per axis on the host.
With several processes each one does its share of the list.
"""
import concurrent.futures
import dataclasses

import cv2
import flax.linen as nn
import numpy as np

from seam_jax import layout
from seam_jax import models
from seam_jax.common import bucketing, per_image
from seam_jax.data import seg_data
from seam_jax.data import voc
from seam_jax.infer import cam_inference, crf
from seam_jax.models import convert
from seam_jax.models import seam

CRF_BILATERAL_SXY = 32   # QUIRK Q6 (SSC DenseCRF: PSA/DeepLab use 80 / 67)


class SegEngine(bucketing.DeviceLoop):
  """DeepLab's eval forward on padded views over this process's devices: batch {'x' (B, Hp, Wp, 3) normalised
  padded views, 'valid' (B, 2) their unpadded (H, W)} -> stride-8 logits (B, Hp/8, Wp/8, num_classes) float32
  (num_classes = K + 1)."""

  def __init__(self, variables, model_config, batch_size, mesh=None, num_classes=voc.NUM_CLASSES):
    model = models.build('deeplab', model_config, num_classes=num_classes)

    def forward(v, b):
      with nn.intercept_methods(seam.mask_spatial_conv_inputs(b['valid'], b['x'].shape[1:3])):
        return model.apply(v, b['x'], upsample=False)
    super().__init__(forward, {k: variables[k] for k in ('params', 'batch_stats')}, batch_size, mesh,
                     model_config.fast_compile)


@dataclasses.dataclass(frozen=True)
class SegTestOptions:
  scales: tuple = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
  flip: bool = True
  bucket: int = 64
  crf: bool = True
  crf_iters: int = 1
  max_side: int = 1000   # longer image side the test runs at (bound_image); 0 = no limit

  @classmethod
  def from_config(cls, seg_config):
    s = seg_config
    if not s.scales:
      raise ValueError('seg.scales is empty')
    if int(s.max_side) < 0:
      raise ValueError(f'seg.max_side is {s.max_side} (0 = no limit)')
    return cls(tuple(float(v) for v in s.scales), bool(s.flip), int(s.bucket), bool(s.crf), int(s.crf_iters),
               int(s.max_side))


def bounded_size(h, w, max_side):
  """(h, w) scaled down so that the longer side is max_side (aspect kept, each side >= 1); (h, w) itself when
  max_side is 0 or not exceeded."""
  if max_side <= 0 or max(h, w) <= max_side:
    return h, w
  f = max_side / max(h, w)
  return max(1, round(h * f)), max(1, round(w * f))


def bound_image(img, max_side):
  """The image the test runs on: `img` itself within max_side, else its cv2 INTER_AREA resize to bounded_size.
  Done on the uint8 image, before normalisation: INTER_AREA averages the pixels each output pixel covers (an
  antialiased downscale, where bilinear or cubic would alias a large reduction) and the full-size float32 copy of
  the image is never made."""
  h, w = img.shape[:2]
  bh, bw = bounded_size(h, w, max_side)
  return img if (bh, bw) == (h, w) else cv2.resize(img, (bw, bh), interpolation=cv2.INTER_AREA)


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
  """Mean over the views of their logits at the size hw of the image they were made of (the bounded one: see
  bound_image): outs [(stride-8 logits (h8, w8, C), ((h, w), flipped))] -> (C, H, W) float32 (align_corners=True
  twice, as one matrix per axis; mirrored views un-flipped)."""
  acc = None
  for logits, (vhw, flipped) in outs:
    mh = cam_inference.upsample_matrix(logits.shape[0], vhw[0], hw[0], False, True)
    mw = cam_inference.upsample_matrix(logits.shape[1], vhw[1], hw[1], bool(flipped), True)
    up = mh @ np.moveaxis(np.asarray(logits, np.float32), -1, 0) @ mw.T
    if acc is None:
      acc = up
    else:
      acc += up   # in place: one (C, H, W) accumulator and one view's upsampling alive at a time
  acc /= np.float32(len(outs))
  return acc


def softmax(logits, axis=0):
  e = np.exp(logits - logits.max(axis, keepdims=True))
  return e / e.sum(axis, keepdims=True)


def label_map(img_norm, outs, opts, size=None):
  """uint8 class map of one image from its views' outputs (module doc: fuse, softmax, CRF, argmax) at the size of
  `img_norm` (the image the views were made of), then resized to `size` (H, W) if given: cv2 INTER_NEAREST, the
  labels of an image tested at its bounded size (bound_image) brought back to the original's."""
  probs = softmax(fuse_logits(outs, img_norm.shape[:2]))
  if opts.crf:
    probs = crf.crf_inference(seg_data.denormalize_uint8(img_norm), probs, opts.crf_iters, probs.shape[0],
                              bi_sxy=CRF_BILATERAL_SXY)
  label = np.argmax(probs, axis=0).astype(np.uint8)
  if size is not None and tuple(size) != label.shape:
    label = cv2.resize(label, (int(size[1]), int(size[0])), interpolation=cv2.INTER_NEAREST)
  return label


def segment(engine, opts, items, load, save, done, threads=2, max_pending=8):
  """Segment `items` through `engine` (per_image.device_loop): load(item) -> (key, payload, uint8 RGB image or None),
  then on host threads save(key, payload, image, label) -> files written (label None, without device work, for an
  item whose image is None), reported to done(files). The test runs on bound_image(image, opts.max_side); `save`
  gets the original image and its label map at the original size. Views of different images share batches; up to
  `threads` images are prepared and finished at once."""
  def prepare(item):
    key, payload, img = load(item)
    if img is None:
      return key, (payload, None, None), []
    norm = seg_data.normalize32(bound_image(img, opts.max_side))
    return key, (payload, img, norm), prepare_views(norm, opts)

  def finish(result):
    key, (payload, img, norm), outs = result
    return save(key, payload, img, None if img is None else label_map(norm, outs, opts, img.shape[:2]))

  threads = max(int(threads), 1)
  with concurrent.futures.ThreadPoolExecutor(threads) as post:
    per_image.device_loop(engine, items, prepare, finish, done, threads, post, max_pending=max_pending)


def load_engine(config, weights=None):
  """SegEngine over this process's devices with the weights at `weights` (default layout.seg_weights), for the
  run's K + 1 classes (layout.num_outputs)."""
  outputs = layout.num_outputs(config)
  variables = convert.load_variables(weights or layout.seg_weights(config), 'deeplab', config.model, outputs)
  return SegEngine(variables, config.model, config.seg.test_batch_size, num_classes=outputs)


def run_test(config, *, force=False, engine=None):
  """Label PNGs of config.seg.test_list in layout.seg_pred_dir (seam_jax.common.per_image: this process's share, the
  ids not done yet or all with `force`, a barrier at the end). Returns this process's stats (+ compilations)."""
  s = config.seg
  opts = SegTestOptions.from_config(s)
  dataset = layout.dataset(config)

  def work(todo, done):
    eng = engine or load_engine(config)

    def save(image_id, _, img, label):
      del img
      dataset.save_mask(layout.seg_pred_path(config, image_id), label)
      return 1
    load = lambda i: (i, None, seg_data.load_image_cv2(layout.image_path(config, i)))
    segment(eng, opts, todo, load, save, done, s.threads, s.max_pending)
    return {'compilations': eng.compilations}

  return per_image.run('test_seg', layout.read_ids(config, s.test_list),
                       lambda i: layout.per_image_outputs(config, 'test_seg', i), work, force,
                       inputs=lambda i: [layout.image_path(config, i)])

