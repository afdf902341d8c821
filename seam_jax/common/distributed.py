"""Several processes (one per host, jax.distributed): start-up, the split of the work, barriers and sums.

An inference-type stage gives each process `process_share(ids)` of its list, each process writes the outputs of its
share (atomic files, so a restart redoes exactly the missing ones), and the stage ends with `barrier(name)` so that
the next stage sees every output. Without `initialize` (one process) these are no-ops or the identity and never
start a JAX backend (a CRF-only run needs none). `launch_local` starts a group of processes on one machine.

Barriers and sums go through the coordination service's client (its barrier and key-value store, as orbax does),
not through device collectives: nothing to compile, explicit time-outs, and int64 sums stay exact (a device
all-gather would cast them to int32 with jax_enable_x64 off).
"""
import io
import itertools
import socket
import subprocess
import tempfile

from absl import logging
import jax
import numpy as np

BARRIER_TIMEOUT_S = 24 * 3600   # a stage may wait this long for the slowest process's share
_sequence = itertools.count()   # every process calls barriers / sums in the same order: the same keys


def initialize(coordinator_address=None, num_processes=None, process_id=None, local_device_ids=None):
  """jax.distributed.initialize with the given values; what is None is auto-detected by jax (Cloud TPU, SLURM,
  Open MPI, env JAX_COORDINATOR_ADDRESS). Must run before any JAX computation; a second call does nothing.
  CPU collectives (tests, CPU clusters) use gloo over TCP."""
  if jax.distributed.is_initialized():
    return
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address, num_processes, process_id, local_device_ids)
  logging.info('jax.distributed: process %d of %d, %d local / %d global devices', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def process_count():
  """jax.process_count() once jax.distributed is initialised, else 1 (without starting a backend)."""
  return jax.process_count() if jax.distributed.is_initialized() else 1


def process_index():
  return jax.process_index() if jax.distributed.is_initialized() else 0


def is_main():
  """Process 0: the one that writes shared results (results.json, plots, exports)."""
  return process_index() == 0


def process_share(ids):
  """This process's ids: every process_count()-th id from position process_index(), in list order. Every id goes
  to exactly one process (for a list without repeats), the same split in every process and on every restart, so a
  process filters its own share for missing outputs without racing the others' writes."""
  return list(ids)[process_index()::process_count()]


def _client():
  from jax._src import distributed  # pylint: disable=g-import-not-at-top  (the coordination-service client)
  return distributed.global_state.client


def _key(name):
  return f'seam_jax/{name}/{next(_sequence)}'


def barrier(name, timeout_s=BARRIER_TIMEOUT_S):
  """Wait until every process reaches this point (all processes call the same barriers in the same order)."""
  if process_count() == 1:
    return
  _client().wait_at_barrier(_key(name), int(timeout_s * 1000))


def sum_over_processes(x, name='sum', timeout_s=BARRIER_TIMEOUT_S):
  """Element-wise sum of numpy array `x` over processes, added in process order: the same result in every
  process, exact for integers. Identity in one process."""
  x = np.asarray(x)
  if process_count() == 1:
    return x
  key, client = _key(name), _client()
  buf = io.BytesIO()
  np.save(buf, x, allow_pickle=False)
  client.key_value_set_bytes(f'{key}/{process_index()}', buf.getvalue())
  parts = [np.load(io.BytesIO(client.blocking_key_value_get_bytes(f'{key}/{p}', int(timeout_s * 1000))),
                   allow_pickle=False) for p in range(process_count())]
  if any(p.shape != x.shape or p.dtype != x.dtype for p in parts):
    raise ValueError(f'sum_over_processes({name!r}): processes hold {[(p.shape, p.dtype.str) for p in parts]}')
  total = parts[0].copy()
  for p in parts[1:]:
    total += p
  return total


def free_port():
  """A TCP port of 127.0.0.1 free at this moment (for a coordinator on this machine)."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def launch_local(command, num_processes, env=None, cwd=None, timeout_s=None):
  """Run `command(process_id, coordinator_address)` (an argv list) as `num_processes` processes on this machine
  around one coordinator at 127.0.0.1 and wait for all (tests, trying a multi-host set-up on one machine).
  Returns [(returncode, stdout + stderr text)] in process order. Outputs go to files, not pipes, so a chatty
  process never blocks the others at a barrier; on a time-out (subprocess.TimeoutExpired) all are killed."""
  coordinator = f'127.0.0.1:{free_port()}'
  logs = [tempfile.TemporaryFile('w+') for _ in range(num_processes)]
  procs = [subprocess.Popen(command(p, coordinator), cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            text=True) for p, log in enumerate(logs)]
  try:
    for p in procs:
      p.wait(timeout_s)
  finally:
    for p in procs:
      p.kill()
  outs = []
  for log in logs:
    log.seek(0)
    outs.append(log.read())
    log.close()
  return [(p.returncode, out) for p, out in zip(procs, outs)]
