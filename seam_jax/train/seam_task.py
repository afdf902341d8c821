"""The SEAM training task for the generic trainer (SEAM_SPEC section 3): two views, one loss, CAM summaries."""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from seam_jax import layout, models
from seam_jax.common import ops, visual
from seam_jax.common.errors import DataError
from seam_jax.data import device_augment, voc
from seam_jax.train import equivariance, losses, trainer


def with_background_label(label):
  """(N, K) image labels -> (N, K + 1) with the background column 1."""
  return jnp.concatenate([jnp.ones_like(label[:, :1]), label], axis=1)


def check_label_width(label, outputs):
  """Static check at trace time: (N, K) labels for a class head of K + 1 `outputs` (a mismatch would broadcast or
  fail deep inside the loss)."""
  if label.shape[-1] + 1 != outputs:
    raise DataError(f'batch labels have {label.shape[-1]} classes but the SEAM class head has {outputs} outputs '
                    f'({outputs - 1} classes + background): labels and model of different class sets')


METHODS = ('seam', 'cam')  # config.train.method: the SEAM objective, or the plain-CAM baseline


def make_loss_fn(equivariance, topk_ratio, train=True, method='seam', input_images=None):
  """loss_fn(model, variables, batch, rng, step): the net on the batch and on equivariance.image(batch) (independent
  dropout), then losses.seam_loss; method 'cam' (the plain-CAM baseline): the net on the batch, losses.cam_loss.
  `train=False` turns dropout off (deterministic tests). `input_images(batch)` gives the network input (default
  batch['image']; device_augment.input_images for photometric batches)."""
  if method not in METHODS:
    raise DataError(f'config.train.method must be one of {METHODS}, got {method!r}')
  input_images = input_images or (lambda batch: batch['image'])

  def loss_fn(model, variables, batch, rng, step):
    del step
    img1 = input_images(batch)
    check_label_width(batch['label'], model.num_classes)
    label = with_background_label(batch['label'].astype(jnp.float32))
    r1, r2 = jax.random.split(rng)
    out1 = model.apply(variables, img1, train=train, rngs={'dropout': r1})
    if method == 'cam':
      return losses.cam_loss(out1, label)
    out2 = model.apply(variables, equivariance.image(img1), train=train, rngs={'dropout': r2})
    return losses.seam_loss(out1, out2, label, equivariance, topk_ratio)
  return loss_fn


def denormalize(img):
  """Normalised float HWC -> uint8 RGB."""
  return np.clip((np.asarray(img) * voc.STD + voc.MEAN) * 255., 0, 255).astype(np.uint8)



def make_image_summaries(model, input_images, max_images=2):
  """(variables, local batch) -> {'cam', 'cam_rv'}: overlays of the strongest present class's max-normalised CAM
  (eval mode) on the first images (`input_images(batch)`), with the plain image on the left."""
  first_images = jax.jit(lambda batch: input_images(jax.tree.map(lambda x: x[:max_images], batch)))

  @jax.jit
  def cams(variables, images, label):
    cam, rv = model.apply(variables, images, train=False)
    lab = with_background_label(label)[:, None, None, :]
    top = lambda c: jnp.max((ops.max_norm(c) * lab)[..., 1:], axis=-1)
    return top(cam), top(rv)

  def summaries(variables, batch):
    numeric = {k: v for k, v in batch.items() if np.asarray(v).dtype.kind in 'biuf'}
    images = np.asarray(first_images(numeric), np.float32)
    heat = jax.device_get(cams(variables, images, np.asarray(batch['label'][:max_images], np.float32)))
    base = np.stack([denormalize(x) for x in images])
    side = lambda h: np.stack([np.concatenate([b, visual.overlay(b, m)], axis=1) for b, m in zip(base, h)])
    return {'cam': side(heat[0]), 'cam_rv': side(heat[1])}
  return summaries


def seam_task(config, make_loader=None):
  """Task for trainer.train; `make_loader(seed) -> (loader, num_records)` defaults to the training loader of the
  run's data (labels (B, K)); the class head has K + 1 outputs (layout.num_outputs)."""
  if make_loader is None:
    from seam_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
    make_loader = functools.partial(input_pipeline.seam_train_loader, config)
  eq = equivariance.make_equivariance(config.train)
  num_outputs = layout.num_outputs(config)
  model = models.build('seam', config.model, num_classes=num_outputs)
  images = device_augment.input_images(int(config.data.crop_size))
  return trainer.Task(
      name='seam', model_kind='seam', hparams=config.train, make_loader=make_loader,
      loss_fn=make_loss_fn(eq, float(config.train.topk_ratio), method=config.train.method, input_images=images),
      init_input_shape=(64, 64),  # parameters do not depend on the input size; small = cheap init
      image_summaries=make_image_summaries(model, images), input_images=images, num_outputs=num_outputs)
