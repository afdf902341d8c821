"""Test session setup: 8 fake CPU devices for the data-parallel tests, repo root importable; the shared tiny demo
set fixture."""
import os
import sys

import pytest

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope='session')
def tiny_demo(tmp_path_factory):
  """The prepared demo set of configs/demo.py:tiny (images, masks, lists, cls_labels.npy) in <workdir>, shared by
  the tests that run entry points on it (read-only: copy <workdir> to change it). Returns that config."""
  from configs import demo  # pylint: disable=g-import-not-at-top  (after sys.path above)
  from seam_jax.data import prepare  # pylint: disable=g-import-not-at-top
  config = demo.get_config('tiny')
  config.workdir = str(tmp_path_factory.mktemp('tiny_demo'))
  prepare.make_demo(config, workers=1)
  prepare.prepare(config, workers=1)
  return config


@pytest.fixture(scope='session')
def tiny_flags(tiny_demo):
  """Entry-point flags that run on the tiny demo set, training from a random init with calibrated BatchNorm
  statistics (no pretraining stage): add --config.workdir and the test's own."""
  from seam_jax import layout  # pylint: disable=g-import-not-at-top
  return ['--config=configs/demo.py:tiny', f'--config.data.voc_root={layout.voc_root(tiny_demo)}',
          f'--config.data.list_dir={layout.list_dir(tiny_demo)}', '--config.pretrain.enabled=False',
          '--config.model.calibrate_bn=True']
