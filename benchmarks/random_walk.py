"""Random-walk cost per image at VOC size, and the AffinityNet train step.

  python benchmarks/random_walk.py [--repeats=3] [--train_step] [--train_width_div=1]

A 500x375 image pads to 504x376: a 63x47 grid, n = 2961 nodes, radius 5 (34 offsets). Features are random
(448 channels) since only shapes matter. Timed, per image, from the pair affinities and pooled CAMs to the label
map: the NumPy/SciPy sparse iteration (backend numpy), the original's dense squaring (NumPy float64: the
baseline), and the jitted JAX walk with both methods on the default JAX device. --train_step also times one
AffinityNet training step (448 crop, batch 1) with the shared trainer.
"""
import os
import sys
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from seam_jax.common import bucketing  # pylint: disable=g-import-not-at-top,wrong-import-position
from seam_jax.infer import random_walk as rwm  # pylint: disable=g-import-not-at-top,wrong-import-position
from seam_jax.models.affinity import pair_affinity  # pylint: disable=g-import-not-at-top,wrong-import-position

flags.DEFINE_integer('repeats', 3, 'timed repetitions (best is reported)')
flags.DEFINE_bool('train_step', False, 'also time an AffinityNet train step (448 crop, batch 1)')
flags.DEFINE_integer('train_width_div', 1, 'width divisor of the network for --train_step (1 = full model)')
FLAGS = flags.FLAGS
H, W = 375, 500


def best_of(fn, repeats):
  fn()  # warm-up (compilation)
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return min(times)


def walk_inputs(rng):
  dh, dw = bucketing.grid_size(H, W)
  radius = rwm.walk_radius(H, W, 5)
  feats = jnp.asarray(rng.normal(size=(1, dh, dw, 448)).cumsum(1) * 0.05, jnp.float32)
  aff = np.asarray(pair_affinity(feats, radius))[0]
  cam = {c: rng.random((H, W)).astype(np.float32) for c in (6, 14)}
  return aff, rwm.pooled_cams(cam, H, W, 6.), radius


def time_walks(repeats):
  aff, cams, radius = walk_inputs(np.random.default_rng(0))
  n = cams.shape[1] * cams.shape[2]
  print(f'image {W}x{H} -> grid {cams.shape[2]}x{cams.shape[1]} = {n} nodes, radius {radius}, '
        f'{aff.shape[0]} offsets, device {jax.devices()[0].device_kind}')

  def numpy_path(dense):
    return lambda: rwm.labels_numpy(rwm.random_walk_numpy(aff, cams, radius, 8, 6, dense=dense), (H, W))[0]

  def jax_path(method):
    fn = jax.jit(lambda a, c: rwm.labels_jax(rwm.walk_jax(a, c, radius, 8, 6, method))[0])
    a, c = jnp.asarray(aff[None]), jnp.asarray(cams[None], jnp.float32)
    return lambda: np.asarray(fn(a, c))

  results = {
      'numpy dense squaring (original algorithm, baseline)': best_of(numpy_path(True), repeats),
      'numpy sparse iteration (backend numpy)': best_of(numpy_path(False), repeats),
      'jax sparse iteration (backend jax, jit)': best_of(jax_path('sparse'), repeats),
      'jax dense squaring (backend jax, jit)': best_of(jax_path('dense'), repeats),
  }
  base = next(iter(results.values()))
  for name, t in results.items():
    print(f'{name:55s} {t:8.3f} s/image   speed-up vs baseline x{base / t:7.1f}')
  same = np.mean(numpy_path(False)() == jax_path('sparse')()[0, :H, :W])
  print(f'labels equal between the numpy and jax paths: {100 * same:.3f} % of pixels')


def time_train_step(repeats, width_div):
  """One optimizer step of the full AffinityNet on a 448 crop, batch 1 (random weights: init compiles slowly)."""
  from configs import voc12  # pylint: disable=g-import-not-at-top
  from seam_jax import models  # pylint: disable=g-import-not-at-top
  from seam_jax.train import optim, trainer  # pylint: disable=g-import-not-at-top
  from seam_jax.train.affinity_task import affinity_task  # pylint: disable=g-import-not-at-top
  config = voc12.get_config()
  config.model.width_div = width_div
  task = affinity_task(config)
  model = models.build('affinity', config.model)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
  rng = np.random.default_rng(0)
  variables = jax.tree_util.tree_map_with_path(
      lambda p, s: (rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1]))).astype(np.float32)
      if p[-1].key == 'kernel' else np.full(s.shape, 1. if p[-1].key in ('scale', 'var') else 0., np.float32),
      shapes)
  tx, _ = optim.make_optimizer(config.aff, variables['params'], 10576)
  state = trainer.state_from_variables(variables, tx)
  step = jax.jit(trainer.make_train_step(model, task, tx), donate_argnums=(0,))
  p = 34
  batch = {'image': jnp.asarray(rng.normal(size=(1, 448, 448, 3)), jnp.float32),
           'aff_labels': jnp.asarray(rng.integers(0, 2, (1, 3, p, 52, 48)), jnp.uint8)}
  key = jax.random.PRNGKey(0)
  t = time.perf_counter()
  state, metrics = step(state, batch, key)
  jax.block_until_ready(metrics)
  print(f'AffinityNet train step (width_div {width_div}, 448 crop, batch 1): first call incl. compile '
        f'{time.perf_counter() - t:.1f} s')
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    state, metrics = step(state, batch, key)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t)
  print(f'AffinityNet train step: {min(times):.3f} s/step (best of {repeats}), loss {float(metrics["loss"]):.4f}')


def main(argv):
  del argv
  time_walks(FLAGS.repeats)
  if FLAGS.train_step:
    time_train_step(FLAGS.repeats, FLAGS.train_width_div)


if __name__ == '__main__':
  app.run(main)
