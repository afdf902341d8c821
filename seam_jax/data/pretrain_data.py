"""A labelled synthetic set to pretrain the demo's backbone: the role ImageNet plays for the real recipe
(configs/demo_pretrain.py, seam_jax.train.pretrain_task).

What ImageNet gives a backbone is general features: colour (hue, brightness, saturation), texture, shape, and what
an object is against its background. Image k of the set is either a background alone (BACKGROUND_P of them: grey
pixel noise, smooth colour noise or low-contrast clutter, seam_jax.data.shapes.BACKGROUNDS) or one object that
fills most of it (object_scale (1.5, 2): the label is what lies under nearly every pixel, so the features learnt
are local, not "a colour somewhere in the image", which lit up the background of the demo's CAMs) over such a
background: a random generic shape (SHAPE_FAMILIES), a random colour (hue, saturation and value uniform) and, for
TEXTURE_P of them, a random texture (TEXTURES; the others flat). Its labels (targets):
  colour   soft, over HUE_BINS x VALUE_BINS joint colour classes plus one background class: a Gaussian in hue
           (circular) times one in value around the bin centres, so that no colour sits on a hard bin edge and two
           colours of one hue and different brightness get different targets; a background image: the background
           class alone;
  texture  the object's texture family; none for a background.
Nothing of any data set downstream is used (no image, class list or palette; the bins are even over hue and value):
the images are drawn from (seed, index) alone, on access, and never written to disk.
"""
import dataclasses

import numpy as np

from seam_jax.common.errors import DataError
from seam_jax.data import shapes
from seam_jax.data import voc

STREAM = 1  # the generator key is (seed, index, STREAM): never the demo set's (seed, index)
HUE_BINS = 9
VALUE_BINS = (0.45, 0.9)          # value bin centres
HUE_SIGMA = 0.5 / HUE_BINS        # of the soft target, in turns of the colour wheel
VALUE_SIGMA = 0.15
SATURATION = (0.3, 1.0)
VALUE = (0.25, 1.0)
BACKGROUND_P = 0.1                # images of the background class
TEXTURE_P = 0.25                  # objects with a texture (the others flat): two colours blur the colour label
OBJECT_SCALE = (1.5, 2.0)         # object diameter / image side
NUM_COLOURS = HUE_BINS * len(VALUE_BINS) + 1   # + the background class (the last)


def _polygon_mask(x, y, angles, radii):
  """Inside the star-shaped polygon of vertices radii[k] (cos, sin)(angles[k]) (angles increasing)."""
  a = np.mod(np.arctan2(y, x), 2 * np.pi)
  k = np.searchsorted(angles, a) % len(angles)
  p0 = np.stack([radii[k - 1] * np.cos(angles[k - 1]), radii[k - 1] * np.sin(angles[k - 1])])
  p1 = np.stack([radii[k] * np.cos(angles[k]), radii[k] * np.sin(angles[k])])
  cross = (p1[0] - p0[0]) * (y - p0[1]) - (p1[1] - p0[1]) * (x - p0[0])
  return cross >= 0


def _convex(rng, x, y, lo, hi):
  n = rng.integers(lo, hi + 1)
  angles = np.sort(np.mod(np.arange(n) * 2 * np.pi / n + rng.uniform(-.25, .25, n) * 2 * np.pi / n, 2 * np.pi))
  return _polygon_mask(x, y, angles, np.ones(n))


def _star(rng, x, y):
  n = rng.integers(4, 8)
  angles = np.arange(2 * n) * np.pi / n
  return _polygon_mask(x, y, angles, np.where(np.arange(2 * n) % 2, rng.uniform(.3, .6), 1.))


# Shape families: (rng, unit object coordinates x, y) -> bool mask; radius ~1.
SHAPE_FAMILIES = (
    ('ellipse', lambda rng, x, y: x ** 2 + (y / rng.uniform(.5, 1.)) ** 2 <= 1),
    ('triangle or quadrilateral', lambda rng, x, y: _convex(rng, x, y, 3, 4)),
    ('polygon of 5-8 sides', lambda rng, x, y: _convex(rng, x, y, 5, 8)),
    ('star', _star),
    ('ring', lambda rng, x, y: (np.hypot(x, y) <= 1) & (np.hypot(x, y) >= rng.uniform(.4, .7))),
    ('bar', lambda rng, x, y: (np.abs(x) <= 1) & (np.abs(y) <= rng.uniform(.15, .35))),
)


def _stripes(rng, x, y):
  angle, period = rng.uniform(0, np.pi), rng.uniform(3, 9)
  return np.mod(x * np.cos(angle) + y * np.sin(angle), period) < period / 2


def _checks(rng, x, y):
  period = rng.uniform(3, 9)
  return np.mod(np.floor(x / period) + np.floor(y / period), 2) > 0


