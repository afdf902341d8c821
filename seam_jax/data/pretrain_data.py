"""A densely labelled synthetic set to pretrain the demo's backbone: the role ImageNet plays for the real recipe
(configs/demo_pretrain.py, seam_jax.train.pretrain_task).

What ImageNet gives a backbone is general features: colour (hue, brightness, saturation), shape and texture, and
what an object is against clutter. Each image here holds 0-3 objects, each of a random generic shape family
(SHAPE_FAMILIES: ellipses, convex polygons, stars, rings, bars), random colour (hue, saturation and value all
uniform), random texture family (TEXTURES: flat, stripes, checks, speckle), size, rotation and place, over a random
background (seam_jax.data.shapes.BACKGROUNDS: grey pixel noise, smooth colour noise, low-contrast clutter). Every
stride-8 cell of an image is labelled (cell_targets), so the features learnt are local, whatever the image-level
content:
  colour   a soft target over COLOUR_PROTOTYPES (the 8 corners of the RGB cube and mid-grey), softmax of
           -|mean RGB of the cell - prototype|^2 / COLOUR_TEMPERATURE: two colours of one hue and different
           brightness, or of one hue and different saturation, get different targets;
  object   whether the cell lies on an object (> 3/4 of it) or on the background (< 1/4), else ignored;
  shape    the shape family of the object over most of the cell, ignored off objects;
  texture  its texture family, ignored off objects.
Nothing of any data set downstream is used (no image, class list or palette): the images are drawn from
(seed, index) alone, on access, and never written to disk.
"""
import dataclasses

import numpy as np

from seam_jax.common.errors import DataError
from seam_jax.data import shapes
from seam_jax.data import voc

STREAM = 1  # the generator key is (seed, index, STREAM): never the demo set's (seed, index)
STRIDE = 8  # the network's output stride: one label per cell
COLOUR_PROTOTYPES = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1],
                              [1, 1, 1], [.5, .5, .5]], np.float32)
COLOUR_TEMPERATURE = 0.15   # a soft target: one hue at values 0.6 and 0.9 differs (0.05: both ~one-hot red)
OBJECTS_P = (0.1, 0.4, 0.3, 0.2)   # P(0, 1, 2, 3 objects)
OBJECT_SCALE = (0.3, 0.9)          # object diameter / image side


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
NUM_OUTPUTS = len(COLOUR_PROTOTYPES) + 2 + len(SHAPE_FAMILIES) + len(TEXTURES)   # channel groups of the head
assert NUM_OUTPUTS <= voc.NUM_CLASSES


def background(rng, size, kind):
  """float (size, size, 3) background of `kind` (shapes.BACKGROUNDS, drawn by seam_jax.data.shapes)."""
  if kind == 'grey':
    return shapes.grey_background(rng, size, size)
  if kind == 'smooth':
    return shapes.smooth_background(rng, size, size)
  return shapes.clutter_background(rng, size, size, rng.uniform(.3, 1.))


def render(seed, index, size):
  """Image `index`: (uint8 (size, size, 3) RGB, int32 (size, size) object id (-1 background), [(shape family,
  texture family)] per object id)."""
  rng = np.random.default_rng([seed, index, STREAM])
  img = background(rng, size, shapes.BACKGROUNDS[rng.integers(len(shapes.BACKGROUNDS))])
  ids = np.full((size, size), -1, np.int32)
  objects = []
  for k in range(rng.choice(len(OBJECTS_P), p=OBJECTS_P)):
    shape, texture = rng.integers(len(SHAPE_FAMILIES)), rng.integers(len(TEXTURES))
    radius = rng.uniform(*OBJECT_SCALE) * size / 2
    x, y = shapes.object_frame(size, size, *rng.uniform(.1, .9, 2) * size, rng.uniform(0, 2 * np.pi))
    mask = SHAPE_FAMILIES[shape][1](rng, x / radius, y / radius)
    hue, sat, val = rng.random(), rng.random(), rng.uniform(.1, 1.)
    first = shapes.hsv_to_rgb(hue, sat, val)
    # the texture's second colour: darker, or paler and brighter, always visibly apart
    second = (shapes.hsv_to_rgb(hue, sat, val * rng.uniform(.2, .6)) if rng.random() < .5 else
              shapes.hsv_to_rgb(hue, sat * rng.uniform(0, .4), min(1., val + rng.uniform(.3, .6))))
    t = TEXTURES[texture][1](rng, x, y).astype(np.float32)[..., None]
    img[mask] = (first * (1 - t) + second * t)[mask]
    ids[mask] = k
    objects.append((int(shape), int(texture)))
  img += rng.normal(0, rng.uniform(2, 10), img.shape)   # pixel noise on objects too: its absence is no cue
  return np.clip(img, 0, 255).astype(np.uint8), ids, objects


def colour_target(rgb):
  """Soft colour target(s) over COLOUR_PROTOTYPES of RGB value(s) in [0, 255] (..., 3) -> (..., 9)."""
  d2 = np.sum(np.square(np.asarray(rgb, np.float32)[..., None, :] / 255. - COLOUR_PROTOTYPES), -1)
  e = np.exp(-(d2 - d2.min(-1, keepdims=True)) / COLOUR_TEMPERATURE)
  return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def cell_targets(img, ids, objects):
  """Per stride-8 cell: {'colour': float32 (h, w, 9), 'object', 'shape', 'texture': int32 (h, w), -1 ignored}."""
  size = img.shape[0]
  h = size // STRIDE
  cells = lambda a: a.reshape(h, STRIDE, h, STRIDE, *a.shape[2:]).swapaxes(1, 2).reshape(h, h, STRIDE ** 2,
                                                                                         *a.shape[2:])
  colour = colour_target(cells(img.astype(np.float32)).mean(2))
  cell_ids = cells(ids)
  on = (cell_ids >= 0).mean(-1)
  obj = np.where(on > .75, 1, np.where(on < .25, 0, -1)).astype(np.int32)
  counts = np.stack([(cell_ids == k).sum(-1) for k in range(len(objects))], -1) if objects else None
  shape, texture = np.full((h, h), -1, np.int32), np.full((h, h), -1, np.int32)
  if objects:
    major = counts.argmax(-1)
    keep = counts.max(-1) > STRIDE ** 2 / 2
    table = np.array(objects, np.int32)
    shape[keep], texture[keep] = table[major[keep], 0], table[major[keep], 1]
  return {'colour': colour, 'object': obj, 'shape': shape, 'texture': texture}


@dataclasses.dataclass(frozen=True)
class PretrainSource:
  """grain random-access source: record k = {'image': float32 normalised (size, size, 3)} and its cell_targets."""
  num_images: int
  size: int
  seed: int

  def __post_init__(self):
    if self.size < 32 or self.size % STRIDE or self.num_images < 1:
      raise DataError(f'pretrain: image_size must be a multiple of {STRIDE}, >= 32, and num_images >= 1, got '
                      f'{self.size}, {self.num_images}')

  def __len__(self):
    return self.num_images

  def __getitem__(self, index):
    img, ids, objects = render(self.seed, int(index), self.size)
    return {'image': voc.normalize(img), **cell_targets(img, ids, objects)}
