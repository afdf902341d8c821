"""The CAM / score-dict file format between stages (README "File formats between stages"): the one module that
writes, reads, checks and interprets these files.

Two kinds, both `np.save` of a pickled dict {int key: float HxW} (one H, W per file, the image's):
  * CAM dicts (kind CAM, <cam_dir>/<id>.npy): {c: CAM of foreground class c} for the classes 0..K-1 of the image
    label (maybe none);
  * score dicts (kind SCORES: CRF outputs, random-walk scores): {0: background, c + 1: class c}.
K, the number of foreground classes, is an argument (default 20, VOC). A CAM dict turns into per-pixel class
scores in three ways (SEAM_SPEC sections 4, 5, 7), one function each: a constant background threshold (evaluation,
CAM label PNGs: threshold_label), a background power over the present classes (the CRF: power_stack), a background
power over the dense K channels (the random walk: dense_power_stack). Class index = key + 1, background 0.
"""
import numpy as np

from seam_jax.common import files
from seam_jax.common.errors import DataError
from seam_jax.data import voc

NUM_FG = voc.NUM_FG
CAM, SCORES = 'cam', 'scores'


def validate(d, path='score dict', hw=None, kind=CAM, num_classes=NUM_FG):
  """`d` when it is a dict of `kind`: int keys (0..K-1 for CAMs; 0..K with the background 0 for score dicts), values
  2-D float arrays of one shape (`hw` when given); otherwise one DataError naming `path`."""
  if not isinstance(d, dict):
    raise DataError(f'{path} does not hold a dict class -> map')
  top = num_classes + (kind == SCORES)
  bad = [k for k in d if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or not 0 <= k < top]
  if bad:
    raise DataError(f'{path}: keys {bad[:3]!r} are not {kind} dict keys 0..{top - 1}')
  if kind == SCORES and 0 not in d:
    raise DataError(f'{path}: no background entry 0 (a score dict is {{0: background, c + 1: class c}})')
  want = None if hw is None else tuple(hw)
  for k, v in d.items():
    if not isinstance(v, np.ndarray) or v.ndim != 2 or not np.issubdtype(v.dtype, np.floating):
      raise DataError(f'{path}: entry {k} is not a 2-D float array but {type(v).__name__} {np.shape(v)}')
    want = want or v.shape
    if v.shape != want:
      raise DataError(f'{path}: the map of key {k} has shape {v.shape}, which does not match {want}')
  return d


def read(path, hw=None, kind=CAM, num_classes=NUM_FG):
  """The checked dict of a file (restricted unpickler: files.load_npy_dict); `hw`: the image size it must have."""
  return validate(files.load_npy_dict(path), path, hw, kind, num_classes)


def write(path, d, hw=None, kind=CAM, num_classes=NUM_FG):
  """Check `d` (of the image size `hw` when given) and write it atomically (keys and maps as given: the stages write
  float32)."""
  files.save_npy_dict(path, validate(d, path, hw, kind, num_classes))


def stack(cam, hw, num_classes=NUM_FG, path='CAM dict'):
  """Zero-filled (K, H, W) float32 of a CAM dict: class c at channel c."""
  validate(cam, path, hw, CAM, num_classes)
  t = np.zeros((num_classes,) + tuple(hw), np.float32)
  for c, v in cam.items():
    t[c] = v
  return t


def power_background(v, alpha, axis=0):
  """(1 - max over `axis` of v) ** alpha (float32): the background score of a stack of CAMs."""
  return (1 - v.max(axis, keepdims=True)) ** np.float32(alpha)


def power_stack(cam, hw, alpha, num_classes=NUM_FG, path='CAM dict'):
  """The CRF's unary input (SEAM_SPEC section 4): (labels (K'+1,), probs (K'+1, H, W) float32) with probs =
  [(1 - max_k v) ** alpha, v...] over the K' classes of the dict in dict order (not renormalised), labels =
  [0, c + 1...] the class index of each channel. No class: bg = 1."""
  validate(cam, path, hw, CAM, num_classes)
  v = np.stack([np.asarray(x, np.float32) for x in cam.values()]) if cam else np.zeros((0,) + tuple(hw), np.float32)
  bg = power_background(v, alpha) if cam else np.ones((1,) + tuple(hw), np.float32)
  return np.array([0] + [int(c) + 1 for c in cam]), np.concatenate([bg, v])


def dense_power_stack(cam, hw, alpha, num_classes=NUM_FG, path='CAM dict'):
  """The random walk's start (SEAM_SPEC section 7): (K + 1, H, W) float32, channel c + 1 = CAM c (absent: 0),
  channel 0 = (1 - max over the K channels) ** alpha (absent classes count, so bg <= 1)."""
  t = stack(cam, hw, num_classes, path)
  return np.concatenate([power_background(t, alpha), t])


def threshold_label(cam, hw, threshold, num_classes=NUM_FG, path='CAM dict'):
  """uint8 label map of a CAM dict with a constant background score (SEAM_SPEC section 5): argmax over
  [threshold, K dense channels] (ties -> lowest index: a tie with the threshold is background)."""
  t = stack(cam, hw, num_classes, path)
  return np.argmax(np.concatenate([np.full((1,) + tuple(hw), threshold, np.float32), t]), 0).astype(np.uint8)


def argmax_label(labels, probs):
  """uint8 label map: labels[argmax over the channels of probs] (ties -> the first channel)."""
  return np.asarray(labels, np.uint8)[np.argmax(probs, 0)]


def scores_label(scores, hw, num_classes=NUM_FG, path='score dict'):
  """uint8 label map of a score dict {0: bg, c + 1: class c}: the key of the highest score (first key in dict
  order at ties)."""
  validate(scores, path, hw, SCORES, num_classes)
  return argmax_label(list(scores), np.stack([np.asarray(v, np.float32) for v in scores.values()]))
