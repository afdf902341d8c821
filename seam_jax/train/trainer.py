"""Generic data-parallel trainer shared by SEAM and AffinityNet.

A `Task` names the model, its hyper-parameters (config.train / config.aff), its data and its loss; `train` does the
rest: ImageNet init, the original's SGD (seam_jax.train.optim), a jit step over a 1-D device mesh spanning every
device of every host (batch sharded on 'data', parameters replicated), tqdm + TensorBoard + metrics.jsonl logging,
orbax checkpoints holding the train state, the base rng, the grain iterator state and the metrics not logged yet
(automatic resume; damaged steps skipped: seam_jax.train.checkpoints), and the final export for the inference stages.
Per-step randomness is fold_in(base_rng, step), so a resumed run, its parameters and its log, is identical to an
uninterrupted one.
"""
import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable, Optional

from absl import logging
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm

from seam_jax import layout
from seam_jax import models
from seam_jax.common import distributed, files
from seam_jax.common.errors import DataError
from seam_jax.common.sharding import compiler_options, local_copy, make_mesh, platform, replicate, shard_batch
from seam_jax.data import voc
from seam_jax.models import export
from seam_jax.train import checkpoints, optim

P = jax.sharding.PartitionSpec


@dataclasses.dataclass
class Task:
  name: str                                 # subfolder of config.workdir ('seam', 'affinity')
  model_kind: str                           # seam_jax.models.build(model_kind, config.model)
  hparams: ml_collections.ConfigDict        # config.train or config.aff
  make_loader: Callable                     # (seed) -> (grain loader, num_records)
  loss_fn: Callable                         # (model, variables, batch, rng, step) -> (loss, metrics); jit-able
  init_input_shape: tuple                   # (H, W) for model.init
  image_summaries: Optional[Callable] = None  # (variables, batch) -> {name: uint8 (N, H, W, 3)}, host side
  input_images: Optional[Callable] = None  # batch -> network input (device augmentation); None: batch['image']
  updates_batch_stats: bool = False         # loss_fn returns (loss, (metrics, new batch_stats)): BN in train mode
  num_outputs: int = voc.NUM_CLASSES        # the class head's outputs, background included (layout.num_outputs)


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any

  @property
  def variables(self):
    return {'params': self.params, 'batch_stats': self.batch_stats}


# ------------------------------------------------------------------------------------------------------- state
def num_steps(hparams, num_records):
  """hparams.max_steps if > 0, else floor(num_records / batch_size) * epochs (the original's max_step)."""
  if hparams.max_steps > 0:
    return int(hparams.max_steps)
  steps = (num_records // hparams.batch_size) * hparams.epochs
  if steps <= 0:
    raise DataError(f'{num_records} training records give no step at batch size {hparams.batch_size}')
  return steps


@functools.lru_cache(maxsize=None)
def _jitted_init(kind, width_div, dtype, shape, num_classes):
  """One compiled model.init per model/shape; a one-off computation, so always compiled fast."""
  model = models.build(kind, ml_collections.ConfigDict({'width_div': width_div, 'dtype': dtype}),
                       num_classes=num_classes)
  x = jnp.zeros((1, *shape, 3), jnp.float32)
  return jax.jit(lambda r: flax.core.unfreeze(model.init({'params': r, 'dropout': r}, x)),
                 compiler_options=compiler_options(True))


def random_init(config, task):
  return _jitted_init(task.model_kind, int(config.model.width_div), str(config.model.dtype),
                      tuple(task.init_input_shape), task.num_outputs)


def init_variables(config, task, rng):
  """model.init on a dummy batch, then the ImageNet ResNet38 weights when configured (hparams.init_weights, else
  layout.init_weights: config.model.init_weights or the demo's pretraining export)."""
  variables = random_init(config, task)(rng)
  path = task.hparams.init_weights or layout.init_weights(config)
  if path:
    from seam_jax.models import convert  # pylint: disable=g-import-not-at-top  (lazy: only when weights are given)
    variables = convert.imagenet_init(variables, path, task.model_kind, config.model)
  elif config.model.calibrate_bn:
    loader, _ = task.make_loader(config.seed)
    batch = next(iter(loader))
    images = global_rows(task.input_images(batch) if task.input_images else batch['image'])
    model = models.build(task.model_kind, config.model, num_classes=task.num_outputs)
    variables = models.calibrate_batchnorm(model, variables, images)
    logging.info('%s: no initial weights; BatchNorm statistics calibrated on %d images', task.name, len(images))
  return variables


def global_rows(local):
  """The global batch of which `local` holds this process's block of rows (input_pipeline.make_loader), in every
  process: the same data, hence the same computation, everywhere."""
  if jax.process_count() == 1:
    return np.asarray(local)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(np.asarray(local), tiled=True))


def state_from_variables(variables, tx):
  return TrainState(step=jnp.zeros((), jnp.int32), params=variables['params'],
                    batch_stats=variables.get('batch_stats', {}), opt_state=tx.init(variables['params']))


