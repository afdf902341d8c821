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

_INSTR = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = \S+ (\w[\w\-]*)\(')
_COMPUTATION = re.compile(r'^(?:ENTRY )?%?([\w.\-]+) .*\{$')
_WINDOW = re.compile(r'window=\{size=(\d+)x(\d+)')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r'calls=%?([\w.\-]+)')


def _conv_kind(window, op_name):
  if window and int(window.group(1)) * int(window.group(2)) > 9:   # the window spans the feature map
    return 'conv kernel gradient (XLA)'
  return 'conv input gradient' if 'transpose(' in (op_name or '') else 'conv forward'


def categories(hlo_text):
  """Instruction name -> kind, from the optimised HLO text of the step (a fusion takes the kind of the
  convolution or matmul it wraps)."""
  inner, comp = {}, None
  for line in hlo_text.splitlines():          # computation -> kind of the convolution/dot it holds
    c = _COMPUTATION.match(line)
    if c and ' = ' not in line:
      comp = c.group(1)
    m = _INSTR.match(line)
    if m and comp and m.group(2) in ('convolution', 'dot'):
      op_name = _OP_NAME.search(line)
      inner[comp] = (_conv_kind(_WINDOW.search(line), op_name and op_name.group(1)) if m.group(2) == 'convolution'
                     else 'matmul (incl. matmul kernel gradients, PCM)')
  kinds = {}
  for line in hlo_text.splitlines():
    m = _INSTR.match(line)
    if not m:
      continue
    name, opcode = m.groups()
    op_name, calls = _OP_NAME.search(line), _CALLS.search(line)
    if opcode == 'convolution':
      kind = _conv_kind(_WINDOW.search(line), op_name and op_name.group(1))
    elif opcode == 'dot':
      kind = 'matmul (incl. matmul kernel gradients, PCM)'
    elif opcode == 'fusion' and calls and calls.group(1) in inner:
      kind = inner[calls.group(1)]
      if kind.startswith('conv') and 'kernel' not in kind:
        kind = _conv_kind(None, op_name and op_name.group(1))
    elif opcode in ('copy', 'transpose') or 'copy' in name or 'transpose' in name:
      kind = 'copy / transpose'
    elif opcode == 'fusion':
      kind = 'fused elementwise / reductions'
    else:
      kind = 'other'
    kinds[name] = kind
  return kinds


def profile(kind, size, steps, dtype):
  """{category: milliseconds per step}: each operation's wall-clock span (merged over the threads it ran on)."""
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
  spans = collections.defaultdict(list)     # operation -> its [start, end) on every thread
  for plane in data.planes:
    for line in plane.lines:
      if line.name == 'python' or 'Compile' in line.name or 'codegen' in line.name:
        continue
      evs = sorted(((e.start_ns, e.end_ns, e.name) for e in line.events if e.name in kinds),
                   key=lambda e: (e[0], -e[1]))
      for i, (start, end, name) in enumerate(evs):   # innermost operations only (a loop's thunk holds its body's)
        if not (i + 1 < len(evs) and evs[i + 1][0] < end):
          spans[name].append((start, end))
  total = collections.Counter()
  for name, intervals in spans.items():   # an operation split over threads counts its wall-clock span once
    reach = -1
    for start, end in sorted(intervals):
      total[kinds[name]] += max(0, end - max(start, reach)) / 1e6 / steps
      reach = max(reach, end)
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
  print(f'  {"total":45s} {whole:9.0f} ms/step')


if __name__ == '__main__':
  app.run(main)