# Texture families: (rng, pixel object coordinates x, y) -> blend weight in [0, 1] of the object's second colour.
TEXTURES = (
    ('flat', lambda rng, x, y: np.zeros(x.shape)),
    ('stripes', _stripes),
    ('checks', _checks),
    ('speckle', lambda rng, x, y: rng.random(x.shape) < rng.uniform(.2, .6)),
)
NUM_OUTPUTS = NUM_COLOURS + len(TEXTURES)   # the head's channels: colour classes, then texture families


def background(rng, size):
  """float (size, size, 3): a background of a random kind (shapes.BACKGROUNDS)."""
  kind = shapes.BACKGROUNDS[rng.integers(len(shapes.BACKGROUNDS))]
  return shapes.background(rng, size, size, kind, rng.uniform(.3, 1.) if kind == 'clutter' else 1.)


def render(seed, index, size, object_scale=OBJECT_SCALE):
  """Image `index`: (uint8 (size, size, 3) RGB, bool (size, size) object mask, the object's (hue, saturation,
  value) and texture family, or None for a background image)."""
  rng = np.random.default_rng([seed, index, STREAM])
  img = background(rng, size)
  mask, obj = np.zeros((size, size), bool), None
  if rng.random() >= BACKGROUND_P:
    shape = rng.integers(len(SHAPE_FAMILIES))
    texture = int(rng.integers(1, len(TEXTURES))) if rng.random() < TEXTURE_P else 0   # 0: flat
    radius = rng.uniform(*object_scale) * size / 2
    x, y = shapes.object_frame(size, size, *rng.uniform(.25, .75, 2) * size, rng.uniform(0, 2 * np.pi))
    mask = SHAPE_FAMILIES[shape][1](rng, x / radius, y / radius)
    hsv = (rng.random(), rng.uniform(*SATURATION), rng.uniform(*VALUE))
    first = shapes.hsv_to_rgb(*hsv)
    # the texture's second colour: darker, or paler and brighter, always visibly apart
    second = (shapes.hsv_to_rgb(hsv[0], hsv[1], hsv[2] * rng.uniform(.2, .6)) if rng.random() < .5 else
              shapes.hsv_to_rgb(hsv[0], hsv[1] * rng.uniform(0, .4), min(1., hsv[2] + rng.uniform(.3, .6))))
    t = TEXTURES[texture][1](rng, x, y).astype(np.float32)[..., None]
    img[mask] = (first * (1 - t) + second * t)[mask]
    obj = (tuple(float(v) for v in hsv), texture)
  img += rng.normal(0, rng.uniform(2, 10), img.shape)   # pixel noise on the object too: its absence is no cue
  return np.clip(img, 0, 255).astype(np.uint8), mask, obj


def colour_target(hue, value):
  """float32 (NUM_COLOURS,): the soft colour class of (hue, value), exp(-d_hue^2 / 2 HUE_SIGMA^2 - d_value^2 /
  2 VALUE_SIGMA^2) over the bin centres (k / HUE_BINS, VALUE_BINS), normalised; the background class 0."""
  d = np.abs(np.arange(HUE_BINS) / HUE_BINS - hue % 1.)
  d = np.minimum(d, 1 - d)
  w = np.exp(-.5 * (d[:, None] / HUE_SIGMA) ** 2 - .5 * ((np.array(VALUE_BINS) - value) / VALUE_SIGMA) ** 2)
  return np.append(w.ravel() / w.sum(), 0.).astype(np.float32)


def background_target():
  return np.eye(NUM_COLOURS, dtype=np.float32)[-1]


@dataclasses.dataclass(frozen=True)
class PretrainSource:
  """grain random-access source: record k = {'image': float32 normalised (size, size, 3), 'colour': float32
  (NUM_COLOURS,) soft target, 'texture': int32, -1 for a background image}."""
  num_images: int
  size: int
  seed: int
  object_scale: tuple = OBJECT_SCALE

  def __post_init__(self):
    if self.size < 32 or self.num_images < 1:
      raise DataError(f'pretrain: image_size must be >= 32 and num_images >= 1, got {self.size}, {self.num_images}')
    if len(self.object_scale) != 2 or not 0 < self.object_scale[0] <= self.object_scale[1]:
      raise DataError(f'pretrain.object_scale must be (min, max) with 0 < min <= max, got {self.object_scale}')

  def __len__(self):
    return self.num_images

  def __getitem__(self, index):
    img, _, obj = render(self.seed, int(index), self.size, self.object_scale)
    if obj is None:
      return {'image': voc.normalize(img), 'colour': background_target(), 'texture': np.int32(-1)}
    (hue, _, value), texture = obj
    return {'image': voc.normalize(img), 'colour': colour_target(hue, value), 'texture': np.int32(texture)}
