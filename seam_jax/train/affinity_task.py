"""The AffinityNet training task for the generic trainer (SEAM_SPEC section 6).

Data per image: the JPEG and its two CRF score dicts, `la` (<crf_dir>_4.0: background power 4) and `ha`
(<crf_dir>_24.0). The host augmentation jitters the image colours, crops image and scores jointly (448 x 448, zero
container), flips them jointly with p 0.5 and computes the pair labels (seam_jax.train.affinity_labels) from the cropped
scores, so the device only sees {'image', 'aff_labels'}. No random resize. With config.data.device_augment the
jitter, normalisation, crop and flip of the image run in the train step instead (seam_jax.data.device_augment).

Order of crop and normalisation: the original crops the colour-jittered uint8 image (and the scores) into a zero
container and normalises afterwards, so image padding is normalised black (-mean / std), unlike SEAM training where
the crop follows normalisation and the padding is 0. `config.aff.normalize_before_crop = True` gives the latter.
"""
import dataclasses
import functools
import os

import numpy as np

from seam_jax import layout
from seam_jax.common import errors, files
from seam_jax.data import augment, device_augment, input_pipeline
from seam_jax.models.affinity import effective_radius, pair_affinity
from seam_jax.infer import score_dicts
from seam_jax.train import affinity_labels, trainer


def load_scores(la_path, ha_path, hw):
  """(la, ha) (H, W, K) score stacks of one image; files must exist, hold the same classes and match the image."""
  la_dict, ha_dict = (score_dicts.read(p, hw, score_dicts.SCORES) for p in (la_path, ha_path))
  if sorted(la_dict) != sorted(ha_dict):
    raise errors.DataError(f'{la_path} and {ha_path} hold different classes: {sorted(la_dict)} vs {sorted(ha_dict)}')
  return affinity_labels.score_stack(la_dict, la_path), affinity_labels.score_stack(ha_dict, ha_path)


class AffinitySource(input_pipeline.IdSource):
  """{'id', 'image': uint8 HWC, 'la', 'ha': float32 (H, W, K)} records (IdSource error handling: bad or missing
  files raise DataError naming them, or with on_error='skip' are logged, counted and dropped). `images`: a
  layout.Images (any data format) or a VOC root (input_pipeline.as_images)."""

  def __init__(self, images, ids, la_dir, ha_dir, on_error='raise'):
    super().__init__(ids, on_error)
    self.images, self.la_dir, self.ha_dir = input_pipeline.as_images(images), la_dir, ha_dir

  def load(self, index):
    image_id = self.ids[index]
    image = files.load_image(self.images(image_id))
    la, ha = load_scores(os.path.join(self.la_dir, image_id + '.npy'), os.path.join(self.ha_dir, image_id + '.npy'),
                         image.shape[:2])
    return {'id': image_id, 'image': image, 'la': la, 'ha': ha}

  def __repr__(self):
    digest = input_pipeline.ids_digest(self.ids)
    return (f'AffinitySource(voc_root={self.images.voc_root!r}, la_dir={self.la_dir!r}, ha_dir={self.ha_dir!r}, '
            f'num_records={len(self.ids)}, ids_crc32={digest})')


@dataclasses.dataclass(frozen=True)
class AffinityAugment:
  """Record -> {'image': float32 (crop, crop, 3), 'aff_labels': uint8 (3, P, hf, wf)} (section 6 order: colour
  jitter, joint crop, normalise, joint flip p 0.5, then labels from the cropped scores). With `device` the image
  half is left to seam_jax.data.device_augment: the uint8 image in a `canvas`^2 canvas and the draws
  (augment.photometric_record) instead of 'image'; the same draws in the same order, so the same numbers."""
  crop_size: int
  jitter: tuple
  radius: int
  normalize_before_crop: bool = False
  device: bool = False
  canvas: int = 512

  @classmethod
  def from_config(cls, config, device=False):
    return cls(int(config.aff.crop_size), tuple(config.data.jitter), int(config.aff.radius),
               bool(config.aff.normalize_before_crop), bool(device), int(config.data.aff_canvas))

  def __call__(self, record, rng):
    k = record['la'].shape[-1]
    scores = np.concatenate([record['la'], record['ha']], -1)
    jitter = augment.jitter_params(*self.jitter, rng)
    if self.device:
      box = augment.random_crop_box(scores.shape[:2], self.crop_size, rng)
      scores, flip = augment.crop_with_box(scores, box), bool(rng.random() < 0.5)
      out = augment.photometric_record(record['image'], jitter, box, max(self.canvas, self.crop_size), flip,
                                       name=record['id'])
    else:
      img = np.asarray(augment.apply_jitter(record['image'], *jitter))
      if self.normalize_before_crop:
        img = augment.normalize(img)
      (img, scores), _ = augment.random_crop(img, scores, size=self.crop_size, rng=rng)
      if not self.normalize_before_crop:
        img = augment.normalize(img)
      flip = bool(rng.random() < 0.5)
      out = {'image': (augment.hflip(img) if flip else img).astype(np.float32)}
    scores = augment.hflip(scores) if flip else scores
    return {**out, 'aff_labels': affinity_labels.affinity_labels(scores[..., :k], scores[..., k:], self.radius)}


def affinity_loader(config, seed=None):
  """(grain loader of {'image' (B, crop, crop, 3), 'aff_labels' (B, 3, P, hf, wf)}, number of records) over
  config.aff.train_list; batch config.aff.batch_size (global); workers/prefetch/on_error from config.data."""
  d = config.data
  ids = layout.read_ids(config, config.aff.train_list)
  la_dir, ha_dir = layout.score_dirs(config)
  for folder in (la_dir, ha_dir):
    if not os.path.isdir(folder):
      raise errors.DataError(f'CRF score folder not found: {folder} (run the CAM inference + CRF stage first)')
  source = AffinitySource(layout.images(config), ids, la_dir, ha_dir, on_error=d.on_error)
  augment_fn = AffinityAugment.from_config(config, device=d.device_augment)
  loader = input_pipeline.make_loader(
      source, augment_fn, global_batch_size=config.aff.batch_size,
      seed=config.seed if seed is None else seed, worker_count=d.num_workers, worker_buffer_size=max(1, d.prefetch))
  return loader, len(ids)


def make_loss_fn(radius, train=True, input_images=None):
  """loss_fn(model, variables, batch, rng, step): pair affinities of the features (dropout active when `train`),
  then affinity_labels.affinity_loss over the global batch. `input_images(batch)` gives the network input
  (default batch['image']; device_augment.input_images for photometric batches)."""
  input_images = input_images or (lambda batch: batch['image'])

  def loss_fn(model, variables, batch, rng, step):
    del step
    feats = model.apply(variables, input_images(batch), train=train, rngs={'dropout': rng})
    aff = pair_affinity(feats, effective_radius(*feats.shape[1:3], radius))
    return affinity_labels.affinity_loss(aff, batch['aff_labels'])
  return loss_fn


def affinity_task(config, make_loader=None):
  """Task for trainer.train; `make_loader(seed) -> (loader, num_records)` defaults to affinity_loader."""
  if make_loader is None:
    make_loader = functools.partial(affinity_loader, config)
  images = device_augment.input_images(int(config.aff.crop_size), bool(config.aff.normalize_before_crop))
  return trainer.Task(
      name='affinity', model_kind='affinity', hparams=config.aff, make_loader=make_loader,
      loss_fn=make_loss_fn(int(config.aff.radius), input_images=images), input_images=images,
      init_input_shape=(64, 64))  # parameters do not depend on the input size; small = cheap init
