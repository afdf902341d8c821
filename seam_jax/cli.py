"""Shared plumbing of the absl entry points: the `--config` flag, clean errors, no traceback spew."""
import logging as pylogging
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from seam_jax.voc import DataError

FLAGS = flags.FLAGS


def define_config(default='configs/voc12.py'):
  """`--config=path.py` plus `--config.a.b=value` overrides (big_vision / flax examples style)."""
  return config_flags.DEFINE_config_file('config', default, 'Path to an ml_collections config file.',
                                         lock_config=True)


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
  """app.run with DataError (bad input: a file or a key named in the message) reported as one line."""
  def wrapped(argv):
    pylogging.getLogger('absl').setLevel(pylogging.INFO)
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_QuietLibraries())
    try:
      return main(argv)
    except DataError as e:
      logging.error('%s', e)
      sys.exit(f'error: {e}')
  app.run(wrapped, flags_parser=_parse)
