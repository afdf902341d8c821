"""PASCAL VOC 2012 facts, lists and image-level labels (SEAM_SPEC sections 0 and 8)."""
import os

import numpy as np

from seam_jax.common import files
from seam_jax.common.errors import DataError

CLASSES = ('background', 'aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat', 'chair', 'cow',
           'diningtable', 'dog', 'horse', 'motorbike', 'person', 'pottedplant', 'sheep', 'sofa', 'train',
           'tvmonitor')
NUM_CLASSES = 21          # background + 20 foreground classes
NUM_FG = 20
IGNORE = 255
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


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
  """Ids of a list file (either format), in order; a missing or empty list, or one naming an id twice, is a
  DataError naming the file."""
  if not os.path.isfile(path):
    raise DataError(f'list file not found: {path}')
  with open(path) as f:
    ids = [parse_id(l) for l in f if l.strip()]
  if not ids:
    raise DataError(f'list file {path} is empty')
  if len(set(ids)) < len(ids):
    seen = set()
    twice = [i for i in ids if i in seen or seen.add(i)]
    raise DataError(f'list file {path} names {len(twice)} ids more than once, e.g. {sorted(set(twice))[:3]}')
  return ids


def resolve_list(name_or_path, list_dir):
  """A list given by name (`train_aug` -> <list_dir>/train_aug.txt) or by path."""
  if os.path.isfile(name_or_path) or name_or_path.endswith('.txt'):
    return name_or_path
  return os.path.join(list_dir, name_or_path + '.txt')


def write_list(path, ids):
  files.atomic_write_text(path, ''.join(i + '\n' for i in ids))


def load_cls_labels(path):
  """cls_labels.npy (pickled dict id -> float32[K], K = 20 for VOC) as written by the original and by `prepare`."""
  if not os.path.isfile(path):
    raise DataError(f'label file not found: {path} (run prepare.py first)')
  try:
    d = files.read_npy(path).item()   # restricted unpickler: a pickle naming other callables is refused
  except DataError:
    raise
  except Exception as e:  # noqa: BLE001 - any decode failure is the same user error
    raise DataError(f'cannot read label file {path}: {e}') from None
  if not isinstance(d, dict):
    raise DataError(f'label file {path} does not hold a dict id -> image label')
  return d


def labels_for(ids, cls_labels, label_path='cls_labels', num_fg=NUM_FG):
  """Stack the `num_fg`-dim (K) labels of `ids` into float32 (N, K); an id without a label, or with a label of
  another width, is an error naming it and the file."""
  missing = [i for i in ids if i not in cls_labels]
  if missing:
    raise DataError(f'{len(missing)} listed ids have no label in {label_path}, e.g. {missing[:3]}')
  wrong = [i for i in ids if np.size(cls_labels[i]) != num_fg]
  if wrong:
    raise DataError(f'{label_path}: label of {wrong[0]!r} has {np.size(cls_labels[wrong[0]])} entries, expected '
                    f'{num_fg} (one per foreground class; {len(wrong)} such ids)')
  return np.stack([np.asarray(cls_labels[i], np.float32).reshape(num_fg) for i in ids])


def load_mask(path, num_fg=NUM_FG, ignore=IGNORE):
  """Class-index mask (palette or grey PNG) as uint8 HW; values must lie in 0..num_fg (K) or `ignore`."""
  return files.load_index_png(path, np.r_[np.arange(num_fg + 1), ignore])
