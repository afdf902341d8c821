"""Shared plumbing of the absl entry points: the `--config` flag, the multi-host flags, clean errors (bad input or a
refused write: one line, exit status 1), no traceback spew."""
import contextlib
import logging as pylogging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from seam_jax.common.errors import DataError, write_failure

FLAGS = flags.FLAGS


def define_config(default='configs/voc12.py'):
  """`--config=path.py` plus `--config.a.b=value` overrides (big_vision / flax examples style), and the multi-host
  flags of every entry point."""
  flags.DEFINE_bool('multihost', False, 'one process per host: call jax.distributed.initialize first (also env '
                    'SEAM_MULTIHOST=1); jax auto-detects Cloud TPU, SLURM and Open MPI, elsewhere pass the three '
                    'flags below (or env JAX_COORDINATOR_ADDRESS for the first)')
  flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (implies --multihost)')
  flags.DEFINE_integer('num_processes', None, 'number of processes (implies --multihost)')
  flags.DEFINE_integer('process_id', None, 'this process, 0 .. num_processes - 1 (implies --multihost)')
  return config_flags.DEFINE_config_file('config', default, 'Path to an ml_collections config file.',
                                         lock_config=True)


def multihost_requested():
  """--multihost, env SEAM_MULTIHOST (not '' or '0'), or any explicit process-group flag."""
  explicit = (FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  return FLAGS.multihost or os.environ.get('SEAM_MULTIHOST', '') not in ('', '0') or any(
      v is not None for v in explicit)


def _failures_reported():
  """With several processes, a failure of this one stops the others at once with one line naming it
  (distributed.failures_reported); nothing to do in one process."""
  if 'multihost' in FLAGS and multihost_requested():
    from seam_jax.common import distributed  # pylint: disable=g-import-not-at-top  (imports jax)
    return distributed.failures_reported()
  return contextlib.nullcontext()


def _maybe_initialize():
  if 'multihost' in FLAGS and multihost_requested():
    from seam_jax.common import distributed  # pylint: disable=g-import-not-at-top  (imports jax)
    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)


def _parse(argv):
  """absl flag parsing that turns an unknown `--config.x.y` key into one clear line."""
  try:
    rest = FLAGS(argv)
    FLAGS.config.keys()  # config files load lazily: make a bad path fail here, cleanly
    return rest
  except OSError as e:
    sys.exit(f'error: {str(e).splitlines()[0]}: {FLAGS["config"].config_filename}')
  except (AttributeError, KeyError) as e:
    keys = [a.split('=')[0][2:] for a in argv[1:] if a.startswith('--config.')]
    sys.exit(f'error: unknown config key in {keys}: {e} (see the config file for the valid fields)')
  except flags.Error as e:
    sys.exit(f'error: {e}')


class _QuietLibraries(pylogging.Filter):
  """Orbax and XLA log every checkpoint step at INFO: keep their warnings, drop the chatter. A refused write they log
  from a background thread or task (orbax saves asynchronously, then fails the main thread with its own error or
  a timeout) is kept in `write_failure` for `one_line_errors`, and later library tracebacks are dropped."""
  NOISY = ('/orbax/', '/jax/_src/', '/grain/', '/asyncio/')

  def __init__(self):
    super().__init__()
    self.write_failure = None

  def filter(self, record):
    noisy = any(n in record.pathname for n in self.NOISY)
    if noisy and record.exc_info and record.exc_info[1] is not None:
      self.write_failure = self.write_failure or write_failure(record.exc_info[1])
      if self.write_failure:
        return False
    return record.levelno >= pylogging.WARNING or not noisy


def quiet_libraries():
  """The `_QuietLibraries` filter, installed once on absl's logger (orbax and grain log through it), on absl's
  handler and the root logger's (jax's and asyncio's loggers), whichever prints them; returns it."""
  targets = (pylogging.getLogger('absl'), logging.get_absl_handler(), *pylogging.getLogger().handlers)
  quiet = next((f for t in targets for f in t.filters if isinstance(f, _QuietLibraries)), None) or _QuietLibraries()
  for t in targets:
    if quiet not in t.filters:
      t.addFilter(quiet)
  return quiet


@contextlib.contextmanager
def one_line_errors():
  """Bad input (DataError) and a write the file system refuses (errors.write_failure: read-only or full disk,
  permission, a file in place of a folder) end the process with one line `error: ...` on stderr, exit status 1;
  any other exception (a bug) keeps its traceback. The unraisable errors of orbax's leftover tensorstore callbacks
  after a failed read or write ('Event loop is closed', then anything once the line is out) are dropped."""
  quiet = quiet_libraries()
  quiet.write_failure = None
  previous, reported = sys.unraisablehook, []

  def drop_leftovers(unraisable):
    closed = isinstance(unraisable.exc_value, RuntimeError) and 'Event loop is closed' in str(unraisable.exc_value)
    if not (closed or reported or quiet.write_failure):
      previous(unraisable)

  sys.unraisablehook = drop_leftovers
  try:
    yield
  except DataError as e:
    reported.append(e)
    sys.exit('error: ' + ' '.join(str(e).splitlines()))
  except Exception as e:  # pylint: disable=broad-except  (re-raised unless it is a refused write)
    quiet.write_failure = write_failure(e) or quiet.write_failure
    if quiet.write_failure is None:
      raise
    sys.exit(f'error: {quiet.write_failure}')   # the hook stays: leftover callbacks also fail at exit
  sys.unraisablehook = previous
  if quiet.write_failure:
    logging.warning('a background write failed (%s); the run completed without it', quiet.write_failure)


def run(main):
  """app.run with jax.distributed started first when asked (`define_config`'s flags) and bad input or a refused
  write reported as one line `error: ...` on stderr, exit status 1 (`one_line_errors`)."""
  def wrapped(argv):
    pylogging.getLogger('absl').setLevel(pylogging.INFO)
    logging.set_verbosity(logging.INFO)
    with one_line_errors():
      _maybe_initialize()
      with _failures_reported():
        return main(argv)
  app.run(wrapped, flags_parser=_parse)
