"""File I/O shared by every stage: atomic writes (temp name, then rename) and readers that turn a missing or
corrupt file into one DataError naming it. Pickled .npy files (CAM / CRF dicts, cls_labels.npy) are read by a
restricted unpickler: numpy arrays, dicts, lists, tuples and scalars only, so a file that names any other callable
(a pickle that would run code) is refused before anything runs."""
import collections
import contextlib
import json
import os
import pickle

import numpy as np
from PIL import Image

from seam_jax.common.errors import DataError

try:
  from numpy._core import multiarray as _multiarray   # numpy >= 2 (1.x pickles name numpy.core: mapped below)
except ImportError:  # pragma: no cover - numpy 1.x
  from numpy.core import multiarray as _multiarray


_PROTECTED = []   # real paths of the folders no writer may touch: the user's data (protect)


@contextlib.contextmanager
def protecting(folders):
  """Within the block refuse (DataError) every write, move or removal through this module under `folders`: the data
  folders a run reads but did not create (seam_jax.runner). Nested blocks add to the outer ones."""
  before = list(_PROTECTED)
  _PROTECTED.extend(os.path.realpath(f) for f in folders)
  try:
    yield
  finally:
    _PROTECTED[:] = before


def check_writable(path):
  """DataError when `path` lies inside a protected folder (see protecting)."""
  real = os.path.realpath(path)
  for root in _PROTECTED:
    if real == root or real.startswith(root + os.sep):
      raise DataError(f'refusing to write {path}: it is inside the data folder {root}, which this run reads but '
                      'did not create (set the output paths elsewhere)')


def remove(path):
  """Remove one file (checked against the protected folders)."""
  check_writable(path)
  os.remove(path)


def move(src, dst):
  """Move a file or folder (both ends checked against the protected folders)."""
  check_writable(src)
  check_writable(dst)
  os.replace(src, dst)


@contextlib.contextmanager
def atomic_path(path, suffix=''):
  """Yield a temporary path beside `path` (same folder, `suffix` kept for writers that infer a format from it);
  renamed onto `path` when the block succeeds, removed when it fails. A crash never leaves a half-written file
  under the final name. Paths inside a protected folder are refused (protecting)."""
  check_writable(path)
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


class _SafeUnpickler(pickle.Unpickler):
  """What np.save pickles for arrays of objects (dicts of arrays, numpy scalars) and nothing else."""
  ALLOWED = {('numpy', 'ndarray'): np.ndarray, ('numpy', 'dtype'): np.dtype,
             ('collections', 'OrderedDict'): collections.OrderedDict}
  ALLOWED.update({(m, n): getattr(_multiarray, n) for m in ('numpy.core.multiarray', 'numpy._core.multiarray')
                  for n in ('_reconstruct', 'scalar')})

  def find_class(self, module, name):
    if (module, name) not in self.ALLOWED:
      raise pickle.UnpicklingError(f'refused to unpickle {module}.{name}: only numpy arrays, dicts, lists and '
                                   'scalars are allowed')
    return self.ALLOWED[module, name]


_NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def read_npy(path):
  """np.load of a .npy file, pickled object arrays through the restricted unpickler; DataError naming a missing,
  truncated or refused file."""
  if not os.path.isfile(path):
    raise DataError(f'file not found: {path}')
  try:
    with open(path, 'rb') as f:
      version = np.lib.format.read_magic(f)
      if version not in _NPY_HEADERS:
        raise ValueError(f'unsupported .npy format version {version}')
      _, _, dtype = _NPY_HEADERS[version](f)
      if dtype.hasobject:
        return _SafeUnpickler(f).load()
      f.seek(0)
      return np.load(f, allow_pickle=False)
  except (OSError, ValueError, pickle.UnpicklingError, EOFError, AttributeError, TypeError, IndexError) as e:
    raise DataError(f'cannot read {path}: {e}') from None


def load_npy_dict(path):
  """The dict of an np.save'd pickle (CAM / CRF / score files); missing, truncated, not a dict or refused by the
  restricted unpickler -> DataError naming it."""
  d = read_npy(path)
  d = d.item() if isinstance(d, np.ndarray) and d.shape == () else d
  if not isinstance(d, dict):
    raise DataError(f'{path} does not hold a dict (np.save of a dict expected)')
  return d


def read_json(path, what, hint=''):
  """The parsed JSON file `what` at path; missing or malformed is one DataError naming it (plus `hint`)."""
  if not os.path.isfile(path):
    raise DataError(f'{what} not found: {path}{hint}')
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise DataError(f'cannot parse {what} {path}: {e}') from None


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
