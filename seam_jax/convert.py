"""Weights of the original release <-> seam_jax variables (SEAM_SPEC sections 1, 2 and 6).

State dicts use the original PyTorch names (`b4_3.bn_branch2a.running_mean`, `fc8.weight`, ...) as NumPy arrays;
Flax variables mirror those names, so conversion is a rename plus OIHW <-> HWIO for conv kernels:
  `<m>.weight` (conv) <-> params/<m>/kernel, `<m>.weight|bias` (BN) <-> params/<m>/scale|bias,
  `<m>.running_mean|running_var` <-> batch_stats/<m>/mean|var; backbone modules live under `backbone/`.
Sources: PyTorch `.pth` (read with torch, or without it by a restricted unpickler), `.npz` of a state dict, and
the MXNet ImageNet `.params` of ResNet38 (read with NumPy, names mapped as in the original).

CLI: `python -m seam_jax.convert --src IN --dst OUT --kind seam|affinity [--width_div 1]` converts a .pth / .npz
/ .params into an export folder, or an export folder into a .pth / .npz.
"""
import argparse
import collections
import io
import os
import pickle
import struct
import sys
import zipfile

from absl import logging
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from seam_jax import checkpoints
from seam_jax import models
from seam_jax.voc import DataError

_LEAF_NAMES = {('params', 'kernel'): 'weight', ('params', 'scale'): 'weight', ('params', 'bias'): 'bias',
               ('batch_stats', 'mean'): 'running_mean', ('batch_stats', 'var'): 'running_var'}
_HEADS = {'seam': models.seam.NEW_LAYERS, 'affinity': models.affinity.NEW_LAYERS}


# ----------------------------------------------------------------------------- names and layouts

def torch_name(collection, path):
  """('params', ('backbone', 'b4_3', 'bn_branch2a', 'scale')) -> 'b4_3.bn_branch2a.weight'."""
  modules = path[1:-1] if path[0] == 'backbone' else path[:-1]
  return '.'.join(modules + (_LEAF_NAMES[collection, path[-1]],))


def _entries(variables):
  """(torch name, collection, path, array) for every leaf of {'params', 'batch_stats'}."""
  for col in ('params', 'batch_stats'):
    for path, x in flax.traverse_util.flatten_dict(flax.core.unfreeze(variables.get(col, {}))).items():
      yield torch_name(col, path), col, path, x


def _to_torch(path, x):
  x = np.asarray(jax.device_get(x))
  return np.ascontiguousarray(x.transpose(3, 2, 0, 1)) if path[-1] == 'kernel' else x   # HWIO -> OIHW


def _from_torch(path, x):
  return np.ascontiguousarray(np.asarray(x).transpose(2, 3, 1, 0)) if path[-1] == 'kernel' else np.asarray(x)


def _torch_shape(path, shape):
  return tuple(shape[i] for i in (3, 2, 0, 1)) if path[-1] == 'kernel' else tuple(shape)


def clean_state_dict(sd):
  """Strip DataParallel's 'module.' prefix and drop BN `num_batches_tracked` counters."""
  out = {}
  for k, v in sd.items():
    k = k[len('module.'):] if k.startswith('module.') else k
    if not k.endswith('num_batches_tracked'):
      out[k] = v
  return out


def model_config(width_div=1, dtype='float32'):
  return ml_collections.ConfigDict({'width_div': int(width_div), 'dtype': dtype})


def abstract_variables(kind, model_config_):
  """Shapes/dtypes of the model's variables, without allocating them (works for any width_div)."""
  model = models.build(kind, model_config_)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3), jnp.float32))


def init_variables(kind, model_config_, seed=0):
  """Freshly initialised variables (the original's init distributions for the head layers).

  Uses an RBG key: with ~150 parameter tensors, threefry makes XLA's CPU compile of `init` several times slower.
  """
  model = models.build(kind, model_config_)
  return jax.jit(model.init)(jax.random.key(seed, impl='rbg'), jnp.zeros((1, 32, 32, 3), jnp.float32))


def _few(keys, n=4):
  keys = sorted(keys)
  return ', '.join(keys[:n]) + (f' (+{len(keys) - n} more)' if len(keys) > n else '')


