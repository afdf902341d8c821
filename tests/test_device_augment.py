"""On-device colour jitter, normalisation and crop against the host (Pillow) versions.

No tolerance: the device reproduces every rounding Pillow makes (float32 products rounded before the sum, integer
luma and mean, the HSV conversions through tables fitted to Pillow), so on XLA:CPU the outputs are bit-identical.
The HSV conversions are checked on all 2^24 inputs, the blends on all 2^16 (a, b) level pairs.
"""
import types

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from seam_jax.common import errors
from seam_jax.data import augment as A
from seam_jax.data import device_augment as D
from seam_jax.data import input_pipeline as ip
from seam_jax.train import affinity_task as at

ALL = np.stack(np.meshgrid(*[np.arange(256, dtype=np.uint8)] * 3, indexing='ij'), -1).reshape(-1, 3)


def rng(seed=0):
  return np.random.default_rng(seed)


def pil_all(mode_in, mode_out):
  return np.asarray(Image.frombytes(mode_in, (4096, 4096), ALL.tobytes()).convert(mode_out)).reshape(-1, 3)


def in_chunks(fn, x, chunks=16):
  f = jax.jit(fn)
  return np.concatenate([np.asarray(f(c)) for c in np.split(x.astype(np.int32), chunks)])


def test_rgb_to_hsv_every_colour():
  out = in_chunks(lambda x: jnp.stack(D.rgb_to_hsv(x), -1), ALL)
  np.testing.assert_array_equal(out, pil_all('RGB', 'HSV'))


def test_hsv_to_rgb_every_input():
  out = in_chunks(lambda x: D.hsv_to_rgb(x[:, 0], x[:, 1], x[:, 2]), ALL)
  np.testing.assert_array_equal(out, pil_all('HSV', 'RGB'))


@pytest.mark.parametrize('factor', [0., 0.63076925, 1., 1.1445783, 0.7, 1.3, 0.123, 1.9999])
def test_blend_every_level_pair(factor):
  """The first two factors hit a + f (b - a) within float32 rounding of an integer: a fused multiply-add gives
  23 for (65, 0, 0.63076925), Pillow 24."""
  a, b = np.repeat(np.arange(256), 256).reshape(256, 256), np.tile(np.arange(256), 256).reshape(256, 256)
  expected = np.asarray(Image.blend(Image.fromarray(a.astype(np.uint8)), Image.fromarray(b.astype(np.uint8)),
                                    factor))
  np.testing.assert_array_equal(jax.jit(D.blend)(a, b, np.float32(factor)), expected)


def random_image(r, h, w, smooth):
  if smooth:   # natural-image-like: neighbouring pixels close, a narrow level range
    return np.clip(np.cumsum(r.normal(0, 6, (h, w, 3)), 1) + r.integers(40, 200), 0, 255).astype(np.uint8)
  return r.integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize('op', ['brightness', 'contrast', 'saturation', 'hue'])
def test_single_ops_match_pillow(op):
  r = rng(1)
  host = {'brightness': A.adjust_brightness, 'contrast': A.adjust_contrast, 'saturation': A.adjust_saturation,
          'hue': A.adjust_hue}[op]
  canvas = 40
  dev = jax.jit(lambda x, f, hw: {
      'brightness': lambda: D.brightness(x, f), 'saturation': lambda: D.saturation(x, f),
      'contrast': lambda: D.contrast(x, f, (jnp.arange(canvas)[:, None] < hw[0]) & (jnp.arange(canvas) < hw[1])),
      'hue': lambda: D.hue(x, f.astype(jnp.int32))}[op]())
  for k in range(40):
    h, w = r.integers(5, canvas + 1, 2)
    img = random_image(r, h, w, smooth=k % 2)
    factor = r.uniform(-0.5, 0.5) if op == 'hue' else r.uniform(0, 2)
    x = np.zeros((canvas, canvas, 3), np.int32)
    x[:h, :w] = img                                    # the canvas padding must not enter the contrast mean
    f = np.float32(A.hue_levels(factor) if op == 'hue' else factor)
    out = np.asarray(dev(x, f, np.array([h, w])))
    np.testing.assert_array_equal(out[:h, :w], host(img, factor))


def test_color_jitter_random_order_and_disabled_ops():
  r = rng(2)
  fn = jax.jit(lambda rec: D.color_jitter(rec['canvas'].astype(jnp.int32), rec['jitter_order'], rec['jitter_on'],
                                          rec['jitter_factor'], (jnp.arange(48)[:, None] < rec['canvas_hw'][0]) &
                                          (jnp.arange(48) < rec['canvas_hw'][1])))
  orders = set()
  for k in range(60):
    h, w = r.integers(6, 49, 2)
    img = random_image(r, h, w, smooth=k % 2)
    strengths = [(0.3, 0.3, 0.3, 0.1), (0.9, 0.9, 0.9, 0.5), (0.3, 0., 0.3, 0.), (0., 0., 0., 0.2)][k % 4]
    jitter = A.jitter_params(*strengths, r)
    orders.add(tuple(jitter[0]))
    rec = A.photometric_record(img, jitter, A.random_crop_box((h, w), 16, r), 48)
    out = np.asarray(fn(rec))[:h, :w]
    np.testing.assert_array_equal(out, A.apply_jitter(img, *jitter))
  assert len(orders) > 10


