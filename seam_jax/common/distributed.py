"""Several processes (one per host, jax.distributed): start-up, the split of the work, barriers and sums, and
stopping every process when one fails.

An inference-type stage gives each process `process_share(ids)` of its list, each process writes the outputs of its
share (atomic files, so a restart redoes exactly the missing ones), and the stage ends with `barrier(name)` so that
the next stage sees every output. Without `initialize` (one process) these are no-ops or the identity and never
start a JAX backend (a CRF-only run needs none). `launch_local` starts a group of processes on one machine.

Barriers and sums go through the coordination service's client (its barrier and key-value store, as orbax does),
not through device collectives: nothing to compile, explicit time-outs, and int64 sums stay exact (a device
all-gather would cast them to int32 with jax_enable_x64 off).

A process that fails (an uncaught exception, or one leaving a `failures_reported` block: the trainer's) tells the
others through the key-value store, and each of them stops at once with one line naming it, wherever it waits (a
barrier, an orbax save, a device collective); the failed process then exits without waiting for them. Without that
they waited for it until the coordination service's shutdown barrier timed out (5 minutes) and aborted them all. A
process killed outright is declared dead after HEARTBEAT_TIMEOUT_S, and the service then aborts the others.
"""
import atexit
import contextlib
import io
import itertools
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

from absl import logging
import jax
import numpy as np

BARRIER_TIMEOUT_S = 24 * 3600   # a stage may wait this long for the slowest process's share
HEARTBEAT_TIMEOUT_S = 30        # a process silent this long is dead (jax's default: 100 s)
FAILURE_POLL_S = 0.5            # how often each process looks for another's failure
LEAVE_TIMEOUT_S = 10            # how long process 0 (the coordination service) waits for the others to leave
_FAILED, _LEFT = 'seam_jax/failed/', 'seam_jax/left/'   # + process index: its failure line / it is leaving
_sequence = itertools.count()   # every process calls barriers / sums in the same order: the same keys
_stop_lock = threading.Lock()
_stopping = [None]              # 'reported' (this process failed) or 'stopped' (another did): whichever came first
_watching = threading.Event()   # cleared at a normal exit: the failure watch ends


def initialize(coordinator_address=None, num_processes=None, process_id=None, local_device_ids=None):
  """jax.distributed.initialize with the given values; what is None is auto-detected by jax (Cloud TPU, SLURM,
  Open MPI, env JAX_COORDINATOR_ADDRESS). Must run before any JAX computation; a second call does nothing.
  CPU collectives (tests, CPU clusters) use gloo over TCP. Starts the failure watch (module docstring)."""
  if jax.distributed.is_initialized():
    return
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address, num_processes, process_id, local_device_ids,
                             heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S)
  _watch_failures()
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


def all_gather(x, name='gather', timeout_s=BARRIER_TIMEOUT_S):
  """[numpy array `x` of process 0, of process 1, ...]: the same list in every process, bit for bit. [x] in one
  process."""
  x = np.asarray(x)
  if process_count() == 1:
    return [x]
  key, client = _key(name), _client()
  buf = io.BytesIO()
  np.save(buf, x, allow_pickle=False)
  client.key_value_set_bytes(f'{key}/{process_index()}', buf.getvalue())
  return [np.load(io.BytesIO(client.blocking_key_value_get_bytes(f'{key}/{p}', int(timeout_s * 1000))),
                  allow_pickle=False) for p in range(process_count())]


def sum_over_processes(x, name='sum', timeout_s=BARRIER_TIMEOUT_S):
  """Element-wise sum of numpy array `x` over processes, added in process order: the same result in every
  process, exact for integers. Identity in one process."""
  x = np.asarray(x)
  if process_count() == 1:
    return x
  parts = all_gather(x, name, timeout_s)
  if any(p.shape != x.shape or p.dtype != x.dtype for p in parts):
    raise ValueError(f'sum_over_processes({name!r}): processes hold {[(p.shape, p.dtype.str) for p in parts]}')
  total = parts[0].copy()
  for p in parts[1:]:
    total += p
  return total


# ------------------------------------------------------------------------------------------- failure handling
@contextlib.contextmanager
def failures_reported():
  """An exception leaving this block in a multi-process run (a failure that may be this process's alone: a bad
  file in its share of the data, a bug) is reported to the other processes, which stop at once with one line naming
  this process and the error; the exception goes on (its one-line error or traceback is printed as usual) and this
  process then exits without waiting for the others. Uncaught exceptions are reported the same way (sys.excepthook)."""
  try:
    yield
  except (Exception, KeyboardInterrupt) as e:
    _report(e)
    raise


def _report(e):
  """Publish this process's failure (once; the first of its own failure and another's wins)."""
  if not _watching.is_set():   # one process, or the watch has ended
    return
  with _stop_lock:
    first = _stopping[0] is None
    if first:
      _stopping[0] = 'reported'
  if not first:
    if _stopping[0] != 'reported':   # another process's failure is stopping this one: nothing more to say
      threading.Event().wait()
    return
  message = ' '.join(str(e).split())[:300]
  line = f'process {jax.process_index()} of {jax.process_count()} failed: {type(e).__name__}' + (
      f': {message}' if message else '')
  try:
    _client().key_value_set(f'{_FAILED}{jax.process_index()}', line)
  except Exception:  # noqa: BLE001 - the service may be gone already
    pass


def _watch_failures():
  """The failure reporting of the module docstring: sys.excepthook reports an uncaught exception, a daemon thread
  stops this process when another reports one, and at exit a process that reported leaves at once (`_leave`);
  after a normal end the watch stops before jax shuts its client down."""
  client, previous = _client(), sys.excepthook

  def excepthook(kind, value, traceback):
    _report(value)
    previous(kind, value, traceback)

  def watch():
    while _watching.is_set():
      try:
        failed = client.key_value_dir_get(_FAILED)
      except Exception:  # noqa: BLE001 - the client is shutting down
        return
      with _stop_lock:
        stop = bool(failed) and _watching.is_set() and _stopping[0] is None
        if stop:
          _stopping[0] = 'stopped'
      if stop:
        line = min(failed, key=lambda kv: int(kv[0].rsplit('/', 1)[1]))[1]
        print(f'error: {line} (process {jax.process_index()} stops)', file=sys.stderr, flush=True)
        _leave(client)
      time.sleep(FAILURE_POLL_S)

  def at_exit():   # registered after jax's clean-up, so it runs first
    if _stopping[0] == 'reported':
      _leave(client)
    _watching.clear()
    thread.join(FAILURE_POLL_S + 5)

  sys.excepthook = excepthook
  _watching.set()
  thread = threading.Thread(target=watch, name='seam_jax-failure-watch', daemon=True)
  thread.start()
  atexit.register(at_exit)


def _leave(client):
  """Exit now with status 1, skipping the shutdown barrier that the other processes will not reach. Process 0
  hosts the coordination service: it leaves last (once every other process said it leaves, or after
  LEAVE_TIMEOUT_S), so that no process sees the service vanish (which aborts it with a C++ stack dump)."""
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    client.key_value_set(f'{_LEFT}{jax.process_index()}', '1')
    if jax.process_index() == 0:
      deadline = time.time() + LEAVE_TIMEOUT_S
      for p in range(1, jax.process_count()):
        client.blocking_key_value_get(f'{_LEFT}{p}', max(1, int(1000 * (deadline - time.time()))))
      time.sleep(FAILURE_POLL_S)   # the others' os._exit after their last message
  except Exception:  # noqa: BLE001 - a process that does not answer: leave anyway
    pass
  os._exit(1)


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
