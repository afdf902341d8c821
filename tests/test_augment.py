"""SEAM training augmentations against hand-computed expectations (SEAM_SPEC section 3)."""
import types

import numpy as np
from PIL import Image
import pytest

from seam_jax.data import augment as T


class ScriptedRng:
  """Stands in for np.random.Generator: `integers` returns scripted offsets (checks placement and draw order)."""

  def __init__(self, *values):
    self.values = list(values)
    self.calls = []

  def integers(self, low, high):
    self.calls.append((low, high))
    return self.values.pop(0)


def rng(seed=0):
  return np.random.default_rng(seed)


@pytest.mark.parametrize('w,h,target,expected', [
    (500, 375, 448, (448, 336)),     # landscape: width is long
    (375, 500, 768, (576, 768)),     # portrait: 375 * 768 / 500 = 576
    (100, 100, 50, (50, 50)),        # square
    (200, 5, 100, (100, 2)),         # 2.5 rounds half to even (Python round, as the original)
    (200, 7, 100, (100, 4)),         # 3.5 -> 4
    (7, 200, 100, (4, 100)),
])
def test_long_side_size(w, h, target, expected):
  assert T.long_side_size(w, h, target) == expected


def test_random_resize_long_sizes_and_range():
  img = np.zeros((40, 50, 3), np.uint8)   # H 40, W 50
  out = T.random_resize_long(img, 60, 60, rng())
  assert isinstance(out, np.ndarray) and out.shape == (48, 60, 3)
  pil = T.random_resize_long(Image.fromarray(img), 60, 60, rng())
  assert isinstance(pil, Image.Image) and pil.size == (60, 48)
  longs = {T.random_resize_long(img, 10, 12, rng(s)).shape[1] for s in range(60)}
  assert longs == {10, 11, 12}            # inclusive range, nothing outside


def test_random_resize_long_is_pil_bicubic():
  img = rng(1).integers(0, 256, (30, 20, 3), dtype=np.uint8)
  out = T.random_resize_long(img, 45, 45, rng())
  ref = np.asarray(Image.fromarray(img).resize((30, 45), Image.Resampling.BICUBIC))
  np.testing.assert_array_equal(out, ref)


def test_hflip():
  a = np.array([[1, 2, 3], [4, 5, 6]], np.uint8)
  np.testing.assert_array_equal(T.hflip(a), [[3, 2, 1], [6, 5, 4]])
  np.testing.assert_array_equal(np.asarray(T.hflip(Image.fromarray(a))), [[3, 2, 1], [6, 5, 4]])
  flips = [T.random_hflip(a, rng(s))[1] for s in range(200)]
  assert 60 < sum(flips) < 140


def test_crop_larger_image_offsets_in_image():
  """W 10 > crop 8: the window moves in the image; H 6 < 8: the image moves in the zero container."""
  img = np.arange(1, 61, dtype=np.float32).reshape(6, 10)
  (out,), box = T.random_crop(img, size=8, rng=ScriptedRng(2, 1))  # left draw first, then top
  expected = np.zeros((8, 8), np.float32)
  expected[1:7, :] = img[:, 2:10]
  np.testing.assert_array_equal(out, expected)
  assert (box.img_left, box.cont_left, box.img_top, box.cont_top) == (2, 0, 0, 1)
  np.testing.assert_array_equal(box.valid(), expected > 0)


def test_crop_draw_ranges_and_order():
  r = ScriptedRng(0, 0)
  T.random_crop(np.zeros((6, 10)), size=8, rng=r)
  assert r.calls == [(0, 3), (0, 3)]      # column: 10 - 8 + 1 image offsets; row: 8 - 6 + 1 container offsets
  r = ScriptedRng(0, 0)
  T.random_crop(np.zeros((8, 8)), size=8, rng=r)
  assert r.calls == [(0, 1), (0, 1)]      # equal size: the single container offset 0


def test_crop_smaller_image_zero_container_and_joint_arrays():
  img = np.arange(1, 13, dtype=np.float32).reshape(3, 4, 1).repeat(3, -1)
  mask = np.arange(1, 13, dtype=np.uint8).reshape(3, 4)
  seen = set()
  for s in range(80):
    (ci, cm), box = T.random_crop(img, mask, size=5, rng=rng(s))
    t, l = box.cont_top, box.cont_left
    assert 0 <= t <= 2 and 0 <= l <= 1 and box.img_top == box.img_left == 0
    np.testing.assert_array_equal(ci[t:t + 3, l:l + 4], img)
    np.testing.assert_array_equal(cm[t:t + 3, l:l + 4], mask)   # same window for joint arrays
    assert ci.sum() == img.sum() and cm.sum() == mask.sum()        # zeros everywhere else
    assert ci.dtype == np.float32 and cm.dtype == np.uint8
    seen.add((t, l))
  assert seen == {(t, l) for t in range(3) for l in range(2)}


def test_crop_rejects_mismatched_arrays():
  with pytest.raises(ValueError, match='differ in size'):
    T.random_crop(np.zeros((4, 4)), np.zeros((4, 5)), size=3, rng=rng())


def test_jitter_factor_one_is_identity():
  img = rng(2).integers(0, 256, (9, 7, 3), dtype=np.uint8)
  for op in (T.adjust_brightness, T.adjust_contrast, T.adjust_saturation):
    np.testing.assert_array_equal(op(img, 1.0), img)
  np.testing.assert_array_equal(T.color_jitter(img, 0, 0, 0, 0, rng()), img)


