"""Data of the segmentation retrain (RETRAIN_SPEC section 2): images with their random-walk pseudo labels.

Per training image, in the original's order (SSC transform 'weak'): RandomHSV (OpenCV 8-bit HSV, integer deltas
dH, dS, dV uniform in [-10, 10], H wraps mod 180, S and V clip to 0..255) -> horizontal flip (p 0.5, image and
label) -> RandomScale (s uniform in [0.5, 1.5), cv2.resize fx = fy = s: image INTER_CUBIC on uint8, label
INTER_NEAREST) -> ImageNorm (float32 arithmetic: (x / 255 - mean) / std, unlike SEAM's float64-then-cast) ->
RandomCrop 448 (a longer side gets a random offset, a shorter one is placed at a random offset in the canvas; QUIRK
Q4: image padding 0 after normalisation, label padding 255). The loss ignores 255.

Images are decoded with OpenCV as the original (cv2.imread, BGR -> RGB); labels with Pillow. The random draws come
from the pipeline's per-example generator (seam_jax.data.input_pipeline), so the stream is deterministic and
resumable like SEAM's.
"""
import dataclasses
import os

import cv2
import numpy as np

from seam_jax import layout
from seam_jax.common import errors, files
from seam_jax.data import augment, input_pipeline, voc



def label_values(num_classes=voc.NUM_FG):
  """The values a pseudo label may hold: 0..K (QUIRK Q3: no void), and 255 (void: the crop padding; the loss ignores
  it) for K = `num_classes` foreground classes (layout.num_classes)."""
  return np.r_[np.arange(num_classes + 1), voc.IGNORE]


LABEL_VALUES = label_values()   # VOC's: 0..20 and 255
MEAN32, STD32 = voc.MEAN.astype(np.float32), voc.STD.astype(np.float32)


def load_image_cv2(path):
  """RGB uint8 HWC decoded by OpenCV (the original's cv2.imread + BGR -> RGB); DataError naming a missing or
  undecodable file."""
  if not os.path.isfile(path):
    raise errors.DataError(f'image not found: {path}')
  img = cv2.imread(path, cv2.IMREAD_COLOR)
  if img is None:
    raise errors.DataError(f'cannot decode image {path}')
  return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def normalize32(img):
  """The original's ImageNorm: float32 (x / 255 - mean) / std, every step rounded in float32."""
  return (np.asarray(img, np.float32) / np.float32(255.) - MEAN32) / STD32


def denormalize_uint8(x):
  """The original's CRF image (QUIRK Q10): ((x * std + mean) * 255) clipped to 0..255, cast to uint8 by truncation."""
  return np.clip((np.asarray(x, np.float32) * STD32 + MEAN32) * np.float32(255.), 0, 255).astype(np.uint8)


def random_hsv(img, deltas, rng):
  """RandomHSV: OpenCV 8-bit HSV of an RGB uint8 image, H += dH mod 180, S += dS and V += dV clipped to 0..255,
  back to RGB; each delta uniform in [-d, d] (inclusive), drawn in the order H, S, V."""
  dh, ds, dv = (int(rng.integers(-d, d + 1)) for d in deltas)
  hsv = cv2.cvtColor(np.ascontiguousarray(img, np.uint8), cv2.COLOR_RGB2HSV).astype(np.int32)
  out = np.stack([(hsv[..., 0] + dh) % 180, np.clip(hsv[..., 1] + ds, 0, 255), np.clip(hsv[..., 2] + dv, 0, 255)],
                 axis=-1).astype(np.uint8)
  return cv2.cvtColor(out, cv2.COLOR_HSV2RGB)


def random_scale(img, label, scale_range, rng):
  """RandomScale: one s uniform in [low, high) for both axes; image INTER_CUBIC, label INTER_NEAREST."""
  low, high = scale_range
  s = float(rng.random()) * (high - low) + low
  return (cv2.resize(np.ascontiguousarray(img), None, fx=s, fy=s, interpolation=cv2.INTER_CUBIC),
          cv2.resize(np.ascontiguousarray(label), None, fx=s, fy=s, interpolation=cv2.INTER_NEAREST))


