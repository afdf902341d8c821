"""Generic data-parallel trainer shared by SEAM and AffinityNet.

A `Task` names the model, its hyper-parameters (config.train / config.aff), its data and its loss; `train` does the
rest: ImageNet init, the original's SGD (seam_jax.train.optim), a jit step over a 1-D device mesh spanning every device of
every host (batch sharded on 'data', parameters replicated), tqdm + TensorBoard + metrics.jsonl logging, orbax
checkpoints holding the train state, the base rng and the grain iterator state (automatic resume), and the final
export for the inference stages. Per-step randomness is fold_in(base_rng, step), so a resumed run is identical to an
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
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm

from seam_jax import layout
from seam_jax import models
from seam_jax.common.errors import DataError
from seam_jax.common.sharding import local_copy, make_mesh, replicate, shard_batch
from seam_jax.models import export
from seam_jax.train import optim

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
  updates_batch_stats: bool = False         # loss_fn returns (loss, (metrics, new batch_stats)): BN in train mode


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


def compiler_options(fast):
  """XLA options for `jax.jit`: with `fast` on CPU, LLVM optimisation off. Small CPU runs compile several times
  faster (a narrow SEAM step: ~3x, random init: ~8x) and run about as fast (convolutions are library calls)."""
  return {'xla_backend_optimization_level': 0} if fast and jax.default_backend() == 'cpu' else None


@functools.lru_cache(maxsize=None)
def _jitted_init(kind, width_div, dtype, shape):
  """One compiled model.init per model/shape; a one-off computation, so always compiled fast."""
  model = models.build(kind, ml_collections.ConfigDict({'width_div': width_div, 'dtype': dtype}))
  x = jnp.zeros((1, *shape, 3), jnp.float32)
  return jax.jit(lambda r: flax.core.unfreeze(model.init({'params': r, 'dropout': r}, x)),
                 compiler_options=compiler_options(True))


def random_init(config, task):
  return _jitted_init(task.model_kind, int(config.model.width_div), str(config.model.dtype),
                      tuple(task.init_input_shape))


def init_variables(config, task, rng):
  """model.init on a dummy batch, then the ImageNet ResNet38 weights when configured (hparams.init_weights, else
  config.model.init_weights)."""
  variables = random_init(config, task)(rng)
  path = task.hparams.get('init_weights', '') or config.model.init_weights
  if path:
    from seam_jax.models import convert  # pylint: disable=g-import-not-at-top  (lazy: only when weights are given)
    variables = convert.imagenet_init(variables, path, task.model_kind, config.model)
  elif config.model.get('calibrate_bn', False):
    loader, _ = task.make_loader(config.seed)
    images = next(iter(loader))['image']
    variables = models.calibrate_batchnorm(models.build(task.model_kind, config.model), variables, images)
    logging.info('%s: no initial weights; BatchNorm statistics calibrated on %d images', task.name, len(images))
  return variables


def create_state(config, task, rng, tx=None):
  """Initial TrainState. `tx` defaults to the task's optimizer with hparams.max_steps (or 1) steps; the optimizer
  state's structure does not depend on the step count."""
  variables = init_variables(config, task, rng)
  if tx is None:
    tx, _ = optim.make_optimizer(task.hparams, variables['params'], max(int(task.hparams.max_steps), 1))
  return state_from_variables(variables, tx)


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
                 compiler_options=compiler_options(fast_compile))


# -------------------------------------------------------------------------------------------------- checkpoints
def _meta(config, task):
  return {'task': task.name, 'kind': task.model_kind, 'width_div': int(config.model.width_div)}


def checkpoint_manager(directory, keep):
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_names=('state', 'data', 'meta'))


def save_checkpoint(mngr, step, state, rng, data_iter, meta):
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave({'state': state, 'rng': rng}),
      data=grain.checkpoint.CheckpointSave(data_iter),
      meta=ocp.args.JsonSave(meta)))


def check_checkpoint(mngr, meta):
  """A checkpoint of another task, model kind or width is a DataError naming the folder."""
  saved = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
  if saved != meta:
    raise DataError(f'{mngr.directory} holds a checkpoint of {saved}, but this run trains {meta}: use another '
                    'workdir or delete that folder')


def restore_checkpoint(mngr, abstract, data_iter):
  """The latest {'state', 'rng'} as `abstract` (ShapeDtypeStructs with shardings); `data_iter` restored in place."""
  out = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract), data=grain.checkpoint.CheckpointRestore(data_iter)))
  return out['state']['state'], out['state']['rng']


