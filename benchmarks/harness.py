"""Shared machinery of the benchmark command (benchmarks/run.py): sizes, timing, isolated runs, the machine's
description and peak, XLA's cost and memory analysis, and the same random weights for JAX and PyTorch."""
import concurrent.futures
import dataclasses
import functools
import multiprocessing
import os
import platform
import resource
import time

import numpy as np


@dataclasses.dataclass(frozen=True)
class Size:
  """One benchmark size: network width, training crop and batch, inference/random-walk/CRF image sizes, counts."""
  name: str
  config: str               # 'demo' or 'voc12': the recipe the other fields override
  width_div: int
  crop: int
  batch: int                # training batch (full size: 1 on CPU, the recipe's 8 on accelerators)
  steps: int                # timed steps / calls after the warm-up
  image_hw: tuple           # images of the generated set (CAM inference, CRF, loader)
  resize_long: tuple
  scales: tuple             # CAM inference scales (+ flips)
  images: int               # images timed in CAM inference and the CRF
  loader_batches: int


SIZES = {
    'tiny': Size('tiny', 'demo', 32, 32, 2, 2, (40, 56), (32, 48), (1.0, 0.5), 2, 4),
    'demo': Size('demo', 'demo', 8, 128, 8, 3, (128, 176), (128, 192), (1.0, 1.5), 8, 8),
    'full': Size('full', 'voc12', 1, 448, 1, 2, (375, 500), (448, 768), (0.5, 1.0, 1.5, 2.0), 2, 6),
}


def size_for_backend(size, backend):
  """Accelerators get the recipe's batch (8) and more images at full size; CPU keeps the small counts."""
  if size.name == 'full' and backend != 'cpu':
    return dataclasses.replace(size, batch=8, steps=10, images=16, loader_batches=20)
  return size


def make_config(size, dtype='float32'):
  """The size's recipe config with its overrides (random weights: no BN calibration)."""
  from configs import demo, voc12  # pylint: disable=g-import-not-at-top
  c = (demo if size.config == 'demo' else voc12).get_config()
  c.model.width_div, c.model.dtype, c.model.calibrate_bn = size.width_div, dtype, False
  c.data.crop_size = c.aff.crop_size = c.seg.crop_size = size.crop
  c.data.resize_long = size.resize_long
  c.train.batch_size = c.aff.batch_size = size.batch
  c.seg.batch_size, c.seg.bn_group = size.batch, 1 if size.batch % 5 else 5
  c.infer.scales = size.scales
  c.infer.batch_size = c.seg.test_batch_size = 0   # auto, voc12's default (the demo recipe pins 8 for its runs)
  # Only the tiny smoke test compiles without LLVM optimisation (the demo recipe's fast_compile is undone: the
  # benchmark measures optimised code).
  fast = size.name == 'tiny'
  c.train.fast_compile = c.aff.fast_compile = c.seg.fast_compile = c.model.fast_compile = fast
  return c


# ------------------------------------------------------------------------------------------------------- timing
def median_time(fn, repeats, warmup=1):
  """(median seconds of `repeats` calls of fn after `warmup` calls, last result)."""
  out = None
  for _ in range(warmup):
    out = fn()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - t)
  return float(np.median(times)), out


def peak_rss_mb():
  """This process's peak resident memory (each measurement runs in a fresh process, so it is its own)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.


def run_isolated(fn, **kwargs):
  """fn(**kwargs) in a fresh spawned process (clean memory peak, no threads or caches left by other measurements);
  returns its dict with the process's peak RSS, or {'error': ...} when it failed (out of memory, ...)."""
  ctx = multiprocessing.get_context('spawn')
  with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx, max_tasks_per_child=1) as ex:
    try:
      return ex.submit(_with_rss, fn, kwargs).result()
    except Exception as e:  # noqa: BLE001 - a failed measurement is reported, the others still run
      return {'error': f'{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ""}'}


def _with_rss(fn, kwargs):
  out = fn(**kwargs)
  return {**out, 'peak_rss_mb': peak_rss_mb()}


def torch_device():
  import torch  # pylint: disable=g-import-not-at-top
  return 'cuda' if torch.cuda.is_available() else 'cpu'


def set_torch_threads(threads=0):
  """PyTorch's intra-op threads (0: every core). OMP_WAIT_POLICY=PASSIVE (set by run.py for its children) makes
  idle OpenMP threads sleep instead of spin: the same arithmetic, but on a shared machine spinning threads stall
  each other by orders of magnitude."""
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(int(threads) or os.cpu_count())
  return torch.get_num_threads()


# ------------------------------------------------------------------------------------------------ the machine
def cpu_model():
  """The CPU's model name (/proc/cpuinfo; elsewhere platform.processor())."""
  try:
    with open('/proc/cpuinfo') as f:
      return next(l.split(':', 1)[1].strip() for l in f if l.startswith('model name'))
  except (OSError, StopIteration):
    return platform.processor() or 'unknown CPU'


