"""Training-step benchmarks: SEAM, AffinityNet and the segmentation retrain, JAX (the trainer's jitted
data-parallel step, float32 or bfloat16) against the PyTorch reference (torch_reference), same weights, same batch.

One step = forward(s), loss, backward, SGD update (SEAM: the two views and the SEAM loss; AffinityNet: the pair
affinities and their loss; segmentation: training-mode BatchNorm, cross-entropy). JAX's compile time and XLA's FLOP
count and memory need are reported; the JAX job also checks that both frameworks compute the same function (eval
forward, largest output difference relative to the output's scale).
"""
import time

import numpy as np

from benchmarks import harness

KINDS = ('seam', 'affinity', 'deeplab')


def make_task(kind, config):
  from seam_jax.train import affinity_task, seam_task, seg_task  # pylint: disable=g-import-not-at-top
  none = lambda seed: (None, 0)
  return {'seam': seam_task.seam_task, 'affinity': affinity_task.affinity_task,
          'deeplab': seg_task.seg_task}[kind](config, make_loader=none)


def _affinity_grid(crop, radius=5):
  from seam_jax.models import affinity  # pylint: disable=g-import-not-at-top
  g = -(-crop // 8)
  r = affinity.effective_radius(g, g, radius)
  return len(affinity.search_offsets(r)), g - (r - 1), g - 2 * (r - 1)


def crop_of(kind, size):
  """AffinityNet needs a stride-8 grid of at least 6 for any pair: tiny crops grow to 48."""
  return max(size.crop, 48) if kind == 'affinity' else size.crop


def make_batch(kind, size, seed=0):
  """A random training batch of `kind` at the size's crop and batch."""
  r = np.random.default_rng(seed)
  crop, b = crop_of(kind, size), size.batch
  batch = {'image': r.normal(size=(b, crop, crop, 3)).astype(np.float32)}
  if kind == 'seam':
    label = (r.random((b, 20)) < 0.2).astype(np.float32)
    label[:, 0] = 1.
    batch['label'] = label
  elif kind == 'affinity':
    batch['aff_labels'] = (r.random((b, 3) + _affinity_grid(crop)) < 0.3).astype(np.uint8)
  else:
    label = r.integers(0, 21, (b, crop, crop)).astype(np.uint8)
    label[r.random(label.shape) < 0.05] = 255
    batch['label'] = label
  return batch


def jax_train_step(config, task, data, variables, max_steps=10_000):
  """(step, compile seconds, compiled) of the trainer's jitted step on a fixed host batch: step() runs one
  optimisation step and blocks until its loss is ready, returning it."""
  import jax  # pylint: disable=g-import-not-at-top
  from seam_jax import models  # pylint: disable=g-import-not-at-top
  from seam_jax.common import sharding  # pylint: disable=g-import-not-at-top
  from seam_jax.train import optim, trainer  # pylint: disable=g-import-not-at-top
  tx, _ = optim.make_optimizer(task.hparams, variables['params'], max_steps)
  mesh = sharding.make_mesh()
  holder = {'state': sharding.replicate(trainer.state_from_variables(variables, tx), mesh)}
  batch = sharding.shard_batch(data, mesh)
  rng = sharding.replicate(jax.random.PRNGKey(1), mesh)
  model = models.build(task.model_kind, config.model)
  t = time.perf_counter()
  fast = task.hparams.get('fast_compile', False)
  compiled = trainer.jit_train_step(trainer.make_train_step(model, task, tx), mesh, fast).lower(
      holder['state'], batch, rng).compile()
  compile_s = time.perf_counter() - t

  def step(b=None):
    holder['state'], metrics = compiled(holder['state'], batch if b is None else sharding.shard_batch(b, mesh), rng)
    return float(np.asarray(jax.block_until_ready(metrics['loss'])))
  return step, compile_s, compiled


def forward_parity(kind, config, variables, x):
  """max |JAX - PyTorch| / max |PyTorch| of the eval-mode outputs on x (NHWC), same weights."""
  import torch  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from seam_jax import models  # pylint: disable=g-import-not-at-top
  net = harness.torch_net(kind, int(config.model.width_div), 0).eval()
  ours = jax.jit(models.build(kind, config.model).apply)(variables, x)
  with torch.no_grad():
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    theirs = net.features(xt) if kind == 'affinity' else net(xt)
  ours, theirs = jax.tree.leaves(ours), [t.numpy().transpose(0, 2, 3, 1) for t in
                                         (theirs if isinstance(theirs, tuple) else (theirs,))]
  return max(float(np.abs(np.asarray(o, np.float32) - t).max() / np.abs(t).max()) for o, t in zip(ours, theirs))


def jax_job(kind, size, dtype='float32'):
  """One JAX row: compile time, median step time, XLA FLOPs and memory, parity (float32)."""
  config = harness.make_config(size, dtype)
  task = make_task(kind, config)
  variables = harness.jax_variables(kind, config.model)
  data = make_batch(kind, size)
  parity = forward_parity(kind, config, variables, data['image'][:1]) if dtype == 'float32' else None
  step, compile_s, compiled = jax_train_step(config, task, data, variables)
  t, loss = harness.median_time(step, size.steps)
  return {'seconds': t, 'img_per_s': size.batch / t, 'compile_s': compile_s, 'loss': loss, 'batch': size.batch,
          'crop': crop_of(kind, size), **harness.xla_analysis(compiled), 'device_peak_mb': harness.device_peak_mb(),
          'parity_rel': parity}


def _seam_torch_optimizer(net, hparams):
  """The original's groups: trainable weights 1x (wd), new-layer weights 10x (wd); BN and frozen layers fixed."""
  import torch  # pylint: disable=g-import-not-at-top
  from seam_jax.train import optim  # pylint: disable=g-import-not-at-top
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


def _torch_step(kind, config, data):
  """The original's training step of `kind` as a closure over the batch."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  from torch_reference import deeplab, losses  # pylint: disable=g-import-not-at-top
  dev = harness.torch_device()
  net = harness.torch_net(kind, int(config.model.width_div), 0).train().to(dev)
  img = torch.from_numpy(np.ascontiguousarray(data['image'].transpose(0, 3, 1, 2))).to(dev)
  if kind == 'deeplab':
    opt, label = deeplab.make_sgd(net), torch.from_numpy(data['label'].astype(np.int64)).to(dev)
    return lambda: deeplab.train_step(net, opt, img, label, 0, 20_000, int(config.seg.bn_group))
  opt = _seam_torch_optimizer(net, config.train if kind == 'seam' else config.aff)
  if kind == 'seam':
    label = torch.from_numpy(np.concatenate([np.ones_like(data['label'][:, :1]), data['label']], 1)).to(dev)
    scale = config.train.scale_factor

    def loss_fn():
      img2 = F.interpolate(img, scale_factor=scale, mode='bilinear', align_corners=True)
      return losses.t_seam_loss(*net(img), *net(img2), label, scale, config.train.topk_ratio)[0]
  else:
    masks = torch.from_numpy(data['aff_labels'].astype(np.float32)).to(dev)
    masks = masks.reshape(masks.shape[:3] + (-1,))                       # (N, 3, P, hf * wf)
    loss_fn = lambda: losses.t_affinity_loss(net(img)[1], masks[:, 0], masks[:, 1], masks[:, 2])

  def step():
    loss = loss_fn()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(loss.detach())
  return step


def torch_job(kind, size, threads=0):
  """One PyTorch row: median step time (`threads` CPU threads, 0 = all cores; or CUDA when this torch has it)."""
  threads = harness.set_torch_threads(threads)
  config = harness.make_config(size)
  step = _torch_step(kind, config, make_batch(kind, size))
  t, loss = harness.median_time(step, size.steps)
  return {'seconds': t, 'img_per_s': size.batch / t, 'loss': loss, 'batch': size.batch, 'threads': threads,
          'crop': crop_of(kind, size), 'device': harness.torch_device()}
