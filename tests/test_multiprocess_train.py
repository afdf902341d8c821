"""SEAM training over 2 processes (train.py --coordinator_address/--num_processes/--process_id on 127.0.0.1, 4 fake
CPU devices each) against 1 process with 8 devices on the same global batches: both processes end with identical
parameters, equal to the 1-process run's; only process 0 writes logs, metrics and the export; nothing deadlocks."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from configs import demo
from seam_jax import layout
from seam_jax.data import demo_data, prepare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 900
STEPS = 3

# Runs the real entry point (train.py, its absl flags included) with trainer.train wrapped to leave this process's
# final variables in <out>/variables_<process>.npz.
WORKER = r'''
import runpy, sys
import jax, numpy as np
from seam_jax.common import distributed
from seam_jax.train import trainer
out, real_train = sys.argv[1], trainer.train

def train(config, task, stop_step=None):
  variables = real_train(config, task, stop_step)
  flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(variables)[0]}
  np.savez(f'{out}/variables_{distributed.process_index()}.npz', **flat)
  return variables

trainer.train = train
sys.argv = ['train.py'] + sys.argv[2:]
runpy.run_path('train.py', run_name='__main__')
'''


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  """A tiny demo set with its lists; the flags every run shares."""
  tmp = tmp_path_factory.mktemp('mptrain')
  config = demo.get_config()
  config.workdir = str(tmp)
  demo_data.generate(layout.voc_root(config), num_train=16, num_val=2, num_aug=0, image_size=(40, 56), seed=0,
                     workers=1, classes=config.demo.classes, plain=True)
  prepare.prepare(config, workers=1)
  overrides = {'data.voc_root': layout.voc_root(config), 'data.list_dir': layout.list_dir(config),
               'model.width_div': 32, 'data.crop_size': 32, 'data.resize_long': '(32,48)', 'train.batch_size': 8,
               'train.max_steps': STEPS, 'train.log_every': 1, 'train.ckpt_every': 2, 'train.fast_compile': True,
               'train.image_summaries': False}
  return tmp, ['--config=configs/demo.py'] + [f'--config.{k}={v}' for k, v in overrides.items()]


def run_train(flags, workdir, num_processes):
  """train.py in `num_processes` processes (8 devices in all); returns {process: {name: array}}."""
  os.makedirs(workdir)
  devices = 8 // num_processes
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  group = []
  if num_processes > 1:
    group = [f'--coordinator_address=127.0.0.1:{free_port()}', f'--num_processes={num_processes}']
  cmd = [sys.executable, '-c', WORKER, workdir] + flags + [f'--config.workdir={workdir}'] + group
  procs = [subprocess.Popen(cmd + ([f'--process_id={p}'] if group else []), cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for p in range(num_processes)]
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=TIMEOUT_S)[0])
  finally:
    for p in procs:
      p.kill()
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  return {p: dict(np.load(os.path.join(workdir, f'variables_{p}.npz'))) for p in range(num_processes)}


def test_two_processes_train_like_one(data):
  tmp, flags = data
  single = run_train(flags, str(tmp / 'one'), 1)[0]
  pair = run_train(flags, str(tmp / 'two'), 2)
  assert set(pair[0]) == set(pair[1]) == set(single)
  for k in single:
    np.testing.assert_array_equal(pair[1][k], pair[0][k], err_msg=k)    # replicated: the same bits everywhere
  # The 8 devices run the same per-device programs on the same rows in both runs (process p holds rows
  # [4 p, 4 p + 4) of each global batch, its devices' rows); only the all-reduce of the 8 per-device gradients
  # may add in another order (in one process vs over gloo). Two orders of an 8-term float32 sum differ by at most
  # 2 * 7 * u * sum|terms| (u = 2^-24): per step at most 14 u of the summed gradients' magnitude. Over STEPS steps
  # the update differences add (to first order), so each parameter leaf moves by at most STEPS * 14 u times its
  # own movement.
  for k in single:
    a, b = single[k].astype(np.float64), pair[0][k].astype(np.float64)
    assert np.abs(b - a).max() <= STEPS * 14 * 2. ** -24 * max(np.abs(a).max(), 1e-30), k
  one, two = tmp / 'one/seam', tmp / 'two/seam'
  lines = [[json.loads(l)['step'] for l in open(d / 'metrics.jsonl')] for d in (one, two)]
  assert lines[0] == lines[1] == list(range(1, STEPS + 1))
  assert sorted(os.listdir(two / 'ckpt')) == ['2', '3'] and os.path.isdir(two / 'export')
  assert len(os.listdir(two / 'tb')) == 1          # process 0's event file only

