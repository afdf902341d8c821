"""The photometric half of the training augmentation on the device: torchvision's ColorJitter on PIL images
(brightness, contrast, saturation, hue in a random order), the normalisation and the crop as pure jnp functions
inside the jitted train step. Host workers only decode, resize and flip, and send a uint8 canvas with the random
draws (seam_jax.data.augment.photometric_record): `batch_images` turns such a batch into the network input.

Same numbers as the host versions in augment.py (Pillow), bit for bit on XLA:CPU (tests/test_device_augment.py):
- brightness, contrast and saturation are Pillow's Image.blend(degenerate, image, f) = trunc(a + f (b - a))
  clipped to 0..255, in float32 with the product rounded before the sum (computed so that no compiler can
  contract it into an FMA, which XLA:CPU otherwise does). Degenerate images: black; the image's mean grey level
  int(mean(L) + 0.5); the pixel's grey level L = (19595 R + 38470 G + 7471 B + 2^15) >> 16 (Pillow's integer
  ITU-R 601-2 luma).
- the contrast mean is taken over the whole image after the ops before it (the canvas padding excluded), before
  the crop: the reason the whole image is sent, not the crop.
- hue: PIL RGB -> HSV, add the shift to the uint8 hue (mod 256), HSV -> RGB. Pillow computes both conversions in a
  mix of float32 and float64, which the device reproduces with tables derived from Pillow itself (`hsv_tables`):
  hue by (max channel, chroma, channel difference), saturation by (chroma, max); back to RGB, each channel is
  round(v * w) with one float32 w per saturation (and hue) chosen inside the interval that gives Pillow's result
  for every v in 0..255, far enough from its ends that float32 rounding cannot matter. The tests check both
  conversions on all 2^24 inputs.
- normalisation: the float64-computed 256 x 3 table of voc.normalize.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from seam_jax.data import voc

KEYS = ('canvas', 'canvas_hw', 'crop_box', 'jitter_order', 'jitter_on', 'jitter_factor', 'flip')
# HSV -> RGB: Pillow's output channel of v, p and x (= t for even sectors, q for odd ones) per sector i = 6h // 255.
V_POS, P_POS, X_POS = (0, 1, 1, 2, 2, 0), (2, 2, 0, 0, 1, 1), (1, 0, 2, 1, 0, 2)


# ----------------------------------------------------------------------------------------- tables from Pillow
def _pil(mode_in, pixels, mode_out):
  """Pillow's conversion of (N, 3) uint8 pixels between modes."""
  pixels = np.ascontiguousarray(pixels, np.uint8)
  return np.asarray(Image.frombytes(mode_in, (len(pixels), 1), pixels.tobytes()).convert(mode_out))[0]


def _hue_index(case, chroma, first, second):
  """Flat index into the hue table: max-channel case (0 red, 1 green, 2 blue), chroma max - min, and the
  difference of the (max - channel) distances Pillow's formula uses: (b, g), (r, b), (g, r) for the three cases."""
  return (case * 256 + chroma) * 511 + (first - second) + 255


def _rgb_to_hsv_tables():
  """hue (3 * 256 * 511,) and saturation (256 * 256,) uint8 tables from Pillow's RGB -> HSV on one representative
  colour per entry (max channel 255): Pillow's hue depends only on the case, the chroma and the distances of the
  channels from the max, its saturation only on (chroma, max)."""
  cr, u = [a.ravel() for a in np.meshgrid(np.arange(1, 256), np.arange(-255, 256), indexing='ij')]
  keep = np.abs(u) <= cr
  cr, u = cr[keep], u[keep]
  d_first, d_second = np.where(u >= 0, cr, cr + u), np.where(u >= 0, cr - u, cr)
  hue = np.zeros(3 * 256 * 511, np.uint8)
  for case, (i_first, i_second) in enumerate(((2, 1), (0, 2), (1, 0))):
    ok = (d_first >= 1) if case == 1 else ((d_first >= 1) & (d_second >= 1)) if case == 2 else np.ones_like(u, bool)
    rgb = np.full((ok.sum(), 3), 255)
    rgb[:, i_first], rgb[:, i_second] = 255 - d_first[ok], 255 - d_second[ok]
    hue[_hue_index(case, cr[ok], d_first[ok], d_second[ok])] = _pil('RGB', rgb, 'HSV')[:, 0]
  mx, cr = [a.ravel() for a in np.meshgrid(np.arange(256), np.arange(256), indexing='ij')]
  keep = (cr >= 1) & (cr <= mx)
  sat = np.zeros(256 * 256, np.uint8)
  rgb = np.stack([mx[keep], mx[keep] - cr[keep], mx[keep] - cr[keep]], -1)
  sat[cr[keep] * 256 + mx[keep]] = _pil('RGB', rgb, 'HSV')[:, 1]
  return hue, sat


