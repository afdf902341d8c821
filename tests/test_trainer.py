"""Generic trainer: data-parallel step equals the single-device step, bit-exact resume through the real
checkpoint code (also past a damaged newest checkpoint), of the parameters and of the logged metrics, kind mismatch
error, logs and export, a non-finite loss stops training (8 fake CPU devices, narrow SEAM net)."""
import dataclasses
import glob
import json
import os
import shutil
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from configs import demo
from seam_jax import models
from seam_jax.common import sharding
from seam_jax.common.errors import DataError
from seam_jax.data import input_pipeline
from seam_jax.models import convert
from seam_jax.train import seam_task, trainer

SIZE = 40
NUM_RECORDS = 20
# Checkpoints between log lines: the one at the stop (step 2) holds steps 1-2, the one at 3 steps 1-3 (1-2 restored),
# all averaged into the line at step 4.
RUN = dict(log_every=4, ckpt_every=3)
STOP = 2


class RandomSource:
  """Tiny random classification set (grain data source with a stable repr)."""

  def __init__(self, n, size, seed=0):
    r = np.random.default_rng(seed)
    self.images = r.normal(size=(n, size, size, 3)).astype(np.float32)
    self.labels = (r.random((n, 20)) < 0.2).astype(np.float32)

  def __len__(self):
    return len(self.images)

  def __getitem__(self, i):
    return {'id': f'img{i}', 'image': self.images[i], 'label': self.labels[i]}

  def __repr__(self):
    return f'RandomSource(n={len(self)})'


def keep(record, rng):
  del rng
  return {'image': record['image'], 'label': record['label']}


def make_config(workdir, **train):
  c = demo.get_config()
  c.workdir = str(workdir)
  c.pretrain.enabled = False   # random init with calibrated BatchNorm statistics
  c.model.width_div = 32
  c.data.crop_size = SIZE
  c.train.update(dict(batch_size=8, epochs=3, max_steps=-1, log_every=2, ckpt_every=2, image_summaries=True,
                      fast_compile=True), **train)
  return c


def task_for(config):
  def make_loader(seed):
    loader = input_pipeline.make_loader(RandomSource(NUM_RECORDS, SIZE), keep, global_batch_size=8, seed=seed)
    return loader, NUM_RECORDS
  return seam_task.seam_task(config, make_loader=make_loader)


def host(tree):
  return jax.tree.map(np.asarray, tree)


@pytest.fixture(scope='module', autouse=True)
def compilation_cache(tmp_path_factory):
  """The runs below compile the same step several times: let JAX's persistent cache reuse it (speed only)."""
  if jax.config.jax_compilation_cache_dir is None:
    jax.config.update('jax_compilation_cache_dir', str(tmp_path_factory.mktemp('jax_cache')))


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """The same run straight through, and stopped after STOP steps then resumed to the end (6 steps)."""
  root = tmp_path_factory.mktemp('runs')
  straight_cfg = make_config(root / 'straight', image_summaries=False, **RUN)
  straight = trainer.train(straight_cfg, task_for(straight_cfg))
  config = make_config(root / 'resumed', **RUN)
  task = task_for(config)
  trainer.train(config, task, stop_step=STOP)
  stopped_export = os.path.exists(root / 'resumed/seam/export')
  resumed = trainer.train(config, task)
  return dict(straight=straight, resumed=resumed, config=config, task=task, root=root,
              stopped_export=stopped_export)


@pytest.mark.slow
def test_resume_is_bit_exact(runs):
  assert not runs['stopped_export']
  for a, b in zip(jax.tree.leaves(runs['straight']), jax.tree.leaves(runs['resumed'])):
    np.testing.assert_array_equal(a, b)
  init = trainer.init_variables(runs['config'], runs['task'], jax.random.split(jax.random.PRNGKey(0))[0])
  changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(host(init)), jax.tree.leaves(runs['resumed']))]
  assert any(changed) and not all(changed)   # trained, and the frozen layers stayed put


def logged(workdir):
  with open(os.path.join(workdir, 'seam/metrics.jsonl')) as f:
    return [json.loads(l) for l in f]


