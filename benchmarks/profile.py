"""Where a JAX training step spends its time: XLA's executed operations grouped by kind (convolution forward /
input gradient / kernel gradient, matmuls, fused elementwise loops, copies), from a jax.profiler trace.

  python -m benchmarks.profile --kind=seam --crop=224 --width_div=1 [--steps=2]

Run it single-threaded for a stable attribution on a shared machine:
  XLA_FLAGS='--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1' python -m benchmarks.profile ...
"""
import collections
import dataclasses
import glob
import os
import re
import sys
import tempfile

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import harness, train_steps

flags.DEFINE_enum('kind', 'seam', list(train_steps.KINDS), 'which training step')
flags.DEFINE_integer('crop', 224, 'training crop')
flags.DEFINE_integer('width_div', 1, 'channel divisor (1 = the real network)')
flags.DEFINE_integer('batch', 1, 'batch')
flags.DEFINE_integer('steps', 2, 'profiled steps (after one warm-up step)')
flags.DEFINE_string('dtype', 'float32', 'float32 or bfloat16')
FLAGS = flags.FLAGS

_INSTR = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = \S+ (\w[\w\-]*)\(.*?(?:window=\{size=(\d+)x(\d+))?.*?'
                    r'(?:op_name="([^"]*)")?')


def categories(hlo_text):
  """Instruction name -> kind, from the optimised HLO text of the step."""
  kinds = {}
  for line in hlo_text.splitlines():
    m = _INSTR.match(line)
    if not m:
      continue
    name, opcode, wh, ww, op_name = m.groups()
    if opcode == 'convolution':
      if wh and int(wh) * int(ww) > 9:
        kind = 'conv kernel gradient (XLA)'
      elif op_name and 'transpose(' in op_name:
        kind = 'conv input gradient'
      else:
        kind = 'conv forward'
    elif opcode == 'dot' or 'dot' in name:
      kind = 'matmul (incl. matmul kernel gradients, PCM)'
    elif opcode in ('copy', 'transpose') or 'copy' in name or 'transpose' in name:
      kind = 'copy / transpose'
    elif opcode == 'fusion':
      kind = 'fused elementwise / reductions'
    else:
      kind = 'other'
    kinds[name] = kind
  return kinds


def profile(kind, size, steps, dtype):
  """{category: milliseconds per step} summed over XLA's execution threads."""
  import jax  # pylint: disable=g-import-not-at-top
  config = harness.make_config(size, dtype)
  task = train_steps.make_task(kind, config)
  step, _, compiled = train_steps.jax_train_step(config, task, train_steps.make_batch(kind, size),
                                                 harness.jax_variables(kind, config.model))
  kinds = categories(compiled.as_text())
  step()
  with tempfile.TemporaryDirectory() as tmp:
    jax.profiler.start_trace(tmp)
    for _ in range(steps):
      step()
    jax.profiler.stop_trace()
    data = jax.profiler.ProfileData.from_file(glob.glob(f'{tmp}/**/*.xplane.pb', recursive=True)[0])
  total = collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      if line.name == 'python' or 'Compile' in line.name or 'codegen' in line.name:
        continue
      for ev in line.events:
        if ev.name in kinds:
          total[kinds[ev.name]] += ev.duration_ns / 1e6 / steps
  return dict(total.most_common())


def main(argv):
  del argv
  size = dataclasses.replace(harness.SIZES['full'], crop=FLAGS.crop, width_div=FLAGS.width_div, batch=FLAGS.batch)
  res = profile(FLAGS.kind, size, FLAGS.steps, FLAGS.dtype)
  whole = sum(res.values())
  print(f'{FLAGS.kind} train step, crop {FLAGS.crop}, width_div {FLAGS.width_div}, batch {FLAGS.batch}, '
        f'{FLAGS.dtype}; XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}; '
        f'SEAM_JAX_CONV_WGRAD={os.environ.get("SEAM_JAX_CONV_WGRAD", "auto")}')
  for k, v in res.items():
    print(f'  {k:45s} {v:9.0f} ms/step  {100 * v / whole:5.1f} %')
  print(f'  {"total (op time summed over threads)":45s} {whole:9.0f} ms/step')


if __name__ == '__main__':
  app.run(main)