def machine():
  """Where the numbers come from: CPU model and cores, accelerator, library versions, XLA flags."""
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  cpu = cpu_model()
  try:
    load = os.getloadavg()[0]
  except OSError:
    load = None
  dev = jax.devices()[0]
  return {'cpu': cpu, 'cores': os.cpu_count(), 'jax_backend': jax.default_backend(),
          'jax_devices': f'{jax.device_count()} x {dev.device_kind}', 'jax': jax.__version__,
          'torch': torch.__version__, 'torch_device': 'cuda' if torch.cuda.is_available() else 'cpu',
          'xla_flags': os.environ.get('XLA_FLAGS', ''), 'omp_wait_policy': os.environ.get('OMP_WAIT_POLICY', ''),
          'load_avg_1min': load,
          'python': platform.python_version()}


def machine_name(m):
  """File name of a machine's results: backend, device kind, core count."""
  kind = m['jax_devices'].split(' x ', 1)[1] if m['jax_backend'] != 'cpu' else m['cpu']
  slug = ''.join(c if c.isalnum() else '-' for c in kind.lower()).strip('-')
  return f"{m['jax_backend']}-{'-'.join(p for p in slug.split('-') if p)}-{m['cores']}cores"


def matmul_peak(dtype='float32', n=None, repeats=5):
  """Measured dense matmul FLOP/s of the default JAX device (n x n, n = 2048 on CPU, 8192 on accelerators)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  n = n or (2048 if jax.default_backend() == 'cpu' else 8192)
  a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), dtype)
  f = jax.jit(lambda x: x @ x)
  t, _ = median_time(lambda: f(a).block_until_ready(), repeats)
  return {'n': n, 'flops_per_s': 2 * n ** 3 / t}


def memory_analysis_mb(compiled):
  """XLA's memory analysis of a compiled jax function in MB: argument, output, temp (temporaries), alias (outputs
  in donated arguments), code (generated code) and total = argument + output + temp - alias; {} when the backend
  gives none."""
  mem = compiled.memory_analysis()
  if mem is None:
    return {}
  mb = {k: getattr(mem, f'{k}_size_in_bytes') / 2 ** 20 for k in ('argument', 'output', 'temp', 'alias')}
  mb['generated_code'] = mem.generated_code_size_in_bytes / 2 ** 20
  return {**{f'{k}_mb': v for k, v in mb.items()}, 'total_mb': mb['argument'] + mb['output'] + mb['temp'] - mb['alias']}


def xla_analysis(compiled):
  """FLOPs (XLA's count: a multiply-add is 2) and the memory the executable needs (arguments + outputs +
  temporaries - aliased) of a compiled jax function."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  out = {'flops': float(cost.get('flops', 0.)) if cost else None}
  mem = memory_analysis_mb(compiled)
  if mem:
    out.update(xla_memory_mb=mem['total_mb'], xla_temp_mb=mem['temp_mb'])
  return out


def device_peak_mb():
  """Peak accelerator memory in use (None on CPU, where peak RSS is the measure)."""
  import jax  # pylint: disable=g-import-not-at-top
  stats = jax.devices()[0].memory_stats() if jax.default_backend() != 'cpu' else None
  return stats['peak_bytes_in_use'] / 2 ** 20 if stats and 'peak_bytes_in_use' in stats else None


# ------------------------------------------------------------------------------------------------ weights
@functools.lru_cache(maxsize=None)
def torch_net(kind, width_div, seed=0):
  """A torch_reference net with random weights and BN statistics (randomize_), so that a conversion mistake would
  show as an output difference."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch_reference import deeplab, models  # pylint: disable=g-import-not-at-top
  cls = {'seam': models.SEAMRef, 'affinity': models.AffinityRef, 'deeplab': deeplab.DeepLabRef}[kind]
  torch.manual_seed(seed)   # what randomize_ leaves at PyTorch's default init (DeepLab's classifier bias)
  return models.randomize_(cls(width_div), seed=seed)


def jax_variables(kind, model_config, seed=0):
  """The same weights as torch_net(kind, ...) as Flax variables."""
  from seam_jax.models import convert  # pylint: disable=g-import-not-at-top
  from torch_reference import models  # pylint: disable=g-import-not-at-top
  net = torch_net(kind, int(model_config.width_div), seed)   # the cached net: the torch rows use the same one
  sd = {k: np.array(v) for k, v in models.state_dict_numpy(net).items()}   # copies: JAX may alias host memory
  return convert.state_dict_to_variables(sd, kind, model_config)


def synthetic_image(hw, seed=0):
  """A smooth uint8 test image with noise (speed does not depend on the values)."""
  yy, xx = np.mgrid[:hw[0], :hw[1]]
  img = np.stack([128 + 90 * np.sin(xx / (9 + 4 * c) + yy / (13 + 3 * c)) for c in range(3)], -1)
  return np.clip(img + np.random.default_rng(seed).normal(0, 15, img.shape), 0, 255).astype(np.uint8)
