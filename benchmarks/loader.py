"""Throughput of the SEAM training input pipeline (images/s) at the full recipe's 448 crops.

Demo-style images are generated at VOC size (sides 375..500 px), prepared, and read through seam_train_loader with
configs/voc12.py's augmentation (long side 448..768, jitter, 448 crop), after a warm-up.

  python benchmarks/loader.py --workers=2 --batches=30
"""
import os
import sys
import tempfile
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from configs import voc12
from seam_jax.data import demo_data
from seam_jax.data import input_pipeline
from seam_jax.data import prepare

flags.DEFINE_integer('workers', 2, 'grain worker processes (config.data.num_workers)')
flags.DEFINE_integer('batch_size', 8, 'global batch')
flags.DEFINE_integer('num_images', 64, 'generated images (train list)')
flags.DEFINE_integer('warmup', 4, 'batches before timing')
flags.DEFINE_integer('batches', 30, 'timed batches')
flags.DEFINE_string('root', '', 'folder for the generated data ("" = a temporary folder)')
FLAGS = flags.FLAGS


def run(root):
  c = voc12.get_config()
  c.data.voc_root, c.data.list_dir = os.path.join(root, 'VOC2012'), os.path.join(root, 'lists')
  c.data.cls_labels = os.path.join(root, 'lists', 'cls_labels.npy')
  c.data.num_workers, c.data.label_source, c.data.train_list = FLAGS.workers, 'masks', 'train'
  c.train.batch_size = FLAGS.batch_size
  if not prepare.demo_present(c.data.voc_root):
    demo_data.generate(c.data.voc_root, num_train=FLAGS.num_images, num_val=4, num_aug=0,
                       image_size=(375, 500), seed=0, workers=FLAGS.workers)
  prepare.prepare(c, workers=FLAGS.workers)
  loader, _ = input_pipeline.seam_train_loader(c)
  it = iter(loader)
  for _ in range(FLAGS.warmup):
    b = next(it)
  t0 = time.perf_counter()
  for _ in range(FLAGS.batches):
    b = next(it)
  dt = time.perf_counter() - t0
  if hasattr(it, 'close'):
    it.close()  # releases the worker processes and their shared memory
  print(f"seam_train_loader: {FLAGS.batches * FLAGS.batch_size / dt:.1f} images/s "
        f"(batch {tuple(b['image'].shape)}, {FLAGS.workers} workers, {os.cpu_count()} cores, "
        f"{FLAGS.batches} batches after {FLAGS.warmup} warm-up)")


def main(argv):
  del argv
  if FLAGS.root:
    run(FLAGS.root)
  else:
    with tempfile.TemporaryDirectory() as tmp:
      run(tmp)


if __name__ == '__main__':
  app.run(main)
