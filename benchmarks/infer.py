"""Throughput of CAM inference (img/s after compilation; compilation timed separately) and of the dense CRF.

  python benchmarks/infer.py                       # demo config (narrow net) on demo-sized images + CRF
  python benchmarks/infer.py --full --size=375,500 # also the full SEAM net at the original scales

Random weights and a synthetic image: speed does not depend on the values. Views go through the same scheduler,
padding and merge as `infer.py`, without file I/O.
"""
import os
import sys
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import demo, voc12  # noqa: E402  pylint: disable=g-import-not-at-top
from seam_jax.common import bucketing  # noqa: E402  pylint: disable=g-import-not-at-top
from seam_jax.infer import crf, cam_inference  # noqa: E402  pylint: disable=g-import-not-at-top
from seam_jax.models import build  # noqa: E402  pylint: disable=g-import-not-at-top

flags.DEFINE_bool('full', False, 'also benchmark the full net (width_div 1) at the voc12 scales')
flags.DEFINE_list('size', ['375', '500'], 'H,W of the full-model / CRF image')
flags.DEFINE_list('demo_size', ['112', '128'], 'H,W of the demo-config image')
flags.DEFINE_integer('images', 4, 'images timed after the warm-up one')
flags.DEFINE_integer('batch', 0, 'views per step (0: config.infer.batch_size)')
flags.DEFINE_float('alpha', 4.0, 'CRF background power')
FLAGS = flags.FLAGS


def random_variables(model, seed=0):
  """He-normal kernels, unit-ish BatchNorm statistics, from shapes only (no compiled init)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  rng = np.random.default_rng(seed)

  def draw(path, s):
    name = path[-1].key
    if name == 'kernel':
      return rng.normal(0, np.sqrt(1 / np.prod(s.shape[:-1])), s.shape).astype(np.float32)
    return (np.ones if name in ('scale', 'var') else np.zeros)(s.shape, np.float32)
  return jax.tree_util.tree_map_with_path(draw, shapes)


def synthetic_image(hw, seed=0):
  yy, xx = np.mgrid[:hw[0], :hw[1]]
  img = np.stack([128 + 90 * np.sin(xx / (9 + 4 * c) + yy / (13 + 3 * c)) for c in range(3)], -1)
  return np.clip(img + np.random.default_rng(seed).normal(0, 15, img.shape), 0, 255).astype(np.uint8)


def bench_cam(config, hw, images, batch):
  """(compile seconds, img/s) of views -> engine -> merged CAM dicts for `images` images of size hw."""
  ic = config.infer
  model = build('seam', config.model)
  engine = cam_inference.CamEngine(random_variables(model), config.model, batch or ic.batch_size)
  img = synthetic_image(hw)
  label = np.zeros(20, np.float32)
  label[[2, 14]] = 1

  views = cam_inference.prepare_views(img, tuple(ic.scales), ic.flip, ic.bucket)
  t0 = time.perf_counter()
  for v in views:
    engine.compile(v.arrays)                  # once per padded view shape
  compile_s = time.perf_counter() - t0

  def run(n):
    items = ((k, img, cam_inference.prepare_views(img, tuple(ic.scales), ic.flip, ic.bucket)) for k in range(n))
    for _, im, outs in bucketing.schedule(engine, items, ic.max_pending):
      cam_inference.merge_views(outs, im.shape[:2], label)
  run(1)                                      # warm-up
  t0 = time.perf_counter()
  run(images)
  per_image = (time.perf_counter() - t0) / images
  return {'compile_s': compile_s, 'img_per_s': 1 / per_image, 'compilations': engine.compilations,
          'devices': engine.mesh.size, 'batch': engine.batch_size}


def bench_crf(hw, alpha, reps=3):
  img = synthetic_image(hw)
  yy, xx = np.mgrid[:hw[0], :hw[1]]
  cams = {2: np.clip(1 - np.hypot(yy - hw[0] / 2, xx - hw[1] / 3) / hw[0], 0, 1).astype(np.float32),
          14: np.clip(1 - np.hypot(yy - hw[0] / 3, xx - 2 * hw[1] / 3) / hw[0], 0, 1).astype(np.float32)}
  crf.cam_to_crf(cams, img, alpha)
  t0 = time.perf_counter()
  for _ in range(reps):
    crf.cam_to_crf(cams, img, alpha)
  return (time.perf_counter() - t0) / reps


def main(argv):
  del argv
  size = tuple(int(v) for v in FLAGS.size)
  print(f'devices: {jax.device_count()} x {jax.devices()[0].device_kind}')
  runs = [('demo', demo.get_config(), tuple(int(v) for v in FLAGS.demo_size))]
  if FLAGS.full:
    runs.append(('full', voc12.get_config(), size))
  for name, config, hw in runs:
    r = bench_cam(config, hw, FLAGS.images, FLAGS.batch)
    print(f'cam {name}: width_div {config.model.width_div}, scales {tuple(config.infer.scales)}, flip '
          f'{config.infer.flip}, image {hw[0]}x{hw[1]}, batch {r["batch"]}: {r["img_per_s"]:.3f} img/s '
          f'({1 / r["img_per_s"]:.2f} s/img), compile {r["compile_s"]:.1f} s for {r["compilations"]} shapes')
  print(f'crf: image {size[0]}x{size[1]}, 2 classes, alpha {FLAGS.alpha}: '
        f'{bench_crf(size, FLAGS.alpha):.3f} s/image (one process)')


if __name__ == '__main__':
  app.run(main)
