"""The SEAM training task for the generic trainer (SEAM_SPEC section 3): two views, one loss, CAM summaries."""
import functools

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

from seam_jax import losses, models, ops, trainer, voc


def with_background_label(label20):
  """(N, 20) image labels -> (N, 21) with the background column 1."""
  return jnp.concatenate([jnp.ones_like(label20[:, :1]), label20], axis=1)


def make_loss_fn(transform, topk_ratio, train=True):
  """loss_fn(model, variables, batch, rng, step): the net on the batch and on transform.image(batch) (independent
  dropout), then losses.seam_loss. `train=False` turns dropout off (deterministic tests)."""
  def loss_fn(model, variables, batch, rng, step):
    del step
    img1 = batch['image']
    label = with_background_label(batch['label'].astype(jnp.float32))
    r1, r2 = jax.random.split(rng)
    out1 = model.apply(variables, img1, train=train, rngs={'dropout': r1})
    out2 = model.apply(variables, transform.image(img1), train=train, rngs={'dropout': r2})
    return losses.seam_loss(out1, out2, label, transform, topk_ratio)
  return loss_fn


def denormalize(img):
  """Normalised float HWC -> uint8 RGB."""
  return np.clip((np.asarray(img) * voc.STD + voc.MEAN) * 255., 0, 255).astype(np.uint8)


def overlay(img_uint8, heat, alpha=0.5):
  """Blend a [0, 1] heat map (jet colours) over an image."""
  colour = matplotlib.colormaps['jet'](np.clip(heat, 0., 1.))[..., :3] * 255.
  return (img_uint8 * (1 - alpha) + colour * alpha).astype(np.uint8)


def make_image_summaries(model, max_images=2):
  """(variables, local batch) -> {'cam', 'cam_rv'}: overlays of the strongest present class's max-normalised CAM
  (eval mode) on the first images, with the plain image on the left."""
  @jax.jit
  def cams(variables, images, label20):
    cam, rv = model.apply(variables, images, train=False)
    lab = with_background_label(label20)[:, None, None, :]
    top = lambda c: jnp.max((ops.max_norm(c) * lab)[..., 1:], axis=-1)
    return top(cam), top(rv)

  def summaries(variables, batch):
    images = np.asarray(batch['image'][:max_images], np.float32)
    heat = jax.device_get(cams(variables, images, np.asarray(batch['label'][:max_images], np.float32)))
    base = np.stack([denormalize(x) for x in images])
    side = lambda h: np.stack([np.concatenate([b, overlay(b, m)], axis=1) for b, m in zip(base, h)])
    return {'cam': side(heat[0]), 'cam_rv': side(heat[1])}
  return summaries


def seam_task(config, make_loader=None):
  """Task for trainer.train; `make_loader(seed) -> (loader, num_records)` defaults to the VOC training loader."""
  if make_loader is None:
    from seam_jax import input_pipeline  # pylint: disable=g-import-not-at-top
    make_loader = functools.partial(input_pipeline.seam_train_loader, config)
  transform = losses.make_transform(config.train)
  model = models.build('seam', config.model)
  return trainer.Task(
      name='seam', model_kind='seam', hparams=config.train, make_loader=make_loader,
      loss_fn=make_loss_fn(transform, float(config.train.topk_ratio)),
      init_input_shape=(64, 64),  # parameters do not depend on the input size; small = cheap init
      image_summaries=make_image_summaries(model))
