"""The segmentation retrain task for the generic trainer (RETRAIN_SPEC section 3): DeepLab-v1 on ResNet38 trained on
the random-walk pseudo labels with per-pixel cross-entropy.

Optimisation is the trainer's (seam_jax.train.optim) with config.seg: SGD momentum 0.9, weight decay 5e-4 on the
weights, lr 1e-3 x1 (backbone convs, conv1a included: QUIRK Q1), x10 (head conv weights), x20 (cls_conv bias), BN
parameters never updated, poly 0.9 over max_steps + 1 (QUIRK Q5), 20k steps at batch 10. BatchNorm runs on batch
statistics per group of seg.bn_group images (QUIRK Q1, seam_jax.models.deeplab), so the step returns updated
running statistics (Task.updates_batch_stats).
"""
import functools

import jax
import jax.numpy as jnp

from seam_jax import layout
from seam_jax.data import voc
from seam_jax.models import deeplab
from seam_jax.train import trainer


def cross_entropy(logits, labels, ignore=voc.IGNORE):
  """torch CrossEntropyLoss(ignore_index=255): sum over pixels with label != ignore of -log softmax(logits)[label],
  divided by their number (over the whole batch). logits (N, H, W, C) float32, labels (N, H, W) integer.
  Returns (loss, number of counted pixels); a batch without a counted pixel gives 0, not NaN."""
  valid = labels != ignore
  safe = jnp.where(valid, labels, 0).astype(jnp.int32)
  nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), safe[..., None], axis=-1)[..., 0]
  count = jnp.sum(valid)
  return jnp.sum(jnp.where(valid, nll, 0.)) / jnp.maximum(count, 1), count


def make_loss_fn(bn_mode, bn_group, bn_momentum=deeplab.BN_MOMENTUM, dropout=True):
  """loss_fn(model, variables, batch, rng, step) -> (loss, (metrics, new batch_stats)): the net in training mode
  (BatchNorm `bn_mode` over groups of `bn_group` images, running statistics with `bn_momentum`; dropout unless
  `dropout=False`, for deterministic tests) on batch['image'], cross-entropy against batch['label'] (255 ignored),
  pixel accuracy as a metric."""
  def loss_fn(model, variables, batch, rng, step):
    del step
    net = model.clone(bn_mode=bn_mode, bn_group=bn_group, bn_momentum=bn_momentum)
    logits, updates = net.apply(variables, batch['image'], train=True, dropout=dropout, rngs={'dropout': rng},
                                mutable=['batch_stats'])
    labels = batch['label'].astype(jnp.int32)
    loss, count = cross_entropy(logits, labels)
    correct = jnp.sum((jnp.argmax(logits, -1) == labels) & (labels != voc.IGNORE))
    return loss, ({'pixel_acc': correct / jnp.maximum(count, 1)}, updates['batch_stats'])
  return loss_fn


def seg_hparams(config):
  """config.seg with init_weights resolved (layout.seg_init_weights), as the trainer reads it."""
  hp = config.seg.copy_and_resolve_references()
  with hp.unlocked():
    hp.init_weights = layout.seg_init_weights(config)
  return hp


def seg_task(config, make_loader=None):
  """Task for trainer.train; `make_loader(seed) -> (loader, num_records)` defaults to seg_data.seg_train_loader. The
  class head has K + 1 outputs (layout.num_outputs): pseudo labels 0..K."""
  s = config.seg
  if s.bn_mode == 'group' and s.batch_size % s.bn_group:
    raise ValueError(f'seg.batch_size {s.batch_size} is not a multiple of seg.bn_group {s.bn_group}')
  if make_loader is None:
    from seam_jax.data import seg_data  # pylint: disable=g-import-not-at-top  (OpenCV only when training)
    make_loader = functools.partial(seg_data.seg_train_loader, config)
  return trainer.Task(
      name='seg', model_kind='deeplab', hparams=seg_hparams(config), make_loader=make_loader,
      loss_fn=make_loss_fn(s.bn_mode, int(s.bn_group), float(s.bn_momentum)),
      init_input_shape=(64, 64),  # parameters do not depend on the input size; small = cheap init
      updates_batch_stats=True, num_outputs=layout.num_outputs(config))

