"""Drawing primitives of the generated demo sets (seam_jax.data.demo_data): the 20 class shapes and textures of the
hard set, colours, object coordinates and the backgrounds.

Every function that draws at random takes the caller's numpy Generator and draws from it in a fixed order, so an
image stays a function of its generator's seed.
"""
import colorsys

import numpy as np
from PIL import Image, ImageDraw

from seam_jax.data import voc


# Shapes: boolean functions of unit object coordinates (u, v), radius ~1.
def _polygon(n):
  def inside(u, v):
    a = np.arctan2(v, u)
    return np.hypot(u, v) * np.cos(np.mod(a, 2 * np.pi / n) - np.pi / n) <= np.cos(np.pi / n)
  return inside


def _star(n, inner):
  def inside(u, v):
    tip = np.abs(2 * np.mod(np.arctan2(v, u) * n / (2 * np.pi), 1.) - 1)  # 1 at the tips, 0 between
    return np.hypot(u, v) <= inner + (1 - inner) * tip
  return inside


def _box(u, v, x0, x1, y0, y1):
  return (u >= x0) & (u <= x1) & (v >= y0) & (v <= y1)


SHAPES = (
    lambda u, v: _box(u, v, -1, 1, -.3, .3) | _box(u, v, -.3, .3, -1, 1),                  # cross
    lambda u, v: (np.hypot(u, v) <= 1) & (np.hypot(u, v) >= .55),                          # ring
    _polygon(3),                                                                           # triangle
    lambda u, v: (np.hypot(u, v) <= 1) & (v >= -.15),                                      # half disk
    lambda u, v: _box(u, v, -.4, .4, -.6, .6) | (np.hypot(u, np.abs(v) - .6) <= .4),       # capsule
    lambda u, v: _box(u, v, -1, 1, -.55, .55),                                             # rectangle
    lambda u, v: (np.abs(v) <= .55) & (np.abs(u) <= .95 - .55 * (v + .55)),                # trapezoid
    _star(5, .4),                                                                          # star
    lambda u, v: _box(u, v, -1, -.3, -1, 1) | _box(u, v, -1, 1, .3, 1),                    # L
    lambda u, v: u ** 2 + (v / .6) ** 2 <= 1,                                              # ellipse
    lambda u, v: _box(u, v, -1, 1, -1, -.45) | _box(u, v, -.28, .28, -1, 1),               # T
    _polygon(6),                                                                           # hexagon
    lambda u, v: (np.hypot(u, v) <= 1) & (np.hypot(u - .45, v) > .75),                     # crescent
    lambda u, v: (np.abs(u) <= 1) & (np.abs(v) <= .9 * np.abs(u) + .12),                   # bow tie
    _star(4, .3),                                                                          # sparkle
    lambda u, v: np.hypot(u, v) <= .68 + .32 * np.cos(6 * np.arctan2(v, u)),               # flower
    lambda u, v: _box(u, v, -1, 1, -1, 1) & ~_box(u, v, -.5, .5, -.5, .5),                 # frame
    _polygon(5),                                                                           # pentagon
    lambda u, v: np.abs(u) + np.abs(v) / .6 <= 1,                                          # rhombus
    lambda u, v: _box(u, v, -1, .2, -.25, .25) | ((u >= .2) & (np.abs(v) <= .7 * (1 - u) / .8)),  # arrow
)
SHAPE_NAMES = ('cross', 'ring', 'triangle', 'half disk', 'capsule', 'rectangle', 'trapezoid', 'star', 'L', 'ellipse',
               'T', 'hexagon', 'crescent', 'bow tie', 'sparkle', 'flower', 'frame', 'pentagon', 'rhombus', 'arrow')


# Textures: functions of object-frame pixel coordinates (x, y), radius s and rng -> blend weight in [0, 1].
def _stripes(deg, p):
  c, s_ = np.cos(np.deg2rad(deg)), np.sin(np.deg2rad(deg))
  return lambda x, y, s, rng: np.mod(x * c + y * s_, p) < p / 2


def _checker(p):
  return lambda x, y, s, rng: np.mod(np.floor(x / p) + np.floor(y / p), 2) > 0


def _dots(p, r):
  return lambda x, y, s, rng: np.hypot(np.mod(x, p) - p / 2, np.mod(y, p) - p / 2) < r


def _grid(p, w):
  return lambda x, y, s, rng: (np.mod(x, p) < w) | (np.mod(y, p) < w)


def _rings(p):
  return lambda x, y, s, rng: np.mod(np.hypot(x, y), p) < p / 2