def assert_logs_like(straight_dir, workdir):
  """Every metrics.jsonl line of `workdir` equals the uninterrupted run's, bit for bit, but the throughput: each
  step's metrics are the same float32 numbers (the resume is bit-exact), the ones of steps before a resume come back
  exactly from the checkpoint's JSON (float32 -> float64 -> decimal -> float64) and the mean sums them in float64,
  in step order, in both runs."""
  strip = lambda lines: [{k: v for k, v in l.items() if k != 'img_per_s'} for l in lines]
  assert strip(logged(workdir)) == strip(logged(straight_dir))


@pytest.mark.slow
def test_resumed_run_logs_what_an_uninterrupted_one_does(runs):
  assert [l['step'] for l in logged(runs['root'] / 'straight')] == [4, 6]   # every log_every steps and at the end
  assert_logs_like(runs['root'] / 'straight', runs['root'] / 'resumed')   # the line at 4 averages steps 1-4


def read_events(path):
  """Tags of a TensorBoard event file (TFRecord framing: length, crc, payload, crc)."""
  tags = set()
  with open(path, 'rb') as f:
    data = f.read()
  pos = 0
  while pos < len(data):
    (n,) = struct.unpack('<Q', data[pos:pos + 8])
    event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
    tags.update(v.tag for v in event.summary.value)
    pos += 12 + n + 4
  return tags


def test_logs_checkpoints_and_export(runs):
  work = runs['root'] / 'resumed/seam'
  lines = logged(runs['root'] / 'resumed')
  assert [l['step'] for l in lines] == [4, 6]   # none at the stop
  for l in lines:
    assert {'loss', 'cls', 'er', 'ecr', 'lr', 'img_per_s'} <= set(l) and np.isfinite(l['loss'])
  assert lines[0]['lr'] > lines[-1]['lr'] > 0
  events = glob.glob(str(work / 'tb/events.out.tfevents.*'))
  tags = set().union(*(read_events(e) for e in events))
  assert {'train/loss', 'train/ecr', 'train/lr', 'train/cam', 'train/cam_rv'} <= tags
  steps = sorted(int(os.path.basename(p)) for p in glob.glob(str(work / 'ckpt/*')) if os.path.basename(p).isdigit())
  assert steps == [STOP, 3, 6]   # at the stop, every ckpt_every=3 steps and at the end; keep_checkpoints=3
  exported = convert.load_variables(str(work / 'export'), 'seam', runs['config'].model)
  for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(runs['resumed'])):
    np.testing.assert_array_equal(a, b)


def test_checkpoint_of_another_kind_is_a_clear_error(runs):
  other = dataclasses.replace(runs['task'], model_kind='affinity')
  with pytest.raises(DataError, match=r'resumed/seam/ckpt.*affinity'):
    trainer.train(runs['config'], other)


def float32_reorder_rtol(params, image_shape):
  """Relative tolerance between two float32 evaluations of one training step that differ only in summation order.

  Splitting the batch over devices reorders the sums: the batch means of the loss, the batch x pixel sums of every
  weight gradient (all-reduced over devices) and, through XLA's blocking (which depends on the per-device batch),
  the contractions of every convolution. A float32 sum of n terms in any order is within gamma_(n-1) sum|terms|
  (gamma_n = n u / (1 - n u), u = 2^-24; Higham, Accuracy and Stability of Numerical Algorithms, 4.2) of the exact
  sum, so two orders differ by at most 2 (n - 1) u sum|terms|. To first order the relative errors of the sums on a
  path add; the longest path runs through every convolution forward (contraction K = kh * kw * c_in), back again
  (the same K) and ends in a weight gradient summed over N * H * W positions. With sum|terms| ~ |sum| (the losses
  are means of non-negative terms; a parameter leaf is judged by its norm) that gives 2 u (N H W + 2 sum K).
  """
  contraction = sum(int(np.prod(p.shape[:-1])) for p in jax.tree.leaves(params) if p.ndim == 4)
  return 2 * 2. ** -24 * (int(np.prod(image_shape[:3])) + 2 * contraction)


