"""SEAM training augmentations (SEAM_SPEC section 3) as small pure NumPy/Pillow functions.

Every random function takes an explicit `np.random.Generator`, so an augmented example is a function of the
generator's seed alone (the input pipeline derives it from (seed, index); see input_pipeline.py). Pixel operations
run in Pillow exactly as the original's PIL/torchvision pipeline does, so for the same draws the pixels match.
Layout is HWC throughout (NHWC batches); the original's final HWC -> CHW step has no counterpart.

The photometric half (colour jitter, normalisation, crop) also exists on the device (seam_jax.data.device_augment):
`photometric_record` packs what it needs (the uint8 image in a fixed canvas and the draws), so host workers only
decode, resize and flip.
"""
import dataclasses

import numpy as np
from PIL import Image, ImageEnhance

from seam_jax.common.errors import DataError
from seam_jax.data import voc


def _pil(img):
  return img if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img, np.uint8))


def _like(out, ref):
  """`out` (PIL) as the same kind (PIL image or uint8 array) as the input `ref`."""
  return out if isinstance(ref, Image.Image) else np.asarray(out)


def long_side_size(w, h, target_long):
  """PIL size (W, H) whose long side is `target_long`; the short side is int(round(short * target / long)).

  As the original, a square image counts its width as the long side (Python's round: halves to even).
  """
  if w < h:
    return int(round(w * target_long / h)), target_long
  return target_long, int(round(h * target_long / w))


def random_resize_long(img, low, high, rng):
  """Resize (PIL bicubic) so the long side is an integer drawn uniformly in [low, high] (inclusive)."""
  im = _pil(img)
  target = int(rng.integers(low, high + 1))
  return _like(im.resize(long_side_size(*im.size, target), Image.Resampling.BICUBIC), img)


def hflip(img):
  """Mirror left-right (PIL image or HW[C] array)."""
  if isinstance(img, Image.Image):
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  return np.ascontiguousarray(np.asarray(img)[:, ::-1])


def random_hflip(img, rng, p=0.5):
  """hflip with probability p; returns (image, flipped)."""
  flipped = bool(rng.random() < p)
  return (hflip(img) if flipped else img), flipped


def adjust_brightness(img, factor):
  """Blend with black (PIL ImageEnhance.Brightness): trunc(x * factor) clipped to 0..255."""
  return _like(ImageEnhance.Brightness(_pil(img)).enhance(factor), img)


def adjust_contrast(img, factor):
  """Blend with the mean grey level (PIL ImageEnhance.Contrast)."""
  return _like(ImageEnhance.Contrast(_pil(img)).enhance(factor), img)


def adjust_saturation(img, factor):
  """Blend with the greyscale image (PIL ImageEnhance.Color)."""
  return _like(ImageEnhance.Color(_pil(img)).enhance(factor), img)


def hue_levels(shift):
  """The hue shift in uint8 hue levels: torchvision's int8(shift * 255) (truncation toward zero)."""
  if not -0.5 <= shift <= 0.5:
    raise ValueError(f'hue shift {shift} is not in [-0.5, 0.5]')
  return int(np.trunc(shift * 255))


def adjust_hue(img, shift):
  """torchvision's PIL adjust_hue: add int8(shift * 255) to the uint8 HSV hue channel, wrapping around 256."""
  levels = hue_levels(shift)
  h, s, v = _pil(img).convert('HSV').split()
  h = (np.asarray(h, np.int64) + levels) % 256
  out = Image.merge('HSV', (Image.fromarray(h.astype(np.uint8), 'L'), s, v)).convert('RGB')
  return _like(out, img)


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def jitter_params(brightness, contrast, saturation, hue, rng):
  """torchvision ColorJitter.get_params: a random order of the 4 ops, then each op's factor (None if disabled).

  Brightness/contrast/saturation factors are uniform in [max(0, 1 - x), 1 + x], the hue shift in [-hue, hue];
  a strength of 0 disables the op.
  """
  order = rng.permutation(4)
  factors = []
  for i, x in enumerate((brightness, contrast, saturation, hue)):
    if x <= 0:
      factors.append(None)
    elif i < 3:
      factors.append(float(rng.uniform(max(0., 1. - x), 1. + x)))
    else:
      factors.append(float(rng.uniform(-x, x)))
  return order, factors


def apply_jitter(img, order, factors):
  for i in order:
    if factors[i] is not None:
      img = _JITTER_OPS[i](img, factors[i])
  return img


def color_jitter(img, brightness, contrast, saturation, hue, rng):
  """torchvision's ColorJitter on a PIL image (factors and order from `jitter_params`)."""
  return apply_jitter(img, *jitter_params(brightness, contrast, saturation, hue, rng))


normalize = voc.normalize