def round_half_up(y):
  """floor(y + 0.5) in float32: C's round() for y >= 0 (works for NumPy and jnp arrays alike)."""
  return np.floor(y + np.float32(0.5)) if isinstance(y, np.ndarray) else jnp.floor(y + jnp.float32(0.5))


def _fit_weights(k, v):
  """float32 w with round_half_up(v * w) == k for every v (axis 0): the middle of the interval of real w giving k
  for all v, [max (k - 1/2) / v, min (k + 1/2) / v). k: (V, ...) Pillow outputs, v: (V, 1, ...) values >= 1. The
  interval is at least 1 / (2 * 255^2) wide, so float32 bounds and rounding of w and of v * w cannot matter (and
  the result is checked)."""
  k = k.astype(np.float32)
  lo, hi = ((k - .5) / v).max(0), ((k + .5) / v).min(0)
  if np.any(lo >= hi):
    raise RuntimeError('Pillow HSV -> RGB values are not round(v * w) for any w: unexpected Pillow version')
  w = (lo + hi) / 2
  if not np.array_equal(round_half_up(v * w), k):
    raise RuntimeError('float32 HSV -> RGB weights do not reproduce Pillow')
  return w


def _hsv_to_rgb_tables():
  """w_p (256,) by saturation and w_x (256 * 256,) by (saturation, hue): Pillow's p = round(v (1 - s)) and
  x = q or t (its float32/float64 formulas of v, s, h) as round_half_up(v * w), fitted to Pillow's output for every
  (h, s, v) with s, v >= 1 (v = 0 gives 0 whatever w; s = 0 is Pillow's grey branch (v, v, v))."""
  v, h, s = np.meshgrid(np.arange(1, 256, dtype=np.uint8), np.arange(256, dtype=np.uint8),
                        np.arange(1, 256, dtype=np.uint8), indexing='ij')
  rgb = _pil('HSV', np.stack([h, s, v], -1).reshape(-1, 3), 'RGB').reshape(v.shape + (3,))
  vf = np.arange(1, 256, dtype=np.float32)[:, None, None]
  w_x = np.ones((256, 256), np.float32)        # [s, h]
  sector = (6 * np.arange(256) // 255) % 6
  for c in range(6):
    hs = np.flatnonzero(sector == c)
    w_x[1:, hs] = _fit_weights(rgb[..., X_POS[c]][:, hs], vf).T
  p = np.concatenate([rgb[..., P_POS[c]][:, sector == c] for c in range(6)], 1)   # (v, h, s)
  if np.any(p != p[:, :1]):
    raise RuntimeError('Pillow HSV -> RGB p depends on the hue: unexpected Pillow version')
  w_p = np.ones(256, np.float32)
  w_p[1:] = _fit_weights(p[:, 0], vf[:, 0])
  return w_p, w_x.ravel()


@functools.lru_cache(maxsize=None)
def hsv_tables():
  """The conversion tables as NumPy arrays (built once per process from Pillow, about a second)."""
  hue, sat = _rgb_to_hsv_tables()
  w_p, w_x = _hsv_to_rgb_tables()
  norm = voc.normalize(np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, 1)[None])[0]
  return {'hue': hue, 'sat': sat, 'w_p': w_p, 'w_x': w_x, 'norm': norm}


