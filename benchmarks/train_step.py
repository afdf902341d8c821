"""SEAM training-step speed: JAX (jit, data-parallel trainer step) vs the PyTorch reference, same run, same sizes.

  python benchmarks/train_step.py                        # full net (width_div 1) at 448, batch 1 and 2; demo
  python benchmarks/train_step.py --cases=demo --steps=10

Each case times one full optimisation step (two forward passes, the SEAM loss, backward, SGD update) on random
data: JAX compile time is reported separately, then the mean of --steps timed steps after one warm-up step.
PyTorch: tests/torch_reference.SEAMRef in training mode (dropout on, BN frozen as the original), the loss of
tests/test_losses.t_seam_loss (the original's formulas) and torch.optim.SGD with the original's parameter groups.
"""
import gc
import os
import sys
import time

from absl import app, flags
import jax
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from configs import demo, voc12
from seam_jax import models
from seam_jax.common import sharding
from seam_jax.train import optim, seam_task, trainer
from torch_reference import models as torch_reference
from torch_reference.losses import t_seam_loss

CASES = {   # name: (config module, width_div, crop, batch)
    'full_b1': (voc12, 1, 448, 1),
    'full_b2': (voc12, 1, 448, 2),
    'demo': (demo, 8, 96, 8),
}
flags.DEFINE_list('cases', ['full_b1', 'full_b2', 'demo'], f'cases to run: {sorted(CASES)}')
flags.DEFINE_integer('steps', 3, 'timed steps per case (after one warm-up step)')
flags.DEFINE_bool('torch', True, 'also time the PyTorch reference')
FLAGS = flags.FLAGS


def random_batch(batch, crop, seed=0):
  r = np.random.default_rng(seed)
  label = (r.random((batch, 20)) < 0.2).astype(np.float32)
  label[:, 0] = 1.
  return {'image': r.normal(size=(batch, crop, crop, 3)).astype(np.float32), 'label': label}


def case_config(module, width_div, crop, batch):
  c = module.get_config()
  c.model.width_div, c.data.crop_size, c.train.batch_size = width_div, crop, batch
  c.model.calibrate_bn = False   # random data, no loader: speed does not depend on the BN statistics
  return c


def time_steps(step, steps):
  step()                                   # warm-up
  t = time.perf_counter()
  for _ in range(steps):
    step()
  return (time.perf_counter() - t) / steps


def bench_jax(config, data, steps):
  """(compile seconds, seconds per step) of the trainer's jit step on all local devices."""
  task = seam_task.seam_task(config, make_loader=lambda seed: (None, 0))
  model = models.build('seam', config.model)
  variables = trainer.init_variables(config, task, jax.random.PRNGKey(0))
  tx, _ = optim.make_optimizer(config.train, variables['params'], 10_000)
  mesh = sharding.make_mesh()
  holder = {'state': sharding.replicate(trainer.state_from_variables(variables, tx), mesh)}
  batch = sharding.shard_batch(data, mesh)
  rng = sharding.replicate(jax.random.PRNGKey(1), mesh)
  t = time.perf_counter()
  compiled = trainer.jit_train_step(trainer.make_train_step(model, task, tx), mesh).lower(
      holder['state'], batch, rng).compile()
  compile_s = time.perf_counter() - t

  def step():
    holder['state'], metrics = compiled(holder['state'], batch, rng)
    jax.block_until_ready(metrics['loss'])
  return compile_s, time_steps(step, steps)


def torch_optimizer(net, hparams):
  """The original's groups: trainable backbone weights (1x, wd) and new-layer weights (10x, wd); the rest frozen."""
  frozen = {id(p) for m in net.not_training for p in m.parameters()}
  frozen |= {id(p) for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters()}
  new = {id(p) for m in net.from_scratch_layers for p in m.parameters()}
  groups = [[], []]
  for p in net.parameters():
    p.requires_grad_(id(p) not in frozen)
    if id(p) not in frozen:
      groups[id(p) in new].append(p)
  return torch.optim.SGD([{'params': groups[0], 'lr': hparams.lr}, {'params': groups[1], 'lr': 10 * hparams.lr}],
                         lr=hparams.lr, momentum=optim.momentum_of(hparams), weight_decay=hparams.weight_decay)


def bench_torch(config, data, steps):
  net = torch_reference.SEAMRef(width_div=config.model.width_div).train()
  opt = torch_optimizer(net, config.train)
  img1 = torch.from_numpy(data['image'].transpose(0, 3, 1, 2).copy())
  label = torch.from_numpy(np.concatenate([np.ones_like(data['label'][:, :1]), data['label']], 1))
  scale = config.train.scale_factor

  def step():
    img2 = F.interpolate(img1, scale_factor=scale, mode='bilinear', align_corners=True)
    loss, _ = t_seam_loss(*net(img1), *net(img2), label, scale, config.train.topk_ratio)
    opt.zero_grad()
    loss.backward()
    opt.step()
  return time_steps(step, steps)


def main(argv):
  del argv
  torch.set_num_threads(os.cpu_count())
  print(f'jax {jax.__version__} on {jax.device_count()} x {jax.devices()[0].device_kind}; torch {torch.__version__} '
        f'on CPU ({torch.get_num_threads()} threads)')
  print(f'{"case":<9}{"crop":>5}{"batch":>6}{"jax compile s":>15}{"jax s/step":>12}{"jax img/s":>11}'
        f'{"torch s/step":>14}{"torch img/s":>13}{"torch/jax":>11}')
  for name in FLAGS.cases:
    module, width_div, crop, batch = CASES[name]
    config = case_config(module, width_div, crop, batch)
    data = random_batch(batch, crop)
    try:
      compile_s, jax_s = bench_jax(config, data, FLAGS.steps)
    except Exception as e:  # noqa: BLE001 - report out-of-memory and go on with the next case
      print(f'{name:<9}{crop:>5}{batch:>6}  JAX failed: {str(e).splitlines()[0][:120]}')
      continue
    finally:
      gc.collect()
      jax.clear_caches()
    row = f'{name:<9}{crop:>5}{batch:>6}{compile_s:>15.1f}{jax_s:>12.3f}{batch / jax_s:>11.2f}'
    if FLAGS.torch:
      torch_s = bench_torch(config, data, FLAGS.steps)
      row += f'{torch_s:>14.3f}{batch / torch_s:>13.2f}{torch_s / jax_s:>11.2f}'
      gc.collect()
    print(row, flush=True)


if __name__ == '__main__':
  app.run(main)
