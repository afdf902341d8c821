"""Device meshes and shardings: the one home of the 1-D 'data' mesh that training and inference run over.

Training spans every device of every process (`make_mesh()`: one global batch, parameters replicated); inference
stages give each process its own images, so they run on a mesh of this process's devices (`make_mesh(local=True)`):
no computation spans processes and no process waits for another's images.
"""
import jax
import numpy as np

P = jax.sharding.PartitionSpec


def make_mesh(devices=None, local=False):
  """1-D mesh 'data' over `devices` (default: every device of every process, or this process's with `local`)."""
  if devices is None:
    devices = jax.local_devices() if local else jax.devices()
  devices = list(devices)
  return jax.make_mesh((len(devices),), ('data',), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


def replicated(mesh):
  """Every device holds the whole array (parameters, rng)."""
  return jax.sharding.NamedSharding(mesh, P())


def data_sharded(mesh):
  """The leading (batch) axis split over 'data'."""
  return jax.sharding.NamedSharding(mesh, P('data'))


def replicate(tree, mesh):
  return jax.device_put(tree, replicated(mesh))


def shard_batch(local_batch, mesh):
  """Global batch arrays (sharded on 'data') from this process's local numpy batch; non-numeric fields (ids)
  stay on the host and are dropped."""
  sharding = data_sharded(mesh)
  numeric = {k: v for k, v in local_batch.items() if np.asarray(v).dtype.kind in 'biuf'}
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in numeric.items()}


def local_copy(tree):
  """A replicated global tree as single-device arrays of this process (no cross-host traffic)."""
  return jax.tree.map(lambda x: x.addressable_data(0) if isinstance(x, jax.Array) else x, tree)


def platform(mesh):
  """The platform ('cpu', 'cuda', 'tpu', ...) of `mesh`'s devices: the backend its computations compile for."""
  return mesh.devices.flat[0].platform


def compiler_options(fast, platform_name=None):
  """XLA options for `jax.jit` / `.compile` on `platform_name` (default: jax.default_backend(), what a jit without
  shardings compiles for; pass `platform(mesh)` for a computation over `mesh`): with `fast` on CPU, LLVM
  optimisation off. Small CPU runs compile several times faster (a narrow SEAM step: ~3x, random init: ~8x) and
  run about as fast (convolutions are library calls). Elsewhere (GPU, TPU) none: the option is XLA:CPU's."""
  cpu = (platform_name or jax.default_backend()) == 'cpu'
  return {'xla_backend_optimization_level': 0} if fast and cpu else None
