"""PASCAL VOC 2012 facts and small file helpers shared by every stage (SEAM_SPEC sections 0 and 8)."""
import os
import pickle

import numpy as np
from PIL import Image

CLASSES = ('background', 'aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat', 'chair', 'cow',
           'diningtable', 'dog', 'horse', 'motorbike', 'person', 'pottedplant', 'sheep', 'sofa', 'train',
           'tvmonitor')
NUM_CLASSES = 21          # background + 20 foreground classes
NUM_FG = 20
IGNORE = 255
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


class DataError(Exception):
  """Bad input data; the message names the offending file or key."""


def voc_palette():
  """The standard VOC colour map: 256 x 3 uint8 (index 255 -> (224, 224, 192))."""
  pal = np.zeros((256, 3), np.uint8)
  for i in range(256):
    c, r, g, b = i, 0, 0, 0
    for j in range(8):
      r |= ((c >> 0) & 1) << (7 - j)
      g |= ((c >> 1) & 1) << (7 - j)
      b |= ((c >> 2) & 1) << (7 - j)
      c >>= 3
    pal[i] = (r, g, b)
  return pal


# (x / 255 - mean) / std computed in float64 then stored as float32, as the original does: a 256 x 3 lookup table.
_NORM_LUT = ((np.arange(256)[:, None] / 255. - np.array([0.485, 0.456, 0.406])) /
             np.array([0.229, 0.224, 0.225])).astype(np.float32)


def normalize(img_uint8):
  """HWC uint8 RGB -> float32 (x / 255 - mean) / std, bit-identical to the original's float64-then-cast."""
  img = np.asarray(img_uint8, np.uint8)
  return _NORM_LUT[img, np.arange(3)]


def parse_id(line):
  """Image id of a list line: plain `<id>` or the original `/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png`."""
  tok = line.strip().split()[0]
  if tok.endswith('.jpg') or '/' in tok:
    return os.path.splitext(os.path.basename(tok))[0]
  return tok


def read_list(path):
  """Ids of a list file (either format), in order."""
  if not os.path.isfile(path):
    raise DataError(f'list file not found: {path}')
  with open(path) as f:
    return [parse_id(l) for l in f if l.strip()]


def resolve_list(name_or_path, list_dir):
  """A list given by name (`train_aug` -> <list_dir>/train_aug.txt) or by path."""
  if os.path.isfile(name_or_path) or name_or_path.endswith('.txt'):
    return name_or_path
  return os.path.join(list_dir, name_or_path + '.txt')


def write_list(path, ids):
  atomic_write_text(path, ''.join(i + '\n' for i in ids))


def load_cls_labels(path):
  """cls_labels.npy (pickled dict id -> float32[20]) as written by the original and by `prepare`."""
  if not os.path.isfile(path):
    raise DataError(f'label file not found: {path} (run prepare.py first)')
  try:
    d = np.load(path, allow_pickle=True).item()
  except Exception as e:  # noqa: BLE001 - any decode failure is the same user error
    raise DataError(f'cannot read label file {path}: {e}') from None
  if not isinstance(d, dict):
    raise DataError(f'label file {path} does not hold a dict id -> 20-dim label')
  return d


def labels_for(ids, cls_labels, label_path='cls_labels'):
  """Stack the 20-dim labels of `ids`; an id without a label is an error naming it."""
  missing = [i for i in ids if i not in cls_labels]
  if missing:
    raise DataError(f'{len(missing)} listed ids have no label in {label_path}, e.g. {missing[:3]}')
  return np.stack([np.asarray(cls_labels[i], np.float32).reshape(NUM_FG) for i in ids])


def load_image(path):
  """RGB uint8 HWC; a missing or undecodable file raises DataError naming it."""
  if not os.path.isfile(path):
    raise DataError(f'image not found: {path}')
  try:
    with Image.open(path) as im:
      return np.asarray(im.convert('RGB'))
  except Exception as e:  # noqa: BLE001
    raise DataError(f'cannot decode image {path}: {e}') from None


def load_mask(path):
  """Class-index mask (palette or grey PNG) as uint8 HW; values must lie in 0..20 or 255."""
  if not os.path.isfile(path):
    raise DataError(f'mask not found: {path}')
  try:
    with Image.open(path) as im:
      m = np.asarray(im)
  except Exception as e:  # noqa: BLE001
    raise DataError(f'cannot decode mask {path}: {e}') from None
  if m.ndim != 2:
    raise DataError(f'mask {path} is not a single-channel index image (shape {m.shape})')
  bad = np.setdiff1d(np.unique(m), np.r_[np.arange(NUM_CLASSES), IGNORE])
  if bad.size:
    raise DataError(f'mask {path} has values outside 0..20/255: {bad[:5].tolist()}')
  return m.astype(np.uint8)


def save_label_png(path, label):
  """Write a class-index map as a VOC palette PNG, atomically."""
  im = Image.fromarray(np.asarray(label, np.uint8), mode='P')
  im.putpalette(voc_palette().reshape(-1).tolist())
  _atomic(path, lambda f: im.save(f, format='PNG'))


def save_npy_dict(path, d):
  """np.save of a dict (pickled), as the original's CAM/CRF files; atomic."""
  _atomic(path, lambda f: np.save(f, d, allow_pickle=True))


def load_npy_dict(path):
  if not os.path.isfile(path):
    raise DataError(f'file not found: {path}')
  try:
    return np.load(path, allow_pickle=True).item()
  except (OSError, ValueError, pickle.UnpicklingError, EOFError) as e:
    raise DataError(f'cannot read {path}: {e}') from None


def atomic_write_text(path, text):
  _atomic(path, lambda f: f.write(text.encode()))


def _atomic(path, write_fn):
  """Write to `<path>.tmp.<pid>` then rename, so a crash never leaves a half-written output."""
  d = os.path.dirname(path)
  if d:
    os.makedirs(d, exist_ok=True)
  tmp = f'{path}.tmp.{os.getpid()}'
  try:
    with open(tmp, 'wb') as f:
      write_fn(f)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