@dataclasses.dataclass(frozen=True)
class CropBox:
  """Where a crop window came from: image rows/cols [img_top, +h) x [img_left, +w) go to container rows/cols
  [cont_top, +h) x [cont_left, +w) of a `size` x `size` zero container."""
  cont_top: int
  cont_left: int
  img_top: int
  img_left: int
  h: int
  w: int
  size: int

  def valid(self):
    """Boolean (size, size) mask of the container pixels that hold image content (not padding)."""
    m = np.zeros((self.size, self.size), bool)
    m[self.cont_top:self.cont_top + self.h, self.cont_left:self.cont_left + self.w] = True
    return m


def _offsets(extent, size, rng):
  """(container offset, image offset) along one axis, the original's RandomCrop rule."""
  space = extent - size
  if space > 0:
    return 0, int(rng.integers(0, space + 1))
  return int(rng.integers(0, -space + 1)), 0


def random_crop_box(hw, size, rng):
  """The original's random crop window for an image of size `hw`: larger dim -> random offset in the image,
  smaller (or equal) -> random offset of the image inside the zero container. Draws the column first."""
  h, w = hw
  cont_left, img_left = _offsets(w, size, rng)
  cont_top, img_top = _offsets(h, size, rng)
  return CropBox(cont_top, cont_left, img_top, img_left, min(size, h), min(size, w), size)


def crop_with_box(arr, box, fn=None):
  """Apply `box` to an HW or HWC array (PIL images too); padding is 0 in the output dtype.

  `fn`, if given, maps the cut-out window before it is placed (crop then normalise: the same numbers as normalise
  then crop, with less work).
  """
  window = np.asarray(arr)[box.img_top:box.img_top + box.h, box.img_left:box.img_left + box.w]
  window = window if fn is None else fn(window)
  out = np.zeros((box.size, box.size) + window.shape[2:], window.dtype)
  out[box.cont_top:box.cont_top + box.h, box.cont_left:box.cont_left + box.w] = window
  return out


def random_crop(*arrays, size, rng):
  """Crop `size` x `size` windows at the same place in every array (same H, W); returns (crops, CropBox)."""
  hw = np.shape(arrays[0])[:2]
  if any(np.shape(a)[:2] != hw for a in arrays):
    raise ValueError(f'random_crop: arrays differ in size {[np.shape(a)[:2] for a in arrays]}')
  box = random_crop_box(hw, size, rng)
  return tuple(crop_with_box(a, box) for a in arrays), box


def seam_train_draws(img_uint8, rng, data_config):
  """The geometric half of seam_train_augment and every random draw, in its order: (resized and flipped PIL
  image, jitter (order, factors), CropBox). `data_config` needs resize_long (low, high), jitter (b, c, s, h) and
  crop_size (config.data)."""
  low, high = data_config.resize_long
  img = random_resize_long(_pil(img_uint8), low, high, rng)
  img, _ = random_hflip(img, rng)
  jitter = jitter_params(*data_config.jitter, rng)
  return img, jitter, random_crop_box((img.height, img.width), data_config.crop_size, rng)


def seam_train_augment(img_uint8, rng, data_config):
  """SEAM's per-image training augmentation, section 3 order: random long-side resize, flip (p 0.5), colour
  jitter, normalise, random crop (zero padding in normalised space) -> float32 (crop, crop, 3)."""
  img, jitter, box = seam_train_draws(img_uint8, rng, data_config)
  return crop_with_box(apply_jitter(img, *jitter), box, fn=normalize)


def photometric_record(img, jitter, box, canvas_side, flip=False, name='image'):
  """What seam_jax.data.device_augment needs to finish an augmentation on the device: the uint8 image top-left in
  a zero (canvas_side, canvas_side, 3) canvas (a fixed shape: one compilation), its size, the crop box, the
  jitter draws and the final flip. An image larger than the canvas is a DataError naming `name`."""
  img = np.asarray(img, np.uint8)
  h, w = img.shape[:2]
  if max(h, w) > canvas_side:
    raise DataError(f'{name}: {h}x{w} pixels exceed the device-augmentation canvas of {canvas_side} '
                    '(raise config.data.aff_canvas, or set config.data.device_augment=False)')
  canvas = np.zeros((canvas_side, canvas_side, 3), np.uint8)
  canvas[:h, :w] = img
  order, factors = jitter
  return {'canvas': canvas, 'canvas_hw': np.array([h, w], np.int32),
          'crop_box': np.array([box.cont_top, box.cont_left, box.img_top, box.img_left], np.int32),
          'jitter_order': np.asarray(order, np.int32),
          'jitter_on': np.array([f is not None for f in factors]),
          'jitter_factor': np.array([1. if f is None else (hue_levels(f) if i == 3 else f)
                                     for i, f in enumerate(factors)], np.float32),
          'flip': np.bool_(flip)}