def make_train_step(model, task, tx):
  """Pure (state, batch, base_rng) -> (state, metrics); the step's rng is fold_in(base_rng, state.step)."""
  def train_step(state, batch, rng):
    step_rng = jax.random.fold_in(rng, state.step)

    def loss_of(params):
      variables = {'params': params, 'batch_stats': state.batch_stats}
      return task.loss_fn(model, variables, batch, step_rng, state.step)
    (loss, aux), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
    metrics, batch_stats = aux if task.updates_batch_stats else (aux, state.batch_stats)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, loss=loss)
    return state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state), metrics
  return train_step


# ------------------------------------------------------------------------------------------------ data parallel
def jit_train_step(train_step, mesh, fast_compile=False):
  """jit over `mesh`: state and rng replicated, batch sharded on 'data', state donated."""
  repl = jax.sharding.NamedSharding(mesh, P())
  data = jax.sharding.NamedSharding(mesh, P('data'))
  return jax.jit(train_step, in_shardings=(repl, data, repl), out_shardings=(repl, repl), donate_argnums=(0,),
                 compiler_options=compiler_options(fast_compile, platform(mesh)))


# -------------------------------------------------------------------------------------------------- checkpoints
def _meta(config, task):
  return {'task': task.name, 'kind': task.model_kind, 'width_div': int(config.model.width_div)}


# ------------------------------------------------------------------------------------------------------ logging
class MetricLogger:
  """Scalars to TensorBoard and <dir>/metrics.jsonl, images to TensorBoard; only process 0 writes. metrics.jsonl
  lines after `start_step` (logged by a run stopped after its last checkpoint) are dropped: they come again."""

  def __init__(self, directory, start_step=0):
    self.active = distributed.is_main()
    if self.active:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      os.makedirs(directory, exist_ok=True)
      self.writer = SummaryWriter(os.path.join(directory, 'tb'))
      path = os.path.join(directory, 'metrics.jsonl')
      if os.path.exists(path):
        with open(path) as f:
          lines = [l for l in f if l.strip()]
        kept = [l for l in lines if _logged_step(l) <= start_step]
        if len(kept) < len(lines):
          files.atomic_write_text(path, ''.join(kept))
      self.jsonl = open(path, 'a')

  def scalars(self, step, scalars):
    if not self.active:
      return
    for k, v in scalars.items():
      self.writer.add_scalar(f'train/{k}', v, step)
    self.jsonl.write(json.dumps({'step': step, **scalars}) + '\n')
    self.jsonl.flush()

  def images(self, step, images):
    if self.active:
      for k, v in images.items():
        self.writer.add_images(f'train/{k}', np.asarray(v), step, dataformats='NHWC')

  def close(self):
    if self.active:
      self.writer.close()
      self.jsonl.close()


def _logged_step(line):
  try:
    return int(json.loads(line)['step'])
  except (ValueError, KeyError, TypeError):
    return -1   # a line cut by a kill: dropped


def mean_metrics(history):
  """Mean of each metric over the steps since the last log (the original's AverageMeter); `history`: host dicts.
  Summed in float64, so that values restored from a checkpoint's JSON (Python floats) give the same bits."""
  return {k: float(np.mean(np.asarray([m[k] for m in history], np.float64))) for k in history[0]}


def check_finite(task, history, first_step, mngr):
  """DataError naming the first step of `history` (host metric dicts of steps first_step, first_step + 1, ...)
  with a non-finite metric, its metrics and the checkpoint that stays."""
  for k, m in enumerate(history):
    if not all(np.isfinite(v) for v in m.values()):
      mngr.wait_until_finished()
      shown = ', '.join(f'{name}={float(v):.4g}' for name, v in sorted(m.items()))
      raise DataError(f'{task.name}: non-finite loss at step {first_step + k}: {shown}; training stopped, the '
                      f'last good checkpoint (step {mngr.latest_step()}) stays in {mngr.directory}')


# -------------------------------------------------------------------------------------------------------- train
def initial_state(config, task, mesh, mngr, data_iter, max_steps):
  """(state, base rng, tx, schedule, unlogged): restored from the latest checkpoint (with `data_iter` and the host
  metrics of its steps after the last log line) or freshly initialised (ImageNet weights when configured; no
  metrics); replicated over `mesh`."""
  init_rng, rng = jax.random.split(jax.random.PRNGKey(config.seed))
  shapes = jax.eval_shape(random_init(config, task), init_rng)
  tx, schedule = optim.make_optimizer(task.hparams, shapes['params'], max_steps)
  repl = jax.sharding.NamedSharding(mesh, P())
  abstract = jax.eval_shape(lambda v, r: {'state': state_from_variables(v, tx), 'rng': r}, shapes, rng)
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=repl), abstract)
  restored = checkpoints.restore_latest(mngr, abstract, data_iter, _meta(config, task))
  if restored is None:
    state = state_from_variables(init_variables(config, task, init_rng), tx)
    return replicate(state, mesh), replicate(rng, mesh), tx, schedule, []
  state, rng, unlogged = restored
  logging.info('%s: resumed from step %d of %s', task.name, int(state.step), mngr.directory)
  return state, rng, tx, schedule, unlogged


