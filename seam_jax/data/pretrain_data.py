"""A fully-labelled synthetic classification set to pretrain the demo's backbone: the role ImageNet plays for the
real recipe (configs/demo_pretrain.py, seam_jax.train.pretrain_task).

Image k of the set holds one object: a random seam_jax.data.demo_data.SHAPES shape, randomly scaled, stretched,
rotated and placed, flat-filled with a colour of uniformly random hue, saturation in [0.5, 1] and value in
[0.5, 1], on grey pixel noise of a random level. Its label is the hue bin floor(hue * num_classes). Only the hue
decides the label, so a network that classifies the set has learnt to tell hues apart whatever the shape, size,
brightness or position: the features the demo set's classes (flat discs of evenly spread hues,
demo_data.plain_colour) need and a randomly initialised backbone lacks. Nothing of the demo set is used (no
image, no pixel label, no class list): the images are drawn from (seed, k) alone, on access, and never written to disk.
"""
import dataclasses

import numpy as np

from seam_jax.common.errors import DataError
from seam_jax.data import demo_data
from seam_jax.data import voc

SATURATION = (0.5, 1.0)
VALUE = (0.5, 1.0)
GREY = (70, 190)       # background level range; pixel noise std 20 as the demo set's
OBJECT_SCALE = (0.35, 0.8)  # default object diameter / image side
STREAM = 1  # the generator key is (seed, index, STREAM): never the demo set's (seed, index)


def hue_label(hue, num_classes, centred=False):
  """Class of a hue in [0, 1): its bin among `num_classes` equal bins of the colour wheel, [k, k + 1) / n, or with
  `centred` the bins centred on the hues k / n, [k - 1/2, k + 1/2) / n."""
  return int(hue * num_classes + (.5 if centred else 0.)) % num_classes


def render(seed, index, size, object_scale=OBJECT_SCALE):
  """Image `index`: (uint8 (size, size, 3) RGB, bool (size, size) object mask, the object's hue in [0, 1)).
  object_scale: (min, max) object diameter / image side; above ~1.5 the object fills most of the image, so that the
  label is the colour under (nearly) every pixel and the features learnt are local, not "the hue somewhere in the
  image" (which would light up a CAM's background)."""
  rng = np.random.default_rng([seed, index, STREAM])
  img = rng.normal(rng.uniform(*GREY), 20, (size, size, 3))
  hue = rng.random()
  colour = demo_data.hsv_to_rgb(hue, rng.uniform(*SATURATION), rng.uniform(*VALUE))
  radius = rng.uniform(*object_scale) * size / 2
  cx, cy = rng.uniform(.25, .75, 2) * size
  x, y = demo_data.object_frame(size, size, cx, cy, rng.uniform(0, 2 * np.pi))
  shape = demo_data.SHAPES[rng.integers(len(demo_data.SHAPES))]
  mask = shape(x / radius, y / (radius * rng.uniform(.7, 1.3)))
  img[mask] = colour
  return np.clip(img, 0, 255).astype(np.uint8), mask, hue


def render_grey(seed, index, size):
  """Image `index` of the grey class: the background alone (grey pixel noise of a random level), no object."""
  rng = np.random.default_rng([seed, index, STREAM])
  return np.clip(rng.normal(rng.uniform(*GREY), 20, (size, size, 3)), 0, 255).astype(np.uint8)


def is_grey(seed, index, num_labels):
  """Whether image `index` is of the grey class: drawn with probability 1 / num_labels (as each hue bin)."""
  return np.random.default_rng([seed, index, STREAM, 1]).random() < 1 / num_labels


@dataclasses.dataclass(frozen=True)
class PretrainSource:
  """grain random-access source: record k = {'image': float32 normalised (size, size, 3), 'label': int32}."""
  num_images: int
  size: int
  num_classes: int
  seed: int
  object_scale: tuple = OBJECT_SCALE
  grey_class: bool = False    # one more class, label num_classes: grey noise alone (what a demo background is)
  centred_bins: bool = False  # hue bins centred on k / num_classes (hue_label)

  @property
  def num_labels(self):
    return self.num_classes + int(self.grey_class)

  def __post_init__(self):
    if not 2 <= self.num_classes <= voc.NUM_CLASSES - int(self.grey_class):
      raise DataError(f'pretrain.num_classes must be in [2, {voc.NUM_CLASSES}] (the classifier\'s outputs, one '
                      f'less with grey_class), got {self.num_classes}')
    if self.size < 32 or self.num_images < 1:
      raise DataError(f'pretrain: image_size must be >= 32 and num_images >= 1, got {self.size}, {self.num_images}')
    if len(self.object_scale) != 2 or not 0 < self.object_scale[0] <= self.object_scale[1]:
      raise DataError(f'pretrain.object_scale must be (min, max) with 0 < min <= max, got {self.object_scale}')

  def __len__(self):
    return self.num_images

  def __getitem__(self, index):
    if self.grey_class and is_grey(self.seed, int(index), self.num_labels):
      img, label = render_grey(self.seed, int(index), self.size), self.num_classes
      return {'image': voc.normalize(img), 'label': np.int32(label)}
    img, _, hue = render(self.seed, int(index), self.size, self.object_scale)
    return {'image': voc.normalize(img), 'label': np.int32(hue_label(hue, self.num_classes, self.centred_bins))}
