"""Weight files without their frameworks: PyTorch `.pth` (zip and pre-1.6 formats, through a restricted
unpickler: no arbitrary code runs), `.npz` state dicts, and MXNet NDArray `.params` lists, read and written with
NumPy. Names are left as stored; seam_jax.models.convert maps them onto Flax variables."""
import collections
import io
import pickle
import struct
import zipfile

import numpy as np

from seam_jax.common import files
from seam_jax.common.errors import DataError

# ----------------------------------------------------------------------------- .pth files

_STORAGE_DTYPES = {'DoubleStorage': '<f8', 'FloatStorage': '<f4', 'HalfStorage': '<f2', 'BFloat16Storage': 'bf16',
                   'LongStorage': '<i8', 'IntStorage': '<i4', 'ShortStorage': '<i2', 'CharStorage': 'i1',
                   'ByteStorage': 'u1', 'BoolStorage': '?'}
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c   # torch's magic number of the pre-1.6 (non-zip) format


def _frombuffer(raw, dtype):
  if dtype == 'bf16':   # no NumPy bfloat16: widen the 16 bits to float32
    return (np.frombuffer(raw, '<u2').astype(np.uint32) << 16).view(np.float32)
  return np.frombuffer(raw, dtype)


class _Storage:
  def __init__(self, dtype):
    self.dtype, self.data = dtype, None


class _Tensor:
  """A tensor whose storage bytes are read after unpickling."""

  def __init__(self, storage, offset, size, stride):
    self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

  def numpy(self):
    storage, view_offset = self.storage
    flat = storage.data[view_offset + self.offset:]
    return np.lib.stride_tricks.as_strided(flat, self.size, [s * flat.itemsize for s in self.stride]).copy()


def _rebuild_tensor_v2(storage, storage_offset, size, stride, *unused):
  return _Tensor(storage, storage_offset, size, stride)


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickles a state dict only: OrderedDict, torch's tensor rebuild function and storage types."""

  def __init__(self, f, storages):
    super().__init__(f)
    self.storages = storages

  def find_class(self, module, name):
    if (module, name) == ('collections', 'OrderedDict'):
      return collections.OrderedDict
    if (module, name) == ('torch._utils', '_rebuild_tensor_v2'):
      return _rebuild_tensor_v2
    if module == 'torch' and name in _STORAGE_DTYPES:
      return _STORAGE_DTYPES[name]
    raise pickle.UnpicklingError(f'{module}.{name} is not allowed in a weights file')

  def persistent_load(self, pid):
    kind, dtype, key, _, _, *view = pid   # ('storage', type, key, location, numel[, view metadata])
    if kind != 'storage':
      raise pickle.UnpicklingError(f'unsupported persistent id {kind!r}')
    st = self.storages.setdefault(key, _Storage(dtype))
    return st, (view[0][1] if view and view[0] is not None else 0)


def _read_zip_pth(path):
  with zipfile.ZipFile(path) as z:
    pkl = next(n for n in z.namelist() if n.endswith('/data.pkl') or n == 'data.pkl')
    prefix = pkl[:-len('data.pkl')]
    storages = {}
    obj = _RestrictedUnpickler(io.BytesIO(z.read(pkl)), storages).load()
    if prefix + 'byteorder' in z.namelist() and z.read(prefix + 'byteorder') != b'little':
      raise DataError(f'{path}: big-endian .pth files are not supported')
    for key, st in storages.items():
      st.data = _frombuffer(z.read(f'{prefix}data/{key}'), st.dtype)
  return obj


def _read_legacy_pth(path):
  """The pre-1.6 format: pickles of magic, protocol, sys info, the object, the storage keys; then each storage
  as int64 element count + little-endian bytes."""
  with open(path, 'rb') as f:
    if _RestrictedUnpickler(f, {}).load() != _LEGACY_MAGIC:
      raise DataError(f'{path}: not a PyTorch file')
    _RestrictedUnpickler(f, {}).load()
    _RestrictedUnpickler(f, {}).load()
    storages = {}
    obj = _RestrictedUnpickler(f, storages).load()
    for key in _RestrictedUnpickler(f, {}).load():
      st = storages[key]
      (count,) = struct.unpack('<q', f.read(8))
      itemsize = 2 if st.dtype == 'bf16' else np.dtype(st.dtype).itemsize
      st.data = _frombuffer(f.read(count * itemsize), st.dtype)
  return obj