# ------------------------------------------------------------------------------------------------------ logging
class MetricLogger:
  """Scalars to TensorBoard and <dir>/metrics.jsonl, images to TensorBoard; only process 0 writes."""

  def __init__(self, directory):
    self.active = jax.process_index() == 0
    if self.active:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      os.makedirs(directory, exist_ok=True)
      self.writer = SummaryWriter(os.path.join(directory, 'tb'))
      self.jsonl = open(os.path.join(directory, 'metrics.jsonl'), 'a')

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


def mean_metrics(history):
  """Mean of each metric over the steps since the last log (the original's AverageMeter)."""
  stacked = jax.device_get(history)
  return {k: float(np.mean([m[k] for m in stacked])) for k in stacked[0]}


# -------------------------------------------------------------------------------------------------------- train
def initial_state(config, task, mesh, mngr, data_iter, max_steps):
  """(state, base rng, tx, schedule): restored from the latest checkpoint (with `data_iter`) or freshly
  initialised (ImageNet weights when configured); replicated over `mesh`."""
  meta = _meta(config, task)
  resume = mngr.latest_step() is not None
  if resume:
    check_checkpoint(mngr, meta)
  init_rng, rng = jax.random.split(jax.random.PRNGKey(config.seed))
  shapes = jax.eval_shape(random_init(config, task), init_rng)
  tx, schedule = optim.make_optimizer(task.hparams, shapes['params'], max_steps)
  if not resume:
    state = state_from_variables(init_variables(config, task, init_rng), tx)
    return replicate(state, mesh), replicate(rng, mesh), tx, schedule
  repl = jax.sharding.NamedSharding(mesh, P())
  abstract = jax.eval_shape(lambda v, r: {'state': state_from_variables(v, tx), 'rng': r}, shapes, rng)
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=repl), abstract)
  state, rng = restore_checkpoint(mngr, abstract, data_iter)
  logging.info('%s: resumed from step %d of %s', task.name, int(state.step), mngr.directory)
  return state, rng, tx, schedule


def train(config, task, stop_step=None):
  """Train `task` to its step count (resuming from <workdir>/<name>/ckpt if any) and export the final weights to
  <workdir>/<name>/export. `stop_step` ends this run early with a checkpoint (to split a run over jobs).
  Returns the final variables (host numpy)."""
  hp = task.hparams
  workdir = layout.task_dir(config, task.name)
  mesh = make_mesh()
  if hp.batch_size % mesh.size:
    raise ValueError(f'{task.name}: batch size {hp.batch_size} is not divisible by {mesh.size} devices')
  loader, num_records = task.make_loader(config.seed)
  max_steps = num_steps(hp, num_records)
  data_iter = iter(loader)
  mngr = checkpoint_manager(os.path.join(workdir, 'ckpt'), hp.keep_checkpoints)
  state, rng, tx, schedule = initial_state(config, task, mesh, mngr, data_iter, max_steps)
  model = models.build(task.model_kind, config.model)
  step_fn = jit_train_step(make_train_step(model, task, tx), mesh, hp.get('fast_compile', False))
  log, meta = MetricLogger(workdir), _meta(config, task)
  start = int(state.step)
  end = max_steps if stop_step is None else min(stop_step, max_steps)
  history, timed, t0 = [], 0, time.time()
  bar = tqdm.tqdm(total=max_steps, initial=start, desc=task.name, disable=jax.process_index() != 0)
  for step in range(start, end):
    local = next(data_iter)
    state, metrics = step_fn(state, shard_batch(local, mesh), rng)
    history.append(metrics)
    if step == start:   # compile + first step: keep it out of the throughput
      jax.block_until_ready(metrics)
      logging.info('%s: first step (compile included) took %.1f s', task.name, time.time() - t0)
      t0 = time.time()
    else:
      timed += 1
    bar.update(1)
    done = step + 1
    if done % hp.log_every == 0 or done == end:
      scalars = mean_metrics(history)
      scalars.update(lr=float(schedule(step)), img_per_s=timed * hp.batch_size / (time.time() - t0))
      log.scalars(done, scalars)
      bar.set_postfix({k: f'{v:.4g}' for k, v in scalars.items()})
      if task.image_summaries is not None and hp.get('image_summaries', False) and log.active:
        log.images(done, task.image_summaries(local_copy(state.variables), local))
      history, timed, t0 = [], 0, time.time()
    if done % hp.ckpt_every == 0 or done == end:
      save_checkpoint(mngr, done, state, rng, data_iter, meta)
  bar.close()
  mngr.wait_until_finished()
  mngr.close()
  log.close()
  variables = jax.tree.map(np.asarray, local_copy(state.variables))
  if int(state.step) >= max_steps and jax.process_index() == 0:
    export.save_export(layout.export_dir(config, task.name), variables, task.model_kind, config.model)
  return variables