@pytest.mark.slow
def test_data_parallel_step_matches_single_device(runs):
  """One jit step on 1 device and on 8 (batch sharded, same global batch, same dropout rng): the same update up to
  float32 summation order; another dropout rng gives a different update (the tolerance discriminates)."""
  config, task = runs['config'], runs['task']
  model = models.build('seam', config.model)
  tx, _ = trainer.optim.make_optimizer(config.train, runs['resumed']['params'], (NUM_RECORDS // 8) * 3)
  state0 = host(trainer.state_from_variables(runs['resumed'], tx))
  batch = next(iter(task.make_loader(0)[0]))
  results = []
  for mesh, seed in ((sharding.make_mesh(jax.devices()[:1]), 7), (sharding.make_mesh(), 7), (sharding.make_mesh(), 8)):
    step = trainer.jit_train_step(trainer.make_train_step(model, task, tx), mesh, fast_compile=True)
    state, metrics = step(sharding.replicate(state0, mesh), sharding.shard_batch(batch, mesh),
                          sharding.replicate(jax.random.PRNGKey(seed), mesh))
    deltas = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - b, host(state.params), state0.params)
    results.append((jax.tree.leaves(deltas), host(metrics)))
  assert jax.device_count() == 8
  rtol = float32_reorder_rtol(state0.params, batch['image'].shape)
  (d1, m1), (d8, m8), (d_other, m_other) = results
  for k in ('loss', 'mlsm', 'amp', 'er', 'ecr'):   # means of non-negative terms
    assert abs(m8[k] - m1[k]) <= rtol * abs(m1[k]), (k, m8[k], m1[k], rtol)
  assert abs(m_other['loss'] - m1['loss']) > rtol * abs(m1['loss'])
  norm = np.linalg.norm
  moved = [norm(a) > 0 for a in d1]
  assert any(moved) and not all(moved)     # frozen layers stay put
  for a, b, c, m in zip(d1, d8, d_other, moved):
    assert norm(b - a) <= rtol * norm(a) if m else not b.any() and not c.any()
  assert all(norm(c - a) > rtol * norm(a) for a, c, m in zip(d1, d_other, moved) if m)


@pytest.mark.slow
def test_damaged_newest_checkpoint_is_skipped(runs, tmp_path, caplog):
  """The finished run's newest step with a truncated data file: a warning, the step moved aside, training resumes
  from the step before and ends bit-identical to the uninterrupted run, its log lines too."""
  config = make_config(tmp_path, image_summaries=False, **RUN)
  shutil.copytree(runs['root'] / 'resumed/seam/ckpt', tmp_path / 'seam/ckpt')
  [data] = glob.glob(str(tmp_path / 'seam/ckpt/6/state/d/*'))
  with open(data, 'r+b') as f:
    f.truncate(os.path.getsize(data) // 2)
  final = trainer.train(config, task_for(config))
  assert any('checkpoint step 6' in r.getMessage() and 'resuming from step 3' in r.getMessage()
             for r in caplog.records if r.levelname == 'WARNING')
  assert os.path.isdir(tmp_path / 'seam/ckpt_damaged/6')
  for a, b in zip(jax.tree.leaves(runs['straight']), jax.tree.leaves(final)):
    np.testing.assert_array_equal(a, b)
  assert_logs_like(runs['root'] / 'straight', tmp_path)   # steps 1-3 from the checkpoint of step 3


@pytest.mark.slow
def test_non_finite_loss_stops_training(tmp_path):
  """A loss that turns NaN from step 4 on: a DataError naming step 4 and its metrics; the checkpoint of step 2
  stays, nothing later is saved and nothing is exported."""
  config = make_config(tmp_path, image_summaries=False)
  task = task_for(config)

  def loss_fn(model, variables, batch, rng, step):
    loss, metrics = task.loss_fn(model, variables, batch, rng, step)
    return loss * jnp.where(step >= 3, jnp.nan, 1.), metrics
  with pytest.raises(DataError, match=r'^seam: non-finite loss at step 4: .*loss=nan.*checkpoint \(step 2\)'):
    trainer.train(config, dataclasses.replace(task, loss_fn=loss_fn))
  assert sorted(os.listdir(tmp_path / 'seam/ckpt')) == ['2']
  assert not os.path.exists(tmp_path / 'seam/export')