def _torch_load(path):
  import torch  # pylint: disable=g-import-not-at-top
  obj = _unwrap(torch.load(path, map_location='cpu', weights_only=True))
  conv = lambda v: (v.float() if v.dtype == torch.bfloat16 else v).detach().numpy() if torch.is_tensor(v) else v
  return {k: conv(v) for k, v in obj.items()} if isinstance(obj, dict) else obj


def _unwrap(obj):
  """Training checkpoints often wrap the weights as {'state_dict': ..., 'epoch': ...}."""
  return obj['state_dict'] if isinstance(obj, dict) and isinstance(obj.get('state_dict'), dict) else obj


def has_torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top,unused-import
    return True
  except ImportError:
    return False


def read_pth(path, use_torch=None):
  """State dict (name -> np.ndarray) of a .pth; `use_torch` None = torch if importable, else a NumPy reader."""
  use_torch = has_torch() if use_torch is None else use_torch
  try:
    if use_torch:
      obj = _torch_load(path)
    else:
      obj = _read_zip_pth(path) if zipfile.is_zipfile(path) else _read_legacy_pth(path)
  except DataError:
    raise
  except pickle.UnpicklingError as e:   # a pickle naming other objects than tensors (code it would run): refused
    lines = str(e).splitlines()
    detail = next((l.strip() for l in lines if 'GLOBAL' in l or 'global' in l), lines[0] if lines else '')
    raise DataError(f'{path}: refused to unpickle, a weights file holds tensors only ({detail})') from None
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f'{path}: cannot read as a PyTorch weights file ({type(e).__name__}: {e})') from e
  obj = _unwrap(obj)
  if not isinstance(obj, dict):
    raise DataError(f'{path}: holds a {type(obj).__name__}, not a state dict')
  obj = {k: v.numpy() if isinstance(v, _Tensor) else v for k, v in obj.items()}
  bad = [k for k, v in obj.items() if not isinstance(v, np.ndarray)]
  if bad:
    raise DataError(f'{path}: non-tensor entries in the state dict: {sorted(bad)[:4]}')
  return obj


