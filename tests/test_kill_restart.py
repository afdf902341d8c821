"""Kill and restart: train.py SIGKILLed at seeded random moments (inside a step; during a checkpoint write, seen by
orbax's temporary folder) and rerun with the same command until it finishes ends with the parameters and the
metrics.jsonl lines of an uninterrupted run, bit for bit (CPU). A damaged newest checkpoint is skipped with a warning
for the one before."""
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import demo
from seam_jax.models import convert

pytestmark = pytest.mark.slow   # over ~20 s: `pytest -m "not slow"` leaves it out

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 8
LOG_EVERY, CKPT_EVERY = 3, 2   # checkpoints between log lines hold the metrics of the steps not logged yet
TIMEOUT_S = 600
KILLS = ('step', 'write', 'step', 'write')   # where each interrupted start is killed, in order


@pytest.fixture(scope='module')
def data(tiny_flags, tmp_path_factory):
  """The train.py command line and environment every run shares (on the tiny demo set)."""
  tmp = tmp_path_factory.mktemp('kill')
  flags = tiny_flags + [f'--config.train.max_steps={STEPS}', f'--config.train.log_every={LOG_EVERY}',
                        f'--config.train.ckpt_every={CKPT_EVERY}', '--config.train.keep_checkpoints=2']
  # The persistent compilation cache only makes restarts cheaper: a cached executable is the compiled program.
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=2',
             JAX_COMPILATION_CACHE_DIR=str(tmp / 'jax_cache'), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  return tmp, flags, env


def start(data, workdir):
  tmp, flags, env = data
  return subprocess.Popen([sys.executable, 'train.py'] + flags + [f'--config.workdir={workdir}'], cwd=ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(proc):
  err = proc.communicate(timeout=TIMEOUT_S)[1]
  assert proc.returncode == 0, err[-3000:]
  return err


def logged(workdir):
  """metrics.jsonl lines without the throughput (timing); a line cut by a kill is left out."""
  path = os.path.join(workdir, 'seam/metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = [json.loads(l) for l in f if l.endswith('\n')]
  return [{k: v for k, v in l.items() if k != 'img_per_s'} for l in lines]


def logged_steps(workdir):
  return [l['step'] for l in logged(workdir)]


def temporary_steps(workdir):
  return glob.glob(os.path.join(workdir, 'seam/ckpt/*orbax-checkpoint-tmp*'))


def kill_when(proc, ready, delay=0.):
  """SIGKILL `proc` `delay` seconds after ready() first holds (polled every millisecond); False if it ended first."""
  while not ready():
    if proc.poll() is not None:
      return False
    time.sleep(1e-3)
  time.sleep(delay)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  return proc.returncode == -signal.SIGKILL


def export_leaves(workdir, config_model):
  return jax.tree.leaves(convert.load_variables(os.path.join(workdir, 'seam/export'), 'seam', config_model))


def test_killed_runs_end_like_an_uninterrupted_one(data):
  tmp = data[0]
  straight, killed = str(tmp / 'straight'), str(tmp / 'killed')
  finish(start(data, straight))
  rng = np.random.default_rng(0)
  landed = []
  for kind in KILLS:
    before, stale = len(logged_steps(killed)), set(temporary_steps(killed))
    fresh = lambda: set(temporary_steps(killed)) - stale   # pylint: disable=cell-var-from-loop
    proc = start(data, killed)
    if kind == 'step':   # a random moment once this start is training
      hit = kill_when(proc, lambda: len(logged_steps(killed)) > before, rng.uniform(0., 0.5))
    else:                # as soon as orbax's temporary folder of a step this start writes appears
      hit = kill_when(proc, lambda: bool(fresh())) and bool(fresh())   # still there: the write was cut
    landed.append(hit)
    if proc.returncode == 0:
      break
  finish(start(data, killed))
  assert landed[:2] == [True, True], landed   # a kill inside training and one inside a checkpoint write, at least
  assert not temporary_steps(killed)            # the cut write was cleaned up
  # Lines after the restored step logged once, with the same numbers: those of the steps before a restart come back.
  assert logged_steps(killed) == [s for s in range(1, STEPS + 1) if s % LOG_EVERY == 0 or s == STEPS]
  assert logged(killed) == logged(straight)
  model = demo.get_config('tiny').model
  for a, b in zip(export_leaves(straight, model), export_leaves(killed, model)):
    np.testing.assert_array_equal(a, b)

  # The newest step damaged (a file deleted) and the export gone (else the stage is complete and skipped): a
  # warning, the step is moved aside, the step before is resumed from, and the export and the log are again the
  # uninterrupted run's.
  os.remove(os.path.join(killed, f'seam/ckpt/{STEPS}/meta/metadata'))
  shutil.rmtree(os.path.join(killed, 'seam/export'))
  err = finish(start(data, killed))
  assert f'checkpoint step {STEPS} in' in err and f'resuming from step {STEPS - CKPT_EVERY}' in err, err[-3000:]
  assert os.path.isdir(os.path.join(killed, f'seam/ckpt_damaged/{STEPS}'))
  for a, b in zip(export_leaves(straight, model), export_leaves(killed, model)):
    np.testing.assert_array_equal(a, b)
  assert logged(killed) == logged(straight)
