"""File I/O shared by every stage: atomic writes (temp name, then rename) and readers that turn a missing or
corrupt file into one DataError naming it."""
import contextlib
import os
import pickle

import numpy as np
from PIL import Image

from seam_jax.common.errors import DataError


@contextlib.contextmanager
def atomic_path(path, suffix=''):
  """Yield a temporary path beside `path` (same folder, `suffix` kept for writers that infer a format from it);
  renamed onto `path` when the block succeeds, removed when it fails. A crash never leaves a half-written file
  under the final name."""
  d = os.path.dirname(path)
  if d:
    os.makedirs(d, exist_ok=True)
  tmp = f'{path}.tmp.{os.getpid()}{suffix}'
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def atomic_write(path, write_fn):
  """write_fn(binary file object), atomically."""
  with atomic_path(path) as tmp, open(tmp, 'wb') as f:
    write_fn(f)


def atomic_write_text(path, text):
  atomic_write(path, lambda f: f.write(text.encode()))


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


def save_label_png(path, label):
  """Write a class-index map as a VOC palette PNG, atomically."""
  im = Image.fromarray(np.asarray(label, np.uint8), mode='P')
  im.putpalette(voc_palette().reshape(-1).tolist())
  atomic_write(path, lambda f: im.save(f, format='PNG'))


def save_rgb_png(path, rgb):
  """Write an RGB uint8 HWC array as PNG, atomically."""
  atomic_write(path, lambda f: Image.fromarray(np.asarray(rgb, np.uint8)).save(f, format='PNG'))


def save_npy_dict(path, d):
  """np.save of a dict (pickled), as the original's CAM/CRF files; atomic."""
  atomic_write(path, lambda f: np.save(f, d, allow_pickle=True))


def load_npy_dict(path):
  """The dict of an np.save'd pickle (CAM / CRF / score files); missing or truncated -> DataError naming it."""
  if not os.path.isfile(path):
    raise DataError(f'file not found: {path}')
  try:
    return np.load(path, allow_pickle=True).item()
  except (OSError, ValueError, pickle.UnpicklingError, EOFError) as e:
    raise DataError(f'cannot read {path}: {e}') from None


def _open_image(path, read, what='image'):
  """read(PIL image) of the file at `path`; a missing or undecodable file raises DataError naming it."""
  if not os.path.isfile(path):
    raise DataError(f'{what} not found: {path}')
  try:
    with Image.open(path) as im:
      return read(im)
  except Exception as e:  # noqa: BLE001 - any decode failure is the same user error
    raise DataError(f'cannot decode {what} {path}: {e}') from None


def load_image(path):
  """RGB uint8 HWC of an image file (DataError naming a missing or corrupt file)."""
  return _open_image(path, lambda im: np.asarray(im.convert('RGB')))


def image_size(path):
  """(h, w) of an image file from its header (DataError naming a missing or corrupt file)."""
  return _open_image(path, lambda im: im.size[::-1])


def load_index_png(path, valid_values=None):
  """Single-channel index PNG (palette or grey) as uint8 HW; values outside `valid_values` -> DataError."""
  m = _open_image(path, np.asarray, 'mask')
  if m.ndim != 2:
    raise DataError(f'mask {path} is not a single-channel index image (shape {m.shape})')
  if valid_values is not None:
    bad = np.setdiff1d(np.unique(m), valid_values)
    if bad.size:
      raise DataError(f'mask {path} has values outside {describe(valid_values)}: {bad[:5].tolist()}')
  return m.astype(np.uint8)


def describe(values):
  v = sorted(int(x) for x in values)
  runs = [v[0], v[-1]] if v == list(range(v[0], v[-1] + 1)) else None
  return f'{runs[0]}..{runs[1]}' if runs else '/'.join(map(str, v))