def random_crop(img, label, size, rng, fn=None):
  """RandomCrop to size x size (the original's rule, augment.random_crop_box): image padded with 0 (after `fn`,
  applied to the cut-out window: normalising the window gives the same numbers as normalising first), label padded
  with 255."""
  box = augment.random_crop_box(label.shape[:2], size, rng)
  lab = augment.crop_with_box(label, box)
  lab[~box.valid()] = voc.IGNORE
  return augment.crop_with_box(img, box, fn=fn), lab


@dataclasses.dataclass(frozen=True)
class SegAugment:
  """Record {'image': uint8 HWC, 'label': uint8 HW} -> {'image': float32 (crop, crop, 3), 'label': uint8 (crop,
  crop)} (module doc order)."""
  crop_size: int = 448
  scale_range: tuple = (0.5, 1.5)
  hsv_deltas: tuple = (10, 10, 10)
  flip_prob: float = 0.5

  @classmethod
  def from_config(cls, seg_config):
    s = seg_config
    return cls(int(s.crop_size), tuple(s.scale_range), tuple(s.hsv_deltas), float(s.flip_prob))

  def __call__(self, record, rng):
    img, label = random_hsv(record['image'], self.hsv_deltas, rng), record['label']
    if rng.random() < self.flip_prob:
      img, label = augment.hflip(img), augment.hflip(label)
    img, label = random_scale(img, label, self.scale_range, rng)
    img, label = random_crop(img, label, self.crop_size, rng, fn=normalize32)
    return {'image': img, 'label': label}


class SegSource(input_pipeline.IdSource):
  """{'id', 'image': uint8 HWC RGB, 'label': uint8 HW} records: the image (`images`: a layout.Images or a VOC root,
  input_pipeline.as_images) and <label_dir>/<id>.png of the same size, values label_values(num_classes) (IdSource
  error handling: a missing or bad file is a DataError naming it, or skipped)."""

  def __init__(self, images, ids, label_dir, on_error='raise', num_classes=voc.NUM_FG):
    super().__init__(ids, on_error)
    self.images, self.label_dir = input_pipeline.as_images(images), label_dir
    self.values = label_values(num_classes)

  def load(self, index):
    image_id = self.ids[index]
    image = load_image_cv2(self.images(image_id))
    path = os.path.join(self.label_dir, image_id + '.png')
    label = files.load_index_png(path, self.values)
    if label.shape != image.shape[:2]:
      raise errors.DataError(f'{path}: label of size {label.shape} does not match its image {image.shape[:2]}')
    return {'id': image_id, 'image': image, 'label': label}

  def __repr__(self):
    return f'SegSource(num_records={len(self.ids)}, ids_crc32={input_pipeline.ids_digest(self.ids)})'


def check_labels(label_dir, ids):
  """Every id must have its pseudo label before training starts (one DataError naming the first missing file)."""
  missing = [i for i in ids if not os.path.isfile(os.path.join(label_dir, i + '.png'))]
  if missing:
    raise errors.DataError(f'{len(missing)} pseudo labels missing in {label_dir}, e.g. '
                           f'{os.path.join(label_dir, missing[0] + ".png")} (run the random walk on these ids: '
                           'config.rw.list = config.seg.train_list)')


def seg_train_loader(config, seed=None):
  """(grain loader of {'image' (B, crop, crop, 3) float32, 'label' (B, crop, crop) uint8}, number of records) over
  config.seg.train_list (images: layout.images) with the labels of layout.seg_label_dir (0..K and 255, K =
  layout.num_classes); global batch config.seg.batch_size; workers,
  prefetch and on_error from config.data. Deterministic and resumable (input_pipeline.make_loader)."""
  d = config.data
  ids = layout.read_ids(config, config.seg.train_list)
  label_dir = layout.seg_label_dir(config)
  check_labels(label_dir, ids)
  source = SegSource(layout.images(config), ids, label_dir, on_error=d.on_error, num_classes=layout.num_classes(config))
  loader = input_pipeline.make_loader(
      source, SegAugment.from_config(config.seg), global_batch_size=config.seg.batch_size,
      seed=config.seed if seed is None else seed, worker_count=d.num_workers, worker_buffer_size=max(1, d.prefetch))
  return loader, len(ids)

