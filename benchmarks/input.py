"""Input-pipeline benchmarks: the generated VOC-layout set the file-reading benchmarks share, SEAM loader
throughput per host core (all augmentation on the host, or the host half of the device augmentation), the cost of
the device half, and training throughput with the real loader against synthetic batches already on the device."""
import os
import time

import numpy as np

from benchmarks import harness


def data_config(size, root, **data):
  """The size's config reading the generated set under `root` (label_source 'masks': no XML needed)."""
  c = harness.make_config(size)
  c.workdir = root
  c.data.voc_root = os.path.join(root, 'VOC2012')
  c.data.label_source, c.data.train_list = 'masks', 'train'
  c.data.update(data)
  return c


def make_dataset(size, root, num_images=32):
  """A demo-style VOC set of `num_images` train images of the size's image_hw (each side drawn in that range),
  prepared (lists, labels), with the lists 'warm' (1 id) and 'bench' (size.images ids) of the CAM benchmark."""
  from seam_jax import layout  # pylint: disable=g-import-not-at-top
  from seam_jax.data import demo_data, prepare, voc  # pylint: disable=g-import-not-at-top
  c = data_config(size, root)
  if not prepare.demo_present(c.data.voc_root):
    demo_data.generate(c.data.voc_root, num_train=num_images, num_val=2, num_aug=0, image_size=size.image_hw, seed=0)
  prepare.prepare(c)
  ids = layout.read_ids(c, 'train')
  voc.write_list(layout.list_path(c, 'warm'), ids[-1:])
  voc.write_list(layout.list_path(c, 'bench'), ids[:size.images])
  return {'images': len(ids)}


def _take(it, n):
  for _ in range(n):
    b = next(it)
  return b


def loader_job(size, root, workers, device_augment):
  """SEAM training loader images/s with `workers` worker processes (0: in this process), after a warm-up."""
  from seam_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  c = data_config(size, root, num_workers=workers, device_augment=device_augment)
  c.train.batch_size = batch = max(size.batch, 4)
  loader, _ = input_pipeline.seam_train_loader(c)
  it = iter(loader)
  _take(it, 2 + workers)
  t = time.perf_counter()
  b = _take(it, size.loader_batches)
  dt = time.perf_counter() - t
  if hasattr(it, 'close'):
    it.close()
  rate = size.loader_batches * batch / dt
  return {'img_per_s': rate, 'img_per_s_per_core': rate / max(workers, 1), 'workers': workers,
          'batch_bytes': int(sum(np.asarray(v).nbytes for v in b.values()))}


def device_half_job(size, root):
  """Seconds per image of the device half (device_augment.batch_images: jitter, normalise, crop) on the default
  device, from a real loader batch."""
  import jax  # pylint: disable=g-import-not-at-top
  from seam_jax.data import device_augment, input_pipeline  # pylint: disable=g-import-not-at-top
  c = data_config(size, root, num_workers=0, device_augment=True)
  c.train.batch_size = batch = max(size.batch, 4)
  b = {k: jax.device_put(v) for k, v in next(iter(input_pipeline.seam_train_loader(c)[0])).items()}
  fn = jax.jit(device_augment.input_images(c.data.crop_size))
  t, _ = harness.median_time(lambda: fn(b).block_until_ready(), max(size.steps, 3))
  return {'seconds_per_image': t / batch, 'img_per_s': batch / t}


def train_throughput_job(size, root, workers):
  """SEAM training img/s with the real loader (device augmentation, `workers` processes) and with the same
  first batch reused on the device (synthetic): how far the input pipeline keeps the step fed."""
  from benchmarks import train_steps  # pylint: disable=g-import-not-at-top
  from seam_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  c = data_config(size, root, num_workers=workers, device_augment=True)
  it = iter(input_pipeline.seam_train_loader(c)[0])
  first = next(it)
  task = train_steps.make_task('seam', c)
  step, compile_s, _ = train_steps.jax_train_step(c, task, first, harness.jax_variables('seam', c.model))
  steps = max(size.steps, 3)
  synthetic, _ = harness.median_time(step, steps)
  step(next(it))
  t = time.perf_counter()
  for _ in range(steps):
    step(next(it))
  real = (time.perf_counter() - t) / steps
  if hasattr(it, 'close'):
    it.close()
  return {'synthetic_img_per_s': size.batch / synthetic, 'real_img_per_s': size.batch / real,
          'real_over_synthetic': synthetic / real, 'workers': workers, 'compile_s': compile_s}