def _waves(p):
  return lambda x, y, s, rng: np.mod(y + .35 * p * np.sin(2 * np.pi * x / p), p) < p / 2


def _gradient(deg):
  c, s_ = np.cos(np.deg2rad(deg)), np.sin(np.deg2rad(deg))
  return lambda x, y, s, rng: np.clip((x * c + y * s_) / (2 * s) + .5, 0, 1)


def _radial():
  return lambda x, y, s, rng: np.clip(np.hypot(x, y) / s, 0, 1)


def _speckle(density):
  return lambda x, y, s, rng: rng.random(x.shape) < density


def _solid():
  return lambda x, y, s, rng: np.zeros(x.shape)


TEXTURES = (_stripes(0, 6), _checker(5), _dots(6, 1.8), _gradient(0), _stripes(45, 5), _grid(7, 2), _rings(6),
            _waves(7), _speckle(.35), _radial(), _stripes(90, 9), _checker(8), _dots(9, 3), _stripes(135, 4),
            _solid(), _grid(5, 1), _waves(4), _rings(10), _speckle(.65), _gradient(90))
assert len(SHAPES) == len(SHAPE_NAMES) == len(TEXTURES) == voc.NUM_FG


def hsv_to_rgb(h, s, v):
  return np.array(colorsys.hsv_to_rgb(h % 1., s, v), np.float32) * 255


def object_frame(h, w, cx, cy, theta):
  """Pixel-centre coordinates rotated into the object frame."""
  yy, xx = np.mgrid[:h, :w].astype(np.float32) + .5
  dx, dy = xx - cx, yy - cy
  c, s = np.cos(theta), np.sin(theta)
  return dx * c + dy * s, dy * c - dx * s


# Backgrounds: float (h, w, 3) images in [0, 255] (before the final pixel noise of the caller).
BACKGROUNDS = ('grey', 'smooth', 'clutter')
GREY_LEVEL = (90, 166)     # 'grey': level range; pixel noise std 20 as the plain demo's fixed 128 +- 20


def grey_background(rng, h, w):
  """Grey pixel noise (std 20) around a random level: far from any colour of saturation >= 0.45."""
  return rng.normal(rng.uniform(*GREY_LEVEL), 20, (h, w, 3))


def _colour_field(rng, h, w):
  """A random colour per cell of a 3-6 x 3-6 grid, bilinearly upsampled to h x w (float, 0..255)."""
  low = rng.uniform(0, 255, (rng.integers(3, 7), rng.integers(3, 7), 3)).astype(np.uint8)
  return np.asarray(Image.fromarray(low).resize((w, h), Image.BILINEAR), np.float32)


def smooth_background(rng, h, w):
  """Smooth colour noise of moderate contrast (+-45 around a random grey): colours vary slowly over the image."""
  return np.clip(rng.uniform(*GREY_LEVEL) + .35 * (_colour_field(rng, h, w) - 128), 0, 255)


def clutter_background(rng, h, w, clutter):
  """Low-contrast clutter (x `clutter`): smooth colour noise, random lines and irregular polygons of no class."""
  base = hsv_to_rgb(rng.random(), rng.uniform(0, .3), rng.uniform(.35, .8))
  img = np.clip(base + .35 * clutter * (_colour_field(rng, h, w) - 128), 0, 255)
  shapes = Image.fromarray(img.astype(np.uint8))
  draw = ImageDraw.Draw(shapes)
  for _ in range(rng.integers(2, 6)):
    draw.line([tuple(p) for p in rng.uniform(0, (w, h), (rng.integers(2, 4), 2))],
              fill=tuple(int(c) for c in rng.integers(0, 256, 3)), width=int(rng.integers(1, 4)))
  for _ in range(rng.integers(1, 5)):
    n = rng.integers(5, 10)
    ang = np.sort(rng.uniform(0, 2 * np.pi, n))
    rad = rng.uniform(.3, 1, n) * rng.uniform(.1, .3) * min(h, w)
    c = rng.uniform(0, (w, h))
    draw.polygon([tuple(p) for p in c + rad[:, None] * np.stack([np.cos(ang), np.sin(ang)], 1)],
                 fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
  return (1 - .35 * clutter) * img + .35 * clutter * np.asarray(shapes, np.float32)


def background(rng, h, w, kind, clutter=1.0):
  """A background of `kind` (BACKGROUNDS); `clutter`: the strength of the 'clutter' kind."""
  if kind == 'clutter':
    return clutter_background(rng, h, w, clutter)
  return grey_background(rng, h, w) if kind == 'grey' else smooth_background(rng, h, w)