def _table(name):
  return jnp.asarray(hsv_tables()[name])


# ----------------------------------------------------------------------------------------------- pixel ops
def luma(x):
  """Pillow's RGB -> L on int32 (..., 3): (19595 R + 38470 G + 7471 B + 2^15) >> 16."""
  return (x[..., 0] * 19595 + x[..., 1] * 38470 + x[..., 2] * 7471 + 0x8000) >> 16


def rounded_product(factor, d):
  """float32(factor * d) for a float32 factor >= 0 and int32 |d| < 256, rounded once even where the compiler
  contracts a float multiply-add into an FMA (XLA:CPU does): the 24-bit mantissa times |d| is an exact uint32
  whose conversion to float32 rounds it, then an exact power-of-two scale."""
  mantissa, exponent = jnp.frexp(jnp.float32(factor))
  magnitude = ((mantissa * 2 ** 24).astype(jnp.uint32) * jnp.abs(d).astype(jnp.uint32)).astype(jnp.float32)
  return jnp.sign(d).astype(jnp.float32) * jnp.ldexp(magnitude, exponent - 24)


def blend(a, b, factor):
  """Pillow's Image.blend(a, b, factor) on int32 levels: trunc(a + f (b - a)) clipped to 0..255, in float32 with
  the product rounded before the sum, as Pillow's C code."""
  return jnp.clip(jnp.floor(a.astype(jnp.float32) + rounded_product(factor, b - a)), 0, 255).astype(jnp.int32)


def brightness(x, factor):
  return blend(jnp.zeros_like(x), x, factor)


def contrast(x, factor, valid):
  """Blend with the mean grey level int(mean(L) + 0.5) over the pixels where `valid` (H, W) is set (int32 sums:
  up to 2^31 / 510 pixels)."""
  if valid.size * 510 >= 2 ** 31:
    raise ValueError(f'contrast: {valid.shape} pixels overflow the int32 mean')
  count = jnp.maximum(jnp.sum(valid, dtype=jnp.int32), 1)
  total = jnp.sum(jnp.where(valid, luma(x), 0), dtype=jnp.int32)
  mean = (2 * total + count) // (2 * count)      # exact int(total / count + 0.5)
  return blend(jnp.broadcast_to(mean, x.shape), x, factor)


def saturation(x, factor):
  return blend(jnp.broadcast_to(luma(x)[..., None], x.shape), x, factor)


def rgb_to_hsv(x):
  """Pillow's RGB -> HSV on int32 (..., 3) levels -> (h, s, v) int32."""
  r, g, b = x[..., 0], x[..., 1], x[..., 2]
  mx, mn = jnp.max(x, -1), jnp.min(x, -1)
  red, green = r == mx, (r != mx) & (g == mx)
  case = jnp.where(red, 0, jnp.where(green, 1, 2))
  first = jnp.where(red, mx - b, jnp.where(green, mx - r, mx - g))
  second = jnp.where(red, mx - g, jnp.where(green, mx - b, mx - r))
  cr = mx - mn
  h = _table('hue')[_hue_index(case, cr, first, second)].astype(jnp.int32)
  s = _table('sat')[cr * 256 + mx].astype(jnp.int32)
  return jnp.where(cr == 0, 0, h), s, mx


