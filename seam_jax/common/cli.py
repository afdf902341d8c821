"""Shared plumbing of the absl entry points: the `--config` flag, the multi-host flags, clean errors, no traceback
spew."""
import logging as pylogging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from seam_jax.common.errors import DataError

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
  """Orbax and XLA log every checkpoint step at INFO: keep their warnings, drop the chatter."""
  NOISY = ('/orbax/', '/jax/_src/', '/grain/')

  def filter(self, record):
    return record.levelno >= pylogging.WARNING or not any(n in record.pathname for n in self.NOISY)


def run(main):
  """app.run with jax.distributed started first when asked (`define_config`'s flags) and DataError (bad input: a
  file or a key named in the message) reported as one line `error: ...` on stderr, exit status 1."""
  def wrapped(argv):
    pylogging.getLogger('absl').setLevel(pylogging.INFO)
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_QuietLibraries())
    try:
      _maybe_initialize()
      return main(argv)
    except DataError as e:
      sys.exit('error: ' + ' '.join(str(e).splitlines()))
  app.run(wrapped, flags_parser=_parse)
