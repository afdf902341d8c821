"""Backbone pretraining for the demo (configs/demo_pretrain.py): the part ImageNet plays in the real recipe.

The original starts SEAM and AffinityNet from an ImageNet ResNet38 and keeps every BatchNorm frozen. No ImageNet
weights exist here, and a randomly initialised backbone under frozen BN hardly tells some colours apart, so from
scratch the CAMs of some classes stay dead. This stage trains the same ResNet38 (the 'deeplab' network: backbone + a
stride-8 head) with BatchNorm on batch statistics, on the labelled synthetic set of seam_jax.data.pretrain_data
(soft colour classes over hue and brightness, a background class, texture families: general features, nothing of
the demo's data), then exports it. The demo's SEAM, AffinityNet and segmentation stages load
its backbone through model.init_weights (seam_jax.layout.init_weights), exactly as the ImageNet weights, and keep
its BatchNorm statistics frozen.

Every layer is trained (conv1a and b2* too: `frozen_layers` ()); the running statistics follow the batch statistics
of the whole global batch with `bn_momentum` (Flax convention; the downstream stages freeze them, so they must be
the data's: PyTorch's 0.0003 of the segmentation retrain would leave them near their init in a short run).
"""
import functools

import jax.numpy as jnp
import ml_collections
import optax

from seam_jax.data import input_pipeline, pretrain_data
from seam_jax.train import trainer

TASK = 'pretrain'   # <workdir>/pretrain/{ckpt, export, metrics.jsonl}


def make_loss_fn(bn_momentum, dropout=False):
  """loss_fn(model, variables, batch, rng, step) -> (loss, (metrics, new batch_stats)): with the image logits
  z = mean_hw DeepLab(image) (stride-8 logits, BN on the batch's statistics), split into colour and texture
  channels (pretrain_data.NUM_OUTPUTS),
    loss = mean_n CE(softmax(z_colour), soft colour target) + mean_{n: texture >= 0} -log softmax(z_texture)[texture]
  metrics: each term, and the accuracy of the argmax for the colour class (against the target's) and texture."""
  def loss_fn(model, variables, batch, rng, step):
    del step
    net = model.clone(bn_mode='sync', bn_momentum=bn_momentum)
    out, updates = net.apply(variables, batch['image'], train=True, upsample=False, dropout=dropout,
                             rngs={'dropout': rng}, mutable=['batch_stats'])
    logits = jnp.mean(out, axis=(1, 2))
    colour_logits, texture_logits = logits[:, :pretrain_data.NUM_COLOURS], logits[:, pretrain_data.NUM_COLOURS:]
    colour = jnp.mean(optax.softmax_cross_entropy(colour_logits, batch['colour']))
    texture = batch['texture'].astype(jnp.int32)
    valid = texture >= 0
    ce = optax.softmax_cross_entropy_with_integer_labels(texture_logits, jnp.maximum(texture, 0))
    n = jnp.maximum(jnp.sum(valid), 1)
    texture_loss = jnp.sum(jnp.where(valid, ce, 0.)) / n
    metrics = {'colour': colour, 'texture': texture_loss,
               'colour_acc': jnp.mean(jnp.argmax(colour_logits, -1) == jnp.argmax(batch['colour'], -1)),
               'texture_acc': jnp.sum(valid & (jnp.argmax(texture_logits, -1) == texture)) / n}
    return colour + texture_loss, (metrics, updates['batch_stats'])
  return loss_fn


def _as_is(record, rng):
  del rng   # the set's images are random already
  return record


def pretrain_source(hparams, seed):
  return pretrain_data.PretrainSource(int(hparams.num_images), int(hparams.image_size), int(seed),
                                      tuple(float(v) for v in hparams.object_scale))


def pretrain_loader(hparams, seed):
  """(loader of {'image', 'colour', 'texture'} batches of the pretraining set drawn from `seed`, number of
  images)."""
  source = pretrain_source(hparams, seed)
  loader = input_pipeline.make_loader(source, _as_is, global_batch_size=hparams.batch_size, seed=seed)
  return loader, len(source)


def pretrain_config(config):
  """The pretraining run's own config: the run's workdir, seed and network width, config.pretrain as the trainer's
  hyper-parameters (`train`), and no initial weights or BN calibration: it starts from random weights."""
  return ml_collections.ConfigDict({
      'workdir': config.workdir, 'seed': config.seed, 'train': config.pretrain.to_dict(),
      'model': dict(config.model.to_dict(), init_weights='', calibrate_bn=False)})


def pretrain_task(config):
  """Task for trainer.train on the demo config (run on `pretrain_config(config)`)."""
  p = config.pretrain
  return trainer.Task(
      name=TASK, model_kind='deeplab', hparams=p, make_loader=functools.partial(pretrain_loader, p),
      loss_fn=make_loss_fn(float(p.bn_momentum), bool(p.dropout)), init_input_shape=(64, 64),
      updates_batch_stats=True, num_outputs=pretrain_data.NUM_OUTPUTS)


def run(config):
  """Pretrain (resuming from its checkpoints) and export to <workdir>/pretrain/export; returns the variables."""
  return trainer.train(pretrain_config(config), pretrain_task(config))
