"""SEAM forward (cam, cam_rv) at the training crop: jitted JAX vs the PyTorch reference, same weights, same run.

Random weights (BN statistics included) are made in the PyTorch reference (tests/torch_reference.py) and
converted, so both frameworks compute the same function; the script also reports how far the outputs differ.
JAX: trace + compile (AOT) and the first call reported separately, then the median of timed calls.
PyTorch: eval mode under torch.no_grad(), one warm-up call, then the median of timed calls.

  python benchmarks/forward.py --size=448 --batch=1 --repeats=3
"""
import os
import sys
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np
import torch

from seam_jax import models
from seam_jax.models import convert
from torch_reference import models as torch_reference

flags.DEFINE_integer('size', 448, 'input height and width')
flags.DEFINE_integer('batch', 1, 'images per forward')
flags.DEFINE_integer('repeats', 3, 'timed calls per framework (median reported)')
flags.DEFINE_integer('width_div', 1, 'channel divisor (1 = the real ResNet38)')
flags.DEFINE_string('dtype', 'float32', 'JAX compute dtype: float32 or bfloat16')
flags.DEFINE_integer('torch_threads', 0, 'PyTorch intra-op threads (0 = all cores); on a loaded machine OpenMP '
                     'threads can stall each other badly, 1 is then the fairer number')
FLAGS = flags.FLAGS


def timed(fn, repeats):
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - t0)
  return float(np.median(times)), out


def main(argv):
  del argv
  torch.set_num_threads(FLAGS.torch_threads or os.cpu_count())
  ref = torch_reference.randomize_(torch_reference.SEAMRef(FLAGS.width_div), seed=0).eval()
  cfg = convert.model_config(FLAGS.width_div, FLAGS.dtype)
  variables = convert.state_dict_to_variables(torch_reference.state_dict_numpy(ref), 'seam', cfg)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables['params']))
  x = np.random.RandomState(0).randn(FLAGS.batch, FLAGS.size, FLAGS.size, 3).astype(np.float32)

  xj = jnp.asarray(x)
  t0 = time.perf_counter()
  fwd = jax.jit(models.build('seam', cfg).apply).lower(variables, xj).compile()
  compile_s = time.perf_counter() - t0
  first_s, _ = timed(lambda: jax.block_until_ready(fwd(variables, xj)), 1)   # warm-up
  jax_s, (cam, cam_rv) = timed(lambda: jax.block_until_ready(fwd(variables, xj)), FLAGS.repeats)

  xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
  with torch.no_grad():
    ref(xt)
    torch_s, (tcam, tcam_rv) = timed(lambda: ref(xt), FLAGS.repeats)
  diff = max(np.abs(np.asarray(cam) - tcam.numpy().transpose(0, 2, 3, 1)).max(),
             np.abs(np.asarray(cam_rv) - tcam_rv.numpy().transpose(0, 2, 3, 1)).max())

  print(f'SEAM forward {FLAGS.batch}x{FLAGS.size}x{FLAGS.size}, width_div {FLAGS.width_div}, '
        f'{n_params:,} params, {os.cpu_count()} CPU cores ({jax.devices()[0].platform})')
  print(f'  JAX {FLAGS.dtype} (jit): trace + compile {compile_s:.2f} s, first call {first_s:.3f} s, '
        f'then {jax_s:.3f} s / forward (median of {FLAGS.repeats})')
  print(f'  PyTorch {torch.__version__} (eval, no_grad, {torch.get_num_threads()} threads): '
        f'{torch_s:.3f} s / forward (median of {FLAGS.repeats})')
  print(f'  PyTorch / JAX time ratio: {torch_s / jax_s:.2f}; max |output difference| {diff:.2e}')


if __name__ == '__main__':
  app.run(main)