def test_brightness_exact():
  """PIL blends with black in float32 and truncates: out = clip(trunc(x * f), 0, 255)."""
  img = rng(3).integers(0, 256, (16, 16, 3), dtype=np.uint8)
  for f in (0.7, 0.93, 1.21, 1.3):
    expected = np.clip(np.floor(img.astype(np.float32) * np.float32(f)), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(T.adjust_brightness(img, f), expected)


def test_contrast_and_saturation_zero():
  bw = np.array([[[0, 0, 0], [255, 255, 255]]], np.uint8)
  np.testing.assert_array_equal(T.adjust_contrast(bw, 0.), np.full_like(bw, 128))  # int(127.5 + 0.5)
  red = np.array([[[255, 0, 0]]], np.uint8)
  np.testing.assert_array_equal(T.adjust_saturation(red, 0.), [[[76, 76, 76]]])   # L = 0.299 * 255


def test_hue_shift_and_wrap_around():
  red = np.array([[[255, 0, 0]]], np.uint8)            # H = 0: -0.1 -> int8(-25.5) = -25 -> H 231 (326 deg)
  out = T.adjust_hue(red, -0.1)[0, 0]
  assert out[0] == 255 and out[1] == 0 and abs(int(out[2]) - 144) <= 1   # B = 255 * (1 - 26.1 / 60)
  pink = np.array([[[255, 0, 30]]], np.uint8)          # H = 250 (353 deg): +25 wraps to 19 (26.8 deg, orange)
  out = T.adjust_hue(pink, 0.1)[0, 0]
  assert out[0] == 255 and out[2] == 0 and abs(int(out[1]) - 114) <= 1   # G = 255 * 26.8 / 60
  with pytest.raises(ValueError):
    T.adjust_hue(red, 0.6)


def test_jitter_params_ranges_and_order():
  draws = [T.jitter_params(0.3, 0.3, 0.3, 0.1, rng(s)) for s in range(300)]
  for order, _ in draws:
    assert sorted(order) == [0, 1, 2, 3]
  f = np.array([fs for _, fs in draws])
  assert f[:, :3].min() >= 0.7 and f[:, :3].max() <= 1.3 and np.abs(f[:, 3]).max() <= 0.1
  assert f[:, :3].min() < 0.72 and f[:, :3].max() > 1.28 and f[:, 3].min() < -0.09
  assert len({tuple(o) for o, _ in draws}) > 12        # the order is random, not fixed
  order, fs = T.jitter_params(0, 0.5, 0, 0, rng())
  assert fs[0] is None and fs[2] is None and fs[3] is None and 0.5 <= fs[1] <= 1.5
  assert T.jitter_params(2.0, 0, 0, 0, rng(1))[1][0] >= 0   # factor range clipped at 0


def test_apply_jitter_follows_order():
  img = rng(4).integers(0, 256, (8, 8, 3), dtype=np.uint8)
  fs = [1.2, 0.8, None, 0.05]
  a = T.apply_jitter(img, [3, 0, 1, 2], fs)
  b = T.adjust_contrast(T.adjust_brightness(T.adjust_hue(img, 0.05), 1.2), 0.8)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, T.apply_jitter(img, [0, 1, 3, 2], fs))


def test_normalize_values():
  out = T.normalize(np.array([[[0, 0, 0], [255, 255, 255]]], np.uint8))
  assert out.dtype == np.float32
  np.testing.assert_allclose(out[0, 0], [-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225], rtol=1e-6)
  np.testing.assert_allclose(out[0, 1], [0.515 / 0.229, 0.544 / 0.224, 0.594 / 0.225], rtol=1e-6)


def cfg(long, crop):
  return types.SimpleNamespace(resize_long=(long, long), jitter=(0.3, 0.3, 0.3, 0.1), crop_size=crop)


@pytest.mark.parametrize('long,short,crop', [(32, 21, 40), (64, 43, 40)])   # image inside the crop / larger
def test_seam_train_augment_order_and_padding(long, short, crop):
  img = rng(5).integers(0, 256, (20, 30, 3), dtype=np.uint8)
  out = T.seam_train_augment(img, rng(7), cfg(long, crop))
  assert out.shape == (crop, crop, 3) and out.dtype == np.float32
  np.testing.assert_array_equal(out, T.seam_train_augment(img, rng(7), cfg(long, crop)))   # deterministic
  assert not np.array_equal(out, T.seam_train_augment(img, rng(8), cfg(long, crop)))
  # resize (30x20 -> long x short), flip, jitter, normalise, crop: replay the same draws step by step
  r = rng(7)
  x = T.random_resize_long(img, long, long, r)
  assert x.shape == (short, long, 3)
  x, _ = T.random_hflip(x, r)
  x = T.normalize(T.color_jitter(x, 0.3, 0.3, 0.3, 0.1, r))
  (expected,), box = T.random_crop(x, size=crop, rng=r)
  np.testing.assert_array_equal(out, expected)
  # padding is exactly 0 in normalised space (not black = -mean/std)
  assert (np.abs(out).sum(-1) == 0).sum() == crop * crop - min(short, crop) * min(long, crop)
  assert np.all(out[~box.valid()] == 0)