def train(config, task, stop_step=None):
  """Train `task` to its step count (resuming from <workdir>/<name>/ckpt if any) and export the final weights to
  <workdir>/<name>/export. `stop_step` ends this run early with a checkpoint (to split a run over jobs).

  Every process of a multi-host run calls it (jax.distributed, seam_jax.common.distributed); process 0 alone
  writes the logs and the export, checkpoints go through orbax's multi-process path. A non-finite metric (checked
  at log steps and before every save, where the host waits for the step anyway) or state (before every save) stops
  training with a DataError naming the step; the last good checkpoint stays and nothing is exported. A failure of
  one process (a file of its rows it cannot read, say) stops the others at once (distributed.failures_reported).
  Returns the final variables (host numpy)."""
  with distributed.failures_reported():
    return _train(config, task, stop_step)


def _train(config, task, stop_step):
  hp = task.hparams
  workdir = layout.task_dir(config, task.name)
  mesh = make_mesh()
  if hp.batch_size % mesh.size:
    raise DataError(f'{task.name}: batch size {hp.batch_size} (config key batch_size) is not divisible by the '
                    f'{mesh.size} devices of this run')
  loader, num_records = task.make_loader(config.seed)
  max_steps = num_steps(hp, num_records)
  data_iter = iter(loader)
  mngr = checkpoints.manager(os.path.join(workdir, 'ckpt'), hp.keep_checkpoints)
  try:
    state, rng, tx, schedule, unlogged = initial_state(config, task, mesh, mngr, data_iter, max_steps)
    start = int(state.step)
    log = MetricLogger(workdir, start)
    try:
      state = _steps(config, task, mesh, mngr, log, (state, rng, tx, schedule, data_iter, unlogged),
                     range(start, max_steps if stop_step is None else min(stop_step, max_steps)), max_steps)
    finally:
      log.close()
    mngr.wait_until_finished()
  finally:
    mngr.close()
  variables = jax.tree.map(np.asarray, local_copy(state.variables))
  if int(state.step) >= max_steps:
    if distributed.is_main():
      export.save_export(layout.export_dir(config, task.name), variables, task.model_kind, config.model)
    distributed.barrier(f'{task.name} export')   # the next stage of any process reads it
  return variables


def _steps(config, task, mesh, mngr, log, run, steps, max_steps):
  """The training loop over `steps` (a range; of max_steps in all) from `run` = (state, rng, tx, schedule,
  data_iter, unlogged host metrics of the steps before steps.start); returns the last state.

  A line is logged every log_every steps and at max_steps, with the mean metrics of the steps since the previous
  line, whichever runs made them: a checkpoint (every ckpt_every steps and at the end of this run) keeps the host
  metrics of its steps not logged yet, so split or resumed runs log what an uninterrupted one does."""
  hp, meta = task.hparams, _meta(config, task)
  state, rng, tx, schedule, data_iter, history = run
  model = models.build(task.model_kind, config.model, hp.remat, task.num_outputs)
  step_fn = jit_train_step(make_train_step(model, task, tx), mesh, hp.fast_compile)
  history, timed, t0, end = list(history), 0, time.time(), steps.stop
  bar = tqdm.tqdm(total=max_steps, initial=steps.start, desc=task.name, disable=not distributed.is_main())
  try:
    for step in steps:
      local = next(data_iter)
      state, metrics = step_fn(state, shard_batch(local, mesh), rng)
      history.append(metrics)
      if step == steps.start:   # compile + first step: keep it out of the throughput
        jax.block_until_ready(metrics)
        logging.info('%s: first step (compile included) took %.1f s', task.name, time.time() - t0)
        t0 = time.time()
      else:
        timed += 1
      bar.update(1)
      done = step + 1
      log_now, save_now = done % hp.log_every == 0 or done == max_steps, done % hp.ckpt_every == 0 or done == end
      if log_now or save_now:
        host = jax.device_get(history)
        check_finite(task, host, done - len(host) + 1, mngr)
      if log_now:
        scalars = mean_metrics(host)
        scalars.update(lr=float(schedule(step)), img_per_s=timed * hp.batch_size / (time.time() - t0))
        log.scalars(done, scalars)
        bar.set_postfix({k: f'{v:.4g}' for k, v in scalars.items()})
        if task.image_summaries is not None and hp.image_summaries and log.active:
          log.images(done, task.image_summaries(local_copy(state.variables), local))
        history, timed, t0 = [], 0, time.time()
      if save_now:
        if not bool(checkpoints.all_finite(state)):
          mngr.wait_until_finished()
          raise DataError(f'{task.name}: non-finite parameters after step {done}; training stopped, the last good '
                          f'checkpoint (step {mngr.latest_step()}) stays in {mngr.directory}')
        checkpoints.save(mngr, done, state, rng, data_iter, meta, host if history else ())
  finally:
    bar.close()   # also on an error: its message then starts on a line of its own
  return state
