"""Training over 2 processes (pipeline.py --coordinator_address/--num_processes/--process_id on 127.0.0.1, 4 fake CPU
devices each) against 1 process with 8 devices: the demo's pretraining, then SEAM training in the same processes (as
the documented multi-host launch runs them), on the same global batches; both processes end with identical
parameters, equal to the 1-process run's; only process 0 writes logs, metrics and the exports; nothing deadlocks.
A process that fails stops the others at once, with one line naming it."""
import json
import os
import sys
import time

import numpy as np
import pytest

from seam_jax.common import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 900
STEPS = 2
BATCH = 8   # the global batch: one row per device
PRETRAIN_SIZE = 32   # configs/demo.py:tiny pretrain.image_size

# Runs the real entry point (pipeline.py, its absl flags included) with the trainer wrapped to leave this process's
# variables in <out>/<task>_variables_<step>_<process>.npz (the initial ones, step 0, and those of every checkpoint)
# and the numeric fields of its part of every batch in <out>/<task>_batch_<k>_<process>.npz. Process 0 creates
# orbax's checkpoint folders 1 s late, so that a process that does not wait for them (as process 1 once did at the
# first checkpoint after the pretraining export) fails every time, not only when it happens to be faster.
WORKER = r'''
import asyncio, runpy, sys
import jax, numpy as np
from orbax.checkpoint._src.path import atomicity
from seam_jax.common import distributed, sharding
from seam_jax.train import checkpoints, trainer
create_paths = atomicity._create_paths

async def late_create_paths(*args, **kwargs):
  if jax.process_index() == 0:
    await asyncio.sleep(1)
  return await create_paths(*args, **kwargs)
atomicity._create_paths = late_create_paths
out, init_variables, save, shard_batch = sys.argv[1], trainer.init_variables, checkpoints.save, trainer.shard_batch
current = {}

def dump(name, arrays):
  np.savez(f'{out}/{current["task"]}_{name}_{distributed.process_index()}.npz', **arrays)

def dump_variables(step, variables):
  dump(f'variables_{step}', {jax.tree_util.keystr(k): np.asarray(v)
                             for k, v in jax.tree_util.tree_flatten_with_path(sharding.local_copy(variables))[0]})

def init(config, task, rng):
  variables = init_variables(config, task, rng)
  current.update(task=task.name, batches=0)
  dump_variables(0, variables)
  return variables

def save_and_dump(mngr, step, state, *args):
  dump_variables(step, state.variables)
  save(mngr, step, state, *args)

def shard_and_dump(local, mesh):
  dump(f'batch_{current["batches"]}', {k: v for k, v in local.items() if np.asarray(v).dtype.kind in 'biuf'})
  current['batches'] += 1
  return shard_batch(local, mesh)

trainer.init_variables, checkpoints.save, trainer.shard_batch = init, save_and_dump, shard_and_dump
sys.argv = ['pipeline.py'] + sys.argv[2:]
runpy.run_path('pipeline.py', run_name='__main__')
'''


@pytest.fixture(scope='module')
def data(tiny_demo, tiny_flags, tmp_path_factory):
  """(folder, crop size, the flags every run shares). Pretraining runs although the demo's SEAM does not start from
  it (pretrain.enabled=False: a random init with calibrated BatchNorm, the same bits in both runs)."""
  steps = [f'--config.{section}.{k}={v}' for section in ('pretrain', 'train')
           for k, v in dict(batch_size=BATCH, max_steps=STEPS, log_every=1, ckpt_every=1).items()]
  flags = tiny_flags + steps + ['--stages=pretrain,train', '--noreport']
  return tmp_path_factory.mktemp('mptrain'), tiny_demo.data.crop_size, flags


