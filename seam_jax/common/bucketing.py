"""Shape bucketing and the bucketed device loop shared by every inference-type stage.

Inputs of varied sizes are zero-padded (bottom/right) to a few bucketed shapes; pieces of equal padded shape,
from any images, share a batch and one compiled executable. `DeviceLoop` is a function jitted over a mesh of this
process's devices (variables replicated, batch sharded on 'data'; each process of a multi-host run works on its own
images) with an explicit cache of compiled executables, one per padded shape; `schedule` streams the pieces of many
images through it with bounded host memory and a bounded number of batches in flight on the devices.

A piece is what one batch row holds: a dict of arrays of one padded shape plus host metadata; its output comes back
as the same row of the function's outputs, cropped to the piece's valid extent.
"""
import collections
import dataclasses
from typing import Any, Optional

import jax
import numpy as np

from seam_jax.common import sharding

STRIDE = 8  # the networks' output stride: three stride-2 stages, each ceil(n / 2)


def low_res(n):
  """Size of the stride-8 feature map of an input of size n."""
  return -(-n // STRIDE)


def padded(n, bucket):
  """n rounded up to a multiple of `bucket` and of the stride (so the stride-8 map tiles the padded input);
  bucket <= 1: n itself (no padding)."""
  b = int(np.lcm(max(int(bucket), 1), STRIDE)) if bucket > 1 else 1
  return -(-n // b) * b


def padded_size(h, w):
  """Image size rounded up to multiples of the stride (the padded network input of the random walk)."""
  return padded(h, STRIDE), padded(w, STRIDE)


def grid_size(h, w):
  """The stride-8 feature grid of an h x w image."""
  return low_res(h), low_res(w)


@dataclasses.dataclass
class Piece:
  arrays: dict                     # name -> np.ndarray of one padded shape: one batch row of the function's input
  meta: Any = None                 # host data returned with the output
  crop: Optional[tuple] = None     # valid extent of each output's leading axes (None: the whole row)


def shape_key(arrays):
  """Hashable (name, shape, dtype) signature of one row: rows of equal key share a batch and an executable."""
  return tuple((k, tuple(v.shape), np.dtype(v.dtype).str) for k, v in sorted(arrays.items()))


def auto_batch_size(mesh):
  """Rows per step when the config says 0: one per device on CPU, where a step is compute-bound and a bigger batch
  only adds the zero rows that fill each shape's last batch (measured, demo-size CAM inference on 2 cores:
  0.144 s/image at 1 or 2 views per step, 0.244 at 8, 0.43 at 16); 8 (at least one per device) on accelerators."""
  n = mesh.size
  return n if sharding.platform(mesh) == 'cpu' else max(8, n)


class DeviceLoop:
  """fn(variables, batch dict) -> outputs (a tree of arrays with the batch as leading axis), jitted over a 1-D mesh
  of this process's devices (`fn`, the jitted function; `batch_specs`, its batch argument for a row signature); one
  compilation per row signature (`shape_key`), counted in `compilations`. `batch_size` is rounded up to a multiple
  of the device count (0: `auto_batch_size`). `fast_compile`: compile without LLVM optimisation when the mesh is on
  CPU (sharding.compiler_options: the many shapes of a small run compile several times faster)."""

  def __init__(self, fn, variables, batch_size, mesh=None, fast_compile=False):
    self.mesh = mesh or sharding.make_mesh(local=True)
    n = self.mesh.size
    if int(batch_size) < 0:
      raise ValueError(f'batch size {batch_size} < 0 (0 = auto)')
    self.batch_size = -(-(int(batch_size) or auto_batch_size(self.mesh)) // n) * n
    repl, self._data = sharding.replicated(self.mesh), sharding.data_sharded(self.mesh)
    self.variables = jax.device_put(variables, repl)
    self.fn = jax.jit(fn, in_shardings=(repl, self._data), out_shardings=self._data)
    self._compiled = {}
    self._options = sharding.compiler_options(fast_compile, sharding.platform(self.mesh))

  @property
  def compilations(self):
    return len(self._compiled)

  def batch_specs(self, row):
    """`fn`'s abstract batch for rows like `row` (a dict of arrays or ShapeDtypeStructs): batch_size rows, sharded
    on 'data'."""
    return {k: jax.ShapeDtypeStruct((self.batch_size,) + shape, np.dtype(dt), sharding=self._data)
            for k, shape, dt in shape_key(row)}

  def compile(self, row):
    """The executable for batches of rows like `row`, compiled once."""
    key = shape_key(row)
    if key not in self._compiled:
      self._compiled[key] = self.fn.lower(self.variables, self.batch_specs(row)).compile(self._options)
    return self._compiled[key]

  def __call__(self, batch):
    """Dispatch one batch (numpy dict, leading dim = batch_size); returns device arrays without waiting."""
    row = {k: jax.ShapeDtypeStruct(v.shape[1:], v.dtype) for k, v in batch.items()}
    return self.compile(row)(self.variables, batch)


class _Record:
  def __init__(self, key, payload, num_pieces):
    self.key, self.payload = key, payload
    self.outs = [None] * num_pieces
    self.left = num_pieces


def _crop(tree, k, crop):
  """Row k of every output, cut to the piece's valid extent."""
  region = (k,) if crop is None else (k,) + tuple(slice(0, int(c)) for c in crop)
  return jax.tree.map(lambda a: a[region], tree)


def schedule(loop, items, max_pending=16, depth=2):
  """Run the pieces of every item through `loop`, batching pieces of equal signature across items.

  items: iterable of (key, payload, [Piece]). Yields (key, payload, [(output, piece.meta)]) as items complete (an
  item without pieces completes at once). At most `max_pending` items wait for their batches (then the oldest one's
  batches are dispatched partially filled: the spare rows repeat the batch's last piece, their outputs are unused)
  and `depth` batches are in flight on the devices while the host prepares the next.
  """
  b = loop.batch_size
  buffers = collections.OrderedDict()  # shape key -> [(record, piece index, Piece)]
  pending = collections.OrderedDict()  # id(record) -> record, oldest first
  inflight = collections.deque()

  def dispatch(key):
    entries = buffers.pop(key)
    rows = [p.arrays for _, _, p in entries]
    rows += rows[-1:] * (b - len(rows))
    inflight.append((entries, loop({k: np.stack([r[k] for r in rows]) for k in rows[0]})))

  def resolve():
    entries, out = inflight.popleft()
    out = jax.device_get(out)
    for k, (rec, pi, piece) in enumerate(entries):
      rec.outs[pi] = (_crop(out, k, piece.crop), piece.meta)
      rec.left -= 1
      if not rec.left:
        del pending[id(rec)]
        yield rec.key, rec.payload, rec.outs

  def drain(limit):
    while len(inflight) > limit:
      yield from resolve()

  for key, payload, pieces in items:
    if not pieces:
      yield key, payload, []
      continue
    rec = _Record(key, payload, len(pieces))
    pending[id(rec)] = rec
    for pi, piece in enumerate(pieces):
      sk = shape_key(piece.arrays)
      buffers.setdefault(sk, []).append((rec, pi, piece))
      if len(buffers[sk]) == b:
        dispatch(sk)
        yield from drain(depth)
    while len(pending) > max_pending:
      oldest = next(iter(pending.values()))
      sk = next((s for s, es in buffers.items() if any(e[0] is oldest for e in es)), None)
      if sk is not None:
        dispatch(sk)
        yield from drain(depth)
      elif inflight:  # all its pieces are on the devices: wait for the oldest batch
        yield from drain(len(inflight) - 1)
      else:
        raise AssertionError('schedule: a pending item has no piece left to run')
  for sk in list(buffers):
    dispatch(sk)
    yield from drain(depth)
  yield from drain(0)