def _guess_kind(keys):
  """The model kind whose head layers are exactly those found among `keys`, if any."""
  tops = {k.split('.')[0] for k in keys}
  return next((kind for kind, h in _HEADS.items() if tops & set().union(*_HEADS.values()) == set(h)), None)


# ----------------------------------------------------------------------------- state dict <-> variables

def _assign(template, sd, names, source, kind, model_config_):
  """`template` with the leaves named `names` replaced by sd[name] (torch layout); shape mismatch -> DataError."""
  flat = {col: flax.traverse_util.flatten_dict(flax.core.unfreeze(template[col])) for col in template}
  entries = {t: (col, p, x) for t, col, p, x in _entries(template) if t in names}
  bad = [f'{t} {tuple(np.shape(sd[t]))} vs model {_torch_shape(p, x.shape)}' for t, (_, p, x) in entries.items()
         if tuple(np.shape(sd[t])) != _torch_shape(p, x.shape)]
  if bad:
    raise DataError(f'{source}: tensor shapes do not match the {kind} model of width_div '
                    f'{model_config_.width_div} (weights of another width?): {_few(bad, 3)}')
  for t, (col, p, x) in entries.items():
    flat[col][p] = _from_torch(p, np.asarray(sd[t], x.dtype))
  return {col: flax.traverse_util.unflatten_dict(f) for col, f in flat.items()}


def state_dict_to_variables(sd, kind, model_config_, name='state dict'):
  """Strict conversion of an original state dict (name -> array) into {'params', 'batch_stats'} of `kind`.

  Every model tensor must be present with the right shape and nothing else may be there; errors name `name`.
  """
  sd = clean_state_dict(sd)
  shapes = abstract_variables(kind, model_config_)
  expected = {t for t, *_ in _entries(shapes)}
  missing, unexpected = expected - set(sd), set(sd) - expected
  if missing or unexpected:
    guess = _guess_kind(sd)
    hint = f'this looks like a {guess} checkpoint' if guess and guess != kind else 'not a checkpoint of this model'
    raise DataError(f'{name}: checkpoint of the wrong model for {kind!r} ({hint}); missing keys: '
                    f'{_few(missing) or "none"}; unexpected keys: {_few(unexpected) or "none"}')
  return _assign(shapes, sd, expected, name, kind, model_config_)


def variables_to_state_dict(variables, kind):
  """Exact inverse of `state_dict_to_variables`: original names, OIHW kernels, NumPy arrays."""
  top = set(variables['params'])
  if top != {'backbone', *_HEADS[kind]}:
    raise ValueError(f'variables of modules {sorted(top)} are not a {kind} model')
  return {t: _to_torch(path, x) for t, _, path, x in sorted(_entries(variables), key=lambda e: e[2][:-1])}


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
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f'{path}: cannot read as a PyTorch weights file ({type(e).__name__}: {e})') from e
  obj = _unwrap(obj)
  if not isinstance(obj, dict):
    raise DataError(f'{path}: holds a {type(obj).__name__}, not a state dict')
  obj = {k: v.numpy() if isinstance(v, _Tensor) else v for k, v in obj.items()}
  bad = [k for k, v in obj.items() if not isinstance(v, np.ndarray)]
  if bad:
    raise DataError(f'{path}: non-tensor entries in the state dict: {_few(bad)}')
  return obj


