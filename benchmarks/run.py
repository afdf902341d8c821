"""The benchmark command: JAX against the PyTorch original, same machine, same weights and inputs, one run.

  python -m benchmarks.run --size=tiny|demo|full [--only=train,cam,rw,crf,loader,throughput,memory] [--out=DIR]

Every measurement runs in a fresh process (its own memory peak, nothing left over from the others) after a warm-up:
train steps as the median step time, CAM inference, CRF, loaders and real-loader training as the rate over the
whole run; the memory group: XLA's memory analysis of each step, remat off and on, against PyTorch's peak
(benchmarks/memory.py). Writes <out>/<machine>-<size>.json (every number, the machine's description) and
<out>/<machine>-<size>.md (the tables of benchmarks/README.md); groups left out by --only keep the numbers of an
earlier run in those files. The JAX backend is whatever JAX finds (CPU, GPU,
TPU); PyTorch runs on CUDA when it has it, else on every CPU core. See benchmarks/README.md for what each row means.
"""
import json
import os
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import harness, inference, input as input_bench, memory, report, train_steps
from seam_jax.common import files

GROUPS = ('train', 'cam', 'rw', 'crf', 'loader', 'throughput', 'memory')
flags.DEFINE_enum('size', 'demo', list(harness.SIZES), 'network width and image sizes (harness.SIZES)')
flags.DEFINE_list('only', list(GROUPS), f'benchmark groups to run, of {GROUPS}')
flags.DEFINE_bool('bf16', True, "also the JAX rows with config.model.dtype='bfloat16'")
flags.DEFINE_string('out', os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results'), 'results folder')
flags.DEFINE_string('root', '', 'folder for the generated data set ("" = a temporary folder)')
flags.DEFINE_integer('torch_threads', 0, 'PyTorch CPU threads (0 = every core, like XLA:CPU)')
FLAGS = flags.FLAGS


def log(msg):
  print(f'[{time.strftime("%H:%M:%S")}] {msg}', flush=True)


def measure(results, key, fn, **kwargs):
  log(f'{key} ...')
  results[key] = out = harness.run_isolated(fn, **kwargs)
  log(f'{key}: {out}')


def run_groups(size, root, groups, dtypes, threads=0):
  """{job key: result dict} of every measurement of `groups`."""
  r = {}
  measure(r, 'machine', harness.machine)
  measure(r, 'peak/float32', harness.matmul_peak, dtype='float32')
  if 'bfloat16' in dtypes:
    measure(r, 'peak/bfloat16', harness.matmul_peak, dtype='bfloat16')
  if 'train' in groups:
    for kind in train_steps.KINDS:
      for dtype in dtypes:
        measure(r, f'train/{kind}/jax/{dtype}', train_steps.jax_job, kind=kind, size=size, dtype=dtype)
      measure(r, f'train/{kind}/torch', train_steps.torch_job, kind=kind, size=size, threads=threads)
  if groups & {'cam', 'loader', 'throughput'}:
    measure(r, 'dataset', input_bench.make_dataset, size=size, root=root)
  if 'cam' in groups:
    for dtype in dtypes:
      measure(r, f'cam/jax/{dtype}', inference.cam_jax_job, size=size, root=root, dtype=dtype)
    measure(r, 'cam/torch', inference.cam_torch_job, size=size, root=root, threads=threads)
    r['cam/difference'] = {'max_abs': inference.cam_difference(root)}
  if 'rw' in groups:
    measure(r, 'rw', inference.random_walk_job, size=size, threads=threads)
  if 'crf' in groups:
    measure(r, 'crf', inference.crf_job, size=size)
  cores = os.cpu_count()
  if 'loader' in groups:
    for device in (False, True):
      for workers in sorted({1, cores}):
        measure(r, f'loader/{"device" if device else "host"}/{workers}', input_bench.loader_job, size=size,
                root=root, workers=workers, device_augment=device)
    measure(r, 'loader/device_half', input_bench.device_half_job, size=size, root=root)
  if 'throughput' in groups:
    measure(r, 'throughput', input_bench.train_throughput_job, size=size, root=root, workers=cores)
  if 'memory' in groups:
    memory.run_group(measure, r, size, threads)
  return r


def main(argv):
  del argv
  unknown = set(FLAGS.only) - set(GROUPS)
  if unknown:
    raise app.UsageError(f'--only: unknown groups {sorted(unknown)}; known: {GROUPS}')
  os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')   # inherited by the measuring processes (set_torch_threads)
  backend = harness.run_isolated(harness.machine)['jax_backend']
  size = harness.size_for_backend(harness.SIZES[FLAGS.size], backend)
  dtypes = ('float32', 'bfloat16') if FLAGS.bf16 else ('float32',)
  t0 = time.time()
  with tempfile.TemporaryDirectory() as tmp:
    results = run_groups(size, FLAGS.root or tmp, set(FLAGS.only), dtypes, FLAGS.torch_threads)
  name = os.path.join(FLAGS.out, f'{harness.machine_name(results["machine"])}-{size.name}')
  doc = {'size': size.__dict__, 'commands': [' '.join(['python -m benchmarks.run'] + sys.argv[1:])],
         'seconds': time.time() - t0, 'results': results}
  if os.path.isfile(name + '.json'):   # groups not run this time keep their numbers from the last run
    with open(name + '.json') as f:
      old = json.load(f)
    doc.update(commands=list(dict.fromkeys(old.get('commands', [old.get('command')]) + doc['commands'])),
               seconds=old.get('seconds', 0) + doc['seconds'], results={**old['results'], **results})
  md = report.markdown(doc) + memory.markdown(doc['results'])
  files.atomic_write_text(name + '.json', json.dumps(doc, indent=1, default=str))
  files.atomic_write_text(name + '.md', md)
  print(md)
  log(f'wrote {name}.json/.md in {time.time() - t0:.0f} s')


if __name__ == '__main__':
  app.run(main)