def data_config(long_range, crop):
  return types.SimpleNamespace(resize_long=long_range, jitter=(0.4, 0.4, 0.4, 0.2), crop_size=crop)


@pytest.mark.slow
@pytest.mark.parametrize('long_range,crop', [((40, 64), 48), ((24, 32), 48), ((64, 96), 40)])
def test_seam_device_path_equals_host(long_range, crop):
  """SeamAugment(device=True) + batch_images gives seam_train_augment's images, padding (0) included."""
  cfg = data_config(long_range, crop)
  host, dev = ip.SeamAugment.from_config(cfg), ip.SeamAugment.from_config(cfg, device=True)
  r = rng(3)
  records = [{'id': str(i), 'image': random_image(r, *r.integers(20, 60, 2), smooth=i % 2),
              'label': np.zeros(20, np.float32)} for i in range(6)]
  expected = np.stack([host(rec, rng((9, i)))['image'] for i, rec in enumerate(records)])
  packed = [dev(rec, rng((9, i))) for i, rec in enumerate(records)]
  assert packed[0]['canvas'].shape == (max(long_range[1], crop),) * 2 + (3,) and 'image' not in packed[0]
  batch = {k: np.stack([p[k] for p in packed]) for k in packed[0]}
  out = jax.jit(D.input_images(crop))(batch)
  assert out.shape == expected.shape and out.dtype == jnp.float32
  np.testing.assert_array_equal(out, expected)
  # the accelerator form (vmap over the batch) gives the same images as the CPU form (one image after another)
  vmapped = jax.jit(jax.vmap(lambda rec: D.augment_image(rec, crop)))({k: batch[k] for k in D.KEYS})
  np.testing.assert_array_equal(vmapped, expected)
  np.testing.assert_array_equal(D.batch_images({'image': expected}, crop), expected)   # host batches pass through


@pytest.mark.slow
@pytest.mark.parametrize('normalize_before_crop', [False, True])
def test_affinity_device_path_equals_host(normalize_before_crop):
  r = rng(4)
  kw = dict(crop_size=40, jitter=(0.3, 0.3, 0.3, 0.1), radius=5, normalize_before_crop=normalize_before_crop)
  host, dev = at.AffinityAugment(**kw), at.AffinityAugment(**kw, device=True, canvas=64)
  flips = set()
  for i in range(8):
    h, w = r.integers(24, 60, 2)
    scores = r.random((h, w, 3)).astype(np.float32)
    rec = {'id': f'x{i}', 'image': random_image(r, h, w, smooth=i % 2), 'la': scores, 'ha': scores ** 2}
    expected, packed = host(rec, rng((5, i))), dev(rec, rng((5, i)))
    flips.add(bool(packed['flip']))
    np.testing.assert_array_equal(packed['aff_labels'], expected['aff_labels'])
    batch = jax.tree.map(lambda x: np.asarray(x)[None], {k: packed[k] for k in D.KEYS})
    out = jax.jit(D.input_images(40, normalize_before_crop))(batch)[0]
    np.testing.assert_array_equal(out, expected['image'])
  assert flips == {True, False}


def test_image_larger_than_canvas_is_a_data_error():
  img = np.zeros((30, 70, 3), np.uint8)
  with pytest.raises(errors.DataError, match='2007_000123: 30x70 pixels exceed .* 64'):
    A.photometric_record(img, A.jitter_params(0, 0, 0, 0, rng()), A.random_crop_box((30, 70), 16, rng()), 64,
                         name='2007_000123')


def test_tables_are_cached_and_give_pillows_formula():
  t = D.hsv_tables()
  assert D.hsv_tables() is t
  assert t['hue'].dtype == np.uint8 and t['w_x'].shape == (256 * 256,) and t['norm'].shape == (256, 3)
  # Pillow's C code: p = round(v * (1.0 - fs)), fs = (float) (s / 255.0), round half away from zero, in float64
  v, s = np.meshgrid(np.arange(256.), np.arange(1, 256), indexing='ij')
  exact = v * (1. - (s / 255.).astype(np.float32))
  np.testing.assert_array_equal(D.round_half_up(v.astype(np.float32) * t['w_p'][1:]), np.floor(exact + .5))