def write_pth(path, sd):
  """torch.save of the state dict (atomic); needs PyTorch."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise RuntimeError('writing a .pth file needs PyTorch (pip install torch); .npz needs nothing') from e
  tmp = path + '.tmp'
  torch.save(collections.OrderedDict((k, torch.from_numpy(np.ascontiguousarray(v))) for k, v in sd.items()), tmp)
  os.replace(tmp, path)


def write_npz(path, sd):
  tmp = path + '.tmp.npz'
  np.savez(tmp, **sd)
  os.replace(tmp, path)


def load_pth(path, kind, model_config_):
  """Strictly load an original .pth (SEAM or AffinityNet) as variables of `kind`."""
  return state_dict_to_variables(read_pth(path), kind, model_config_, name=path)


def load_npz(path, kind, model_config_):
  return state_dict_to_variables(read_npz(path), kind, model_config_, name=path)


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
  names = [r.take(r.num('Q')).decode('utf-8') for _ in range(r.num('Q'))]
  if len(names) != len(arrays):
    raise DataError(f'{path}: {len(arrays)} arrays but {len(names)} names')
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
  with open(path + '.tmp', 'wb') as f:
    f.write(b''.join(out))
  os.replace(path + '.tmp', path)


_BN_PARAMS = {'beta': 'bias', 'gamma': 'weight', 'mean': 'running_mean', 'var': 'running_var'}


def mxnet_to_torch_names(d):
  """The original's mapping of the ImageNet ResNet38 names (SEAM_SPEC section 1); the classifier is dropped."""
  out = {}
  for key, v in d.items():
    toks = key.split(':', 1)[-1].split('_')
    t0 = toks[0]
    if 'linear1000' in t0:
      continue
    if 'conv1a' in t0:
      name = 'conv1a.weight'
    elif len(toks) > 1 and 'branch' in toks[1]:
      block = f'b{t0[-2]}' if t0[-1] == 'a' else f'b{t0[-3]}_{t0[-1]}'
      is_conv = t0.startswith('res')
      name = f'{block}.{"conv" if is_conv else "bn"}_{toks[1]}.' + (
          'weight' if is_conv else _BN_PARAMS.get(toks[-1], toks[-1]))
    else:
      name = f'bn7.{_BN_PARAMS.get(toks[-1], toks[-1])}'
    out[name] = v
  return out


# ----------------------------------------------------------------------------- ImageNet initialisation

def read_weights(path):
  """Original-named state dict of a .pth, .npz or MXNet .params file."""
  if not os.path.isfile(path):
    raise DataError(f'weights file not found: {path}')
  if path.endswith('.params'):
    return mxnet_to_torch_names(read_mxnet_params(path))
  if path.endswith('.npz'):
    return clean_state_dict(read_npz(path))
  if path.endswith('.pth'):
    return clean_state_dict(read_pth(path))
  raise DataError(f'{path}: unknown weights format (expected .params, .pth or .npz)')


def imagenet_init(variables, path, kind, model_config_):
  """Non-strict load of the ResNet38 backbone from `path` into `variables`; the head keeps its init.

  Shape mismatches are errors (as in torch's non-strict load); absent tensors keep their init and are logged.
  """
  sd = read_weights(path)
  backbone = {t for t, _, p, _ in _entries(variables) if p[0] == 'backbone'}
  loaded = backbone & set(sd)
  if not loaded:
    raise DataError(f'{path}: no ResNet38 backbone tensor found (keys like {_few(sd, 3)})')
  variables = _assign(variables, sd, loaded, path, kind, model_config_)
  missing, unused = backbone - loaded, set(sd) - loaded
  logging.info('%s: loaded %d of %d backbone tensors; %d missing%s; %d unused%s', path, len(loaded), len(backbone),
               len(missing), f' ({_few(missing)})' if missing else '', len(unused),
               f' ({_few(unused)})' if unused else '')
  return variables


# ----------------------------------------------------------------------------- CLI

def convert(src, dst, kind, width_div=1):
  """.pth / .npz -> export folder (strict), .params -> export folder (backbone; head from init),
  export folder -> .pth / .npz."""
  cfg = model_config(width_div)
  if os.path.isdir(src):
    sd = variables_to_state_dict(checkpoints.load_variables(src, kind, cfg), kind)
    if dst.endswith('.npz'):
      return write_npz(dst, sd)
    if dst.endswith('.pth'):
      return write_pth(dst, sd)
    raise DataError(f'{dst}: destination of an export folder must end in .pth or .npz')
  checkpoints.save_export(dst, checkpoints.load_variables(src, kind, cfg), kind, cfg)


def main(argv=None):
  p = argparse.ArgumentParser(prog='python -m seam_jax.convert', description=convert.__doc__)
  p.add_argument('--src', required=True)
  p.add_argument('--dst', required=True)
  p.add_argument('--kind', required=True, choices=sorted(models.MODELS))
  p.add_argument('--width_div', type=int, default=1)
  args = p.parse_args(argv)
  logging.set_verbosity(logging.INFO)
  try:
    convert(args.src, args.dst, args.kind, args.width_div)
  except DataError as e:
    sys.exit(f'error: {e}')
  print(f'wrote {args.dst}')


if __name__ == '__main__':
  main()
