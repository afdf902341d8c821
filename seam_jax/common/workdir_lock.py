"""One run per workdir: an exclusive lock on <workdir>/.lock that names its holder.

The lock is an fcntl (flock) lock on the file, so the kernel releases it when the holding process dies: a lock left
by a killed run is simply taken over (its file still names the old holder; the new one overwrites it). A second
start while the holder lives is refused with one line naming it (host, pid, start time, command). Only process 0 of
a multi-host run takes it (the others work under it). On file systems without flock (some network mounts) the
lock cannot be taken and the run says so and goes on unlocked rather than refusing to run.
"""
import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time

from absl import logging

from seam_jax.common import errors


def _holder(f):
  f.seek(0)
  try:
    h = json.loads(f.read() or '{}')
  except ValueError:
    return 'another process (its lock file cannot be read)'
  return (f'pid {h.get("pid")} on {h.get("host")} since {h.get("started")} '
          f'({" ".join(h.get("argv", []))[:120]})')


@contextlib.contextmanager
def hold(workdir, enabled=True):
  """Hold the lock of `workdir` for the block (no-op when not `enabled`, e.g. in processes other than 0)."""
  if not enabled:
    yield
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, '.lock')
  with open(path, 'a+') as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise errors.DataError(f'workdir {workdir} is in use by {_holder(f)}; one run per workdir: wait for it, '
                             'stop it, or use another --config.workdir') from None
    except OSError as e:
      if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
        raise
      logging.warning('cannot lock %s (%s): running without the one-run-per-workdir check', path, e.strerror)
    f.seek(0)
    f.truncate()
    f.write(json.dumps({'host': socket.gethostname(), 'pid': os.getpid(), 'argv': sys.argv,
                        'started': time.strftime('%Y-%m-%d %H:%M:%S')}))
    f.flush()
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)