def write_pth(path, sd):
  """torch.save of the state dict (atomic); needs PyTorch."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise RuntimeError('writing a .pth file needs PyTorch (pip install torch); .npz needs nothing') from e
  with files.atomic_path(path) as tmp:
    torch.save(collections.OrderedDict((k, torch.from_numpy(np.ascontiguousarray(v))) for k, v in sd.items()), tmp)


def write_npz(path, sd):
  with files.atomic_path(path, '.npz') as tmp:
    np.savez(tmp, **sd)


def read_npz(path):
  try:
    with np.load(path, allow_pickle=False) as z:
      return {k: z[k] for k in z.files}
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f'{path}: cannot read as .npz ({type(e).__name__}: {e})') from e


# ----------------------------------------------------------------------------- MXNet .params
# Layout followed (apache/mxnet src/ndarray/ndarray.cc NDArray::Save/Load/LegacyLoad and the list Save/Load,
# include/mxnet/tuple.h TShape::Save, include/mxnet/base.h Context::Save, dmlc-core serializer.h), little endian:
#   file: uint64 0x112, uint64 reserved, uint64 n, n NDArrays, uint64 m (= n), m x (uint64 length, bytes).
#   NDArray V2 / V3: uint32 magic 0xF993FAC9 / 0xF993FACA, int32 storage type (0 = dense; sparse unsupported),
#     shape (int32 ndim, ndim x int64), context (int32 dev_type, int32 dev_id), int32 type flag, raw data.
#   V1: uint32 0xF993FAC8, then the same from the shape on (no storage type).
#   legacy: no magic; the first uint32 is ndim and the dims are uint32.
#   ndim 0 (-1 for V3) is an empty NDArray: nothing follows.
_MX_LIST_MAGIC, _MX_V1, _MX_V2, _MX_V3 = 0x112, 0xF993FAC8, 0xF993FAC9, 0xF993FACA
_MX_DTYPES = ('<f4', '<f8', '<f2', 'u1', '<i4', 'i1', '<i8')   # mshadow type flags 0..6


class _Bytes:
  def __init__(self, raw, path):
    self.raw, self.pos, self.path = raw, 0, path

  def take(self, n):
    if n < 0 or self.pos + n > len(self.raw):
      raise DataError(f'{self.path}: truncated or corrupt MXNet NDArray file at byte {self.pos}')
    self.pos += n
    return self.raw[self.pos - n:self.pos]

  def num(self, fmt):
    return struct.unpack('<' + fmt, self.take(struct.calcsize(fmt)))[0]

  def array(self, dtype, n):
    return np.frombuffer(self.take(n * np.dtype(dtype).itemsize), dtype)


def _read_mx_ndarray(r):
  magic = r.num('I')
  if magic in (_MX_V2, _MX_V3):
    if r.num('i') != 0:
      raise DataError(f'{r.path}: sparse NDArrays are not supported')
  if magic in (_MX_V1, _MX_V2, _MX_V3):
    ndim = r.num('i')
    shape = tuple(int(d) for d in r.array('<i8', max(ndim, 0)))
  else:
    ndim, shape = magic, tuple(int(d) for d in r.array('<u4', magic))
  if ndim < 0 or (ndim == 0 and magic != _MX_V3):
    return None
  r.num('i'), r.num('i')   # context: dev_type, dev_id
  flag = r.num('i')
  if not 0 <= flag < len(_MX_DTYPES):
    raise DataError(f'{r.path}: unsupported MXNet type flag {flag}')
  return r.array(_MX_DTYPES[flag], int(np.prod(shape))).reshape(shape).copy()


def read_mxnet_params(path):
  """name -> np.ndarray of an MXNet NDArray list file (e.g. `arg:res2a_branch2a_weight`), no MXNet needed."""
  with open(path, 'rb') as f:
    r = _Bytes(f.read(), path)
  if len(r.raw) < 16 or r.num('Q') != _MX_LIST_MAGIC:
    raise DataError(f'{path}: not an MXNet NDArray file (bad header)')
  r.num('Q')
  arrays = [_read_mx_ndarray(r) for _ in range(r.num('Q'))]
  try:
    names = [r.take(r.num('Q')).decode('utf-8') for _ in range(r.num('Q'))]
  except UnicodeDecodeError:
    raise DataError(f'{path}: corrupt MXNet NDArray file (a tensor name is not UTF-8)') from None
  if arrays and not names:
    raise DataError(f'{path}: {len(arrays)} MXNet arrays without names (saved from a list, not a dict of named '
                    'parameters), so which layer each one belongs to is unknown')
  if len(names) != len(arrays):
    raise DataError(f'{path}: {len(arrays)} arrays but {len(names)} names')
  if len(set(names)) != len(names):
    raise DataError(f'{path}: names stored twice: {sorted({k for k in names if names.count(k) > 1})[:4]}')
  return {k: v for k, v in zip(names, arrays) if v is not None}


def write_mxnet_params(path, d):
  """Write name -> array in the MXNet NDArray list format (V2, dense, CPU context), as `mx.nd.save` does."""
  flags = {np.dtype(t): i for i, t in enumerate(_MX_DTYPES)}
  out = [struct.pack('<QQQ', _MX_LIST_MAGIC, 0, len(d))]
  for v in d.values():
    v = np.ascontiguousarray(v)
    out += [struct.pack('<Iii', _MX_V2, 0, v.ndim), struct.pack(f'<{v.ndim}q', *v.shape),
            struct.pack('<iii', 1, 0, flags[v.dtype.newbyteorder('<')]), v.astype(v.dtype.newbyteorder('<')).tobytes()]
  out.append(struct.pack('<Q', len(d)))
  for k in d:
    out += [struct.pack('<Q', len(k.encode())), k.encode()]
  files.atomic_write(path, lambda f: f.write(b''.join(out)))
