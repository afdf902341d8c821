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


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 900
STEPS = 2
BATCH = 8   # the global batch: one row per device

# Runs the real entry point (train.py, its absl flags included) with the trainer wrapped to leave this process's
# variables in <out>/variables_<step>_<process>.npz: the initial ones (step 0) and those of every checkpoint.
WORKER = r'''
import runpy, sys
import jax, numpy as np
from seam_jax.common import distributed, sharding
from seam_jax.train import checkpoints, trainer
out, init_variables, save = sys.argv[1], trainer.init_variables, checkpoints.save

def dump(step, variables):
  flat = {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_flatten_with_path(sharding.local_copy(variables))[0]}
  np.savez(f'{out}/variables_{step}_{distributed.process_index()}.npz', **flat)

def init(config, task, rng):
  variables = init_variables(config, task, rng)
  dump(0, variables)
  return variables

def save_and_dump(mngr, step, state, *args):
  dump(step, state.variables)
  save(mngr, step, state, *args)

trainer.init_variables, checkpoints.save = init, save_and_dump
sys.argv = ['train.py'] + sys.argv[2:]
runpy.run_path('train.py', run_name='__main__')
'''


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.fixture(scope='module')
def data(tiny_demo, tiny_flags, tmp_path_factory):
  """(folder, crop size, the flags every run shares)."""
  flags = tiny_flags + [f'--config.train.batch_size={BATCH}', f'--config.train.max_steps={STEPS}',
                        '--config.train.log_every=1', '--config.train.ckpt_every=1']
  return tmp_path_factory.mktemp('mptrain'), tiny_demo.data.crop_size, flags


def run_train(flags, workdir, num_processes):
  """train.py in `num_processes` processes (8 devices in all); returns [step][process] -> {name: array}."""
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
  return [[dict(np.load(os.path.join(workdir, f'variables_{s}_{p}.npz'))) for p in range(num_processes)]
          for s in range(STEPS + 1)]


def reorder_rtol(variables, image_shape):
  """Relative difference of two float32 evaluations of one training step that differ only in summation order:
  2 u (N H W + 2 sum K), u = 2^-24 (derived in tests/test_trainer.py, float32_reorder_rtol)."""
  contraction = sum(int(np.prod(v.shape[:-1])) for k, v in variables.items() if 'kernel' in k and v.ndim == 4)
  return 2 * 2. ** -24 * (int(np.prod(image_shape)) + 2 * contraction)


def test_two_processes_train_like_one(data):
  tmp, crop, flags = data
  single = [v[0] for v in run_train(flags, str(tmp / 'one'), 1)]
  pair = run_train(flags, str(tmp / 'two'), 2)
  norm = lambda x: np.linalg.norm(np.asarray(x, np.float64))
  for step in range(STEPS + 1):
    assert set(pair[step][0]) == set(pair[step][1]) == set(single[step])
    for k in single[step]:   # replicated: the same bits in every process
      np.testing.assert_array_equal(pair[step][1][k], pair[step][0][k], err_msg=f'step {step} {k}')
  # Both runs do the same arithmetic on the same rows (process p holds rows [4 p, 4 p + 4) of each global batch,
  # the rows of its devices); only summation orders may differ: the all-reduce over devices (in one process or
  # over gloo) and reductions XLA splits by the device count of a process. Each quantity of one step (the
  # BatchNorm statistics calibrated on the first batch, each update) then differs by at most `rtol` of its size;
  # to first order the update differences add up over the steps.
  rtol = reorder_rtol(single[0], (BATCH, crop, crop))
  final, initial = single[STEPS], single[0]
  for k in final:
    diff = norm(pair[STEPS][0][k] - final[k])
    if 'batch_stats' in k:   # SEAM keeps BatchNorm frozen: the calibrated statistics
      assert diff <= rtol * norm(final[k]), k
    else:
      np.testing.assert_array_equal(pair[0][0][k], initial[k], err_msg=k)   # the same random init
      moved = sum(norm(single[s][k] - single[s - 1][k]) for s in range(1, STEPS + 1))
      assert diff <= rtol * moved, (k, diff, moved, rtol)
  one, two = tmp / 'one/seam', tmp / 'two/seam'
  lines = [[json.loads(l)['step'] for l in open(d / 'metrics.jsonl')] for d in (one, two)]
  assert lines[0] == lines[1] == list(range(1, STEPS + 1))
  assert sorted(os.listdir(two / 'ckpt')) == [str(s) for s in range(1, STEPS + 1)]
  assert os.path.isdir(two / 'export') and len(os.listdir(two / 'tb')) == 1   # process 0's event file only