def run_pipeline(flags, workdir, num_processes):
  """pipeline.py in `num_processes` processes (8 devices in all)."""
  os.makedirs(workdir)
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={8 // num_processes}')
  def command(p, coordinator):
    group = [f'--coordinator_address={coordinator}', f'--num_processes={num_processes}', f'--process_id={p}']
    return ([sys.executable, '-c', WORKER, workdir] + flags + [f'--config.workdir={workdir}'] +
            (group if num_processes > 1 else []))
  for rc, out in distributed.launch_local(command, num_processes, env=env, cwd=ROOT, timeout_s=TIMEOUT_S):
    assert rc == 0, out[-3000:]


def load(workdir, task, name, num_processes):
  return [dict(np.load(os.path.join(workdir, f'{task}_{name}_{p}.npz'))) for p in range(num_processes)]


def reorder_rtol(variables, image_shape):
  """Relative difference of two float32 evaluations of one training step that differ only in summation order:
  2 u (N H W + 2 sum K), u = 2^-24 (derived in tests/test_trainer.py, float32_reorder_rtol)."""
  contraction = sum(int(np.prod(v.shape[:-1])) for k, v in variables.items() if 'kernel' in k and v.ndim == 4)
  return 2 * 2. ** -24 * (int(np.prod(image_shape)) + 2 * contraction)


def assert_reordered(single, pair, steps, rtol):
  """The 2-process variables after `steps` steps equal the 1-process ones up to float32 summation order: both runs
  do the same arithmetic on the same rows (process p holds rows [4 p, 4 p + 4) of each global batch, the rows of its
  devices) and only summation orders may differ: the all-reduce over devices (in one process or over gloo) and
  reductions XLA splits by the device count of a process. Each quantity of one step (BatchNorm statistics, each
  update) then differs by at most `rtol` of its size; to first order the update differences add up over the
  steps."""
  norm = lambda x: np.linalg.norm(np.asarray(x, np.float64))
  for k, final in single[steps].items():
    diff = norm(pair[steps][0][k] - final)
    if 'batch_stats' in k:
      assert diff <= rtol * norm(final), (k, diff, norm(final), rtol)
    else:
      np.testing.assert_array_equal(pair[0][0][k], single[0][k], err_msg=k)   # the same random init
      moved = sum(norm(single[s][k] - single[s - 1][k]) for s in range(1, steps + 1))
      assert diff <= rtol * moved, (k, diff, moved, rtol)


@pytest.mark.slow
def test_two_processes_train_like_one(data):
  tmp, crop, flags = data
  one, two = str(tmp / 'one'), str(tmp / 'two')
  run_pipeline(flags, one, 1)
  run_pipeline(flags, two, 2)   # once died at SEAM's first checkpoint, after pretraining's export (process 0 only)
  # SEAM keeps its BatchNorm frozen: every step compares. Pretraining (BatchNorm on batch statistics, from random
  # weights at lr 0.02) amplifies the summation-order differences of one step into percents of the next updates
  # (measured: a 1e-6 relative change of its weights changes its gradient by 4 %, and 1 process of 1 device drifts
  # from 1 process of 4 more than 2 processes do); its first step, from the same weights, compares.
  for task, compared, side in (('seam', STEPS, crop), ('pretrain', 1, PRETRAIN_SIZE)):
    single = [load(one, task, f'variables_{s}', 1)[0] for s in range(STEPS + 1)]
    pair = [load(two, task, f'variables_{s}', 2) for s in range(STEPS + 1)]
    for step, (a, b) in enumerate(pair):   # replicated: the same bits in every process
      assert set(a) == set(b) == set(single[step])
      for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=f'{task} step {step} {k}')
    for j in range(STEPS):   # the same rows: process p's rows are rows [4 p, 4 p + 4) of the global batch
      [rows], parts = load(one, task, f'batch_{j}', 1), load(two, task, f'batch_{j}', 2)
      for k in rows:
        np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), rows[k], err_msg=f'{task} {j} {k}')
    rtol = reorder_rtol(single[0], (BATCH, side, side))
    assert_reordered(single, pair, compared, rtol)
    logs = [[json.loads(l) for l in open(os.path.join(d, task, 'metrics.jsonl'))] for d in (one, two)]
    assert [l['step'] for l in logs[0]] == [l['step'] for l in logs[1]] == list(range(1, STEPS + 1))
    assert abs(logs[1][0]['loss'] - logs[0][0]['loss']) <= rtol * logs[0][0]['loss'], task   # a mean of >= 0 terms
    assert sorted(os.listdir(os.path.join(two, task, 'ckpt'))) == [str(s) for s in range(1, STEPS + 1)]
    assert os.path.isdir(os.path.join(two, task, 'export')) and len(os.listdir(os.path.join(two, task, 'tb'))) == 1


# Process `fail` fails after 2 s: an uncaught exception, or a DataError leaving a failures_reported block and turned
# into one line and exit status 1 (the trainer's block inside cli.run's); the other process waits for it in a device
# collective (gloo: the wait in which process 0 hung for minutes) or a coordination-service barrier.
FAILING = r'''
import sys, time
from seam_jax.common import distributed
from seam_jax.common.errors import DataError
coordinator, process, fail, how, wait = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
distributed.initialize(coordinator, 2, process)
from jax.experimental import multihost_utils
if process == fail:
  time.sleep(2)
  if how == 'uncaught':
    raise RuntimeError('injected\nfailure')
  try:
    with distributed.failures_reported():
      raise DataError('cannot read x.jpg')
  except DataError as e:
    sys.exit(f'error: {e}')
elif wait == 'collective':
  multihost_utils.sync_global_devices('never')
else:
  distributed.barrier('never')
'''


@pytest.mark.parametrize('fail, how, wait, shown, error', [
    (1, 'uncaught', 'collective', 'RuntimeError: injected', 'RuntimeError: injected failure'),
    (0, 'exit', 'barrier', 'error: cannot read x.jpg', 'DataError: cannot read x.jpg')])
@pytest.mark.slow
def test_a_failing_process_stops_the_others(fail, how, wait, shown, error):
  """The failing process prints its error as usual; the other stops within seconds (not at the coordination
  service's shutdown time-out, 300 s), its last line naming the failed process and its error; both exit with
  status 1."""
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=2')
  t0 = time.time()
  runs = distributed.launch_local(lambda p, c: [sys.executable, '-c', FAILING, c, str(p), str(fail), how, wait], 2,
                                  env=env, cwd=ROOT, timeout_s=120)
  assert time.time() - t0 < 60
  (rc_failed, failed), (rc_other, other) = runs[fail], runs[1 - fail]
  assert rc_failed == rc_other == 1, (failed[-2000:], other[-2000:])
  assert shown in failed, failed[-2000:]   # its traceback or its one-line error
  assert other.strip().splitlines()[-1] == f'error: process {fail} of 2 failed: {error} (process {1 - fail} stops)', (
      other[-2000:])