def hsv_to_rgb(h, s, v):
  """Pillow's HSV -> RGB on int32 levels -> (..., 3) int32."""
  sector = (6 * h // 255) % 6
  vf = v.astype(jnp.float32)
  p = round_half_up(vf * _table('w_p')[s]).astype(jnp.int32)
  xq = round_half_up(vf * _table('w_x')[s * 256 + h]).astype(jnp.int32)
  pos = lambda table: jnp.asarray(table)[sector]
  channels = [jnp.where(pos(V_POS) == c, v, jnp.where(pos(P_POS) == c, p, xq)) for c in range(3)]
  return jnp.where((s == 0)[..., None], v[..., None], jnp.stack(channels, -1))


def hue(x, levels):
  """torchvision's adjust_hue: the uint8 HSV hue plus `levels` (augment.hue_levels), wrapping around 256."""
  h, s, v = rgb_to_hsv(x)
  return hsv_to_rgb(jnp.remainder(h + jnp.asarray(levels).astype(jnp.int32), 256), s, v)


def normalize(x):
  """int32 levels (..., 3) -> float32 (x / 255 - mean) / std, voc.normalize's table."""
  table = _table('norm')
  return jnp.stack([table[x[..., c], c] for c in range(3)], -1)


# --------------------------------------------------------------------------------------------- per image
def color_jitter(x, order, on, factor, valid):
  """ColorJitter with drawn (order, on, factor) (augment.photometric_record) on int32 (H, W, 3) levels; the
  contrast mean over `valid` pixels. Only the drawn op runs at each of the 4 positions (lax.switch)."""
  branches = (lambda y: brightness(y, factor[0]), lambda y: contrast(y, factor[1], valid),
              lambda y: saturation(y, factor[2]), lambda y: hue(y, factor[3].astype(jnp.int32)), lambda y: y)
  for k in range(4):
    x = jax.lax.switch(jnp.where(on[order[k]], order[k], 4), branches, x)
  return x


def crop(x, hw, box, size, normalize_first=True):
  """The (size, size) window of augment.crop_with_box from int32 levels x (image top-left, hw pixels), box =
  (cont_top, cont_left, img_top, img_left) -> float32. Padding is 0 after normalisation (`normalize_first`, SEAM) or
  black normalised (AffinityNet's original order: crop the uint8 image, then normalise)."""
  cont_top, cont_left, img_top, img_left = box[0], box[1], box[2], box[3]
  padded = jnp.pad(x, ((size, max(0, size - x.shape[0])), (size, max(0, size - x.shape[1])), (0, 0)))
  window = jax.lax.dynamic_slice(padded, (img_top - cont_top + size, img_left - cont_left + size, 0),
                                 (size, size, 3))
  i, j = jnp.arange(size)[:, None], jnp.arange(size)[None, :]
  inside = ((i >= cont_top) & (i < cont_top + jnp.minimum(size, hw[0])) &
            (j >= cont_left) & (j < cont_left + jnp.minimum(size, hw[1])))[..., None]
  if normalize_first:
    return jnp.where(inside, normalize(window), 0.)
  return normalize(jnp.where(inside, window, 0))


def augment_image(record, size, normalize_first=True):
  """One record of augment.photometric_record -> float32 (size, size, 3): jitter, normalise + crop, flip."""
  x = record['canvas'].astype(jnp.int32)
  hw = record['canvas_hw']
  rows, cols = jnp.arange(x.shape[0])[:, None], jnp.arange(x.shape[1])[None, :]
  x = color_jitter(x, record['jitter_order'], record['jitter_on'], record['jitter_factor'],
                   (rows < hw[0]) & (cols < hw[1]))
  out = crop(x, hw, record['crop_box'], size, normalize_first)
  return jnp.where(record['flip'], out[:, ::-1], out)


def input_images(size, normalize_first=True):
  """batch -> network input (`batch_images` with these crop settings), for the training tasks."""
  return functools.partial(batch_images, size=size, normalize_first=normalize_first)


def batch_images(batch, size, normalize_first=True):
  """The network input of a training batch: batch['image'] as is, or the device augmentation of a photometric
  batch (the KEYS of augment.photometric_record, stacked). On CPU the images run one after the other (each
  computes only its drawn ops); on accelerators vmapped (every op computed and selected, but parallel and
  sharding-friendly). The choice follows the platform the step is lowered for (lax.platform_dependent, resolved at
  lowering), not the host's default backend: an export or AOT lowering for GPU/TPU from a CPU host gets the vmap."""
  if 'canvas' not in batch:
    return batch['image']
  records = {k: batch[k] for k in KEYS}
  fn = functools.partial(augment_image, size=size, normalize_first=normalize_first)
  return jax.lax.platform_dependent(records, cpu=functools.partial(jax.lax.map, fn), default=jax.vmap(fn))
