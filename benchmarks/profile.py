"""Where a step spends its time, JAX beside the PyTorch reference: XLA's executed operations and PyTorch's operators
grouped by kind (convolution forward / gradients, matmuls, elementwise work, copies), from a jax.profiler trace and
a torch.profiler run of the same step on the same batch.

  python -m benchmarks.profile --kind=seam --crop=224 --width_div=1 [--steps=2] [--framework=both]
  python -m benchmarks.profile --kind=cam --image_hw=128,176 --width_div=8 --batch=2   # CAM inference forward

Run it single-threaded for a stable attribution on a shared machine:
  XLA_FLAGS='--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1' python -m benchmarks.profile ...
(--torch_threads=1 is the default for PyTorch.)
"""
import collections
import dataclasses
import glob
import os
import re
import sys
import tempfile

from absl import app, flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import harness, train_steps

flags.DEFINE_enum('kind', 'seam', list(train_steps.KINDS) + ['cam'],
                  'a training step, or cam: the SEAM eval forward of CAM inference (batch = views)')
flags.DEFINE_integer('crop', 224, 'training crop')
flags.DEFINE_list('image_hw', ['375', '500'], 'cam: the view size (H, W); JAX pads it to infer.bucket as the engine')
flags.DEFINE_integer('width_div', 1, 'channel divisor (1 = the real network)')
flags.DEFINE_integer('batch', 1, 'batch (cam: views, a view and its mirror alternating)')
flags.DEFINE_integer('steps', 2, 'profiled steps (after one warm-up step)')
flags.DEFINE_string('dtype', 'float32', 'float32 or bfloat16 (JAX)')
flags.DEFINE_enum('framework', 'both', ['both', 'jax', 'torch'], 'which side to profile')
flags.DEFINE_integer('torch_threads', 1, 'PyTorch CPU threads (0 = every core)')
FLAGS = flags.FLAGS

ROWS = ('conv forward', 'conv input gradient', 'conv kernel gradient', 'conv gradients (input + kernel)',
        'matmul (PCM, heads, affinities)', 'elementwise / reductions', 'copy / transpose', 'other')
WGRAD = 'conv_kernel_grad'      # seam_jax.models.conv_wgrad's named scope

_INSTR = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = \S+ (\w[\w\-]*)\(')
_COMPUTATION = re.compile(r'^(?:ENTRY )?%?([\w.\-]+) .*\{$')
_WINDOW = re.compile(r'window=\{size=(\d+)x(\d+)')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r'calls=%?([\w.\-]+)')


def _line_kind(opcode, line):
  """The kind of one HLO instruction (None: not a convolution or a dot; decided by its caller)."""
  op_name = (_OP_NAME.search(line) or [None, ''])[1]
  if WGRAD in op_name:
    return 'conv kernel gradient'
  if opcode == 'convolution':
    window = _WINDOW.search(line)
    if window and int(window.group(1)) * int(window.group(2)) > 9:   # XLA's: the window spans the feature map
      return 'conv kernel gradient'
    return 'conv input gradient' if 'transpose(' in op_name else 'conv forward'
  if opcode == 'dot':
    return 'matmul (PCM, heads, affinities)'
  return None


def categories(hlo_text):
  """Instruction name -> kind, from the optimised HLO text (a fusion takes the kind of the convolution or matmul
  it wraps; the matmul kernel gradients of conv_wgrad, fused or not, by their named scope)."""
  inner, comp = {}, None
  for line in hlo_text.splitlines():          # computation -> kind of the convolution/dot it holds
    c = _COMPUTATION.match(line)
    if c and ' = ' not in line:
      comp = c.group(1)
    m = _INSTR.match(line)
    if m and comp and m.group(2) in ('convolution', 'dot'):
      inner[comp] = _line_kind(m.group(2), line)
  kinds = {}
  for line in hlo_text.splitlines():
    m = _INSTR.match(line)
    if not m:
      continue
    name, opcode = m.groups()
    calls = _CALLS.search(line)
    kind = _line_kind(opcode, line)
    if kind is None and opcode == 'fusion' and calls and calls.group(1) in inner:
      kind = inner[calls.group(1)]
    if kind is None:
      kind = ('copy / transpose' if opcode in ('copy', 'transpose') or 'copy' in name or 'transpose' in name else
              'elementwise / reductions' if opcode == 'fusion' else 'other')
    kinds[name] = kind
  return kinds


def jax_step(kind, size, dtype):
  """(step() running one step or forward and blocking on it, its compiled executable)."""
  import jax
  config = harness.make_config(size, dtype)
  if kind == 'cam':   # the infer stage's own engine (CamEngine: PaddedSEAM, sharded over the devices)
    from seam_jax.infer import cam_inference
    engine = cam_inference.CamEngine(harness.jax_variables('seam', config.model), config.model, size.batch)
    views = cam_views(dataclasses.replace(size, batch=engine.batch_size), config.infer.bucket)
    batch = {k: np.stack([v.arrays[k] for v in views]) for k in views[0].arrays}
    compiled = engine.compile({k: jax.ShapeDtypeStruct(v.shape[1:], v.dtype) for k, v in batch.items()})
    return lambda: jax.block_until_ready(engine(batch)), compiled
  task = train_steps.make_task(kind, config)
  step, _, compiled = train_steps.jax_train_step(config, task, train_steps.make_batch(kind, size),
                                                 harness.jax_variables(kind, config.model))
  return step, compiled


def cam_views(size, bucket):
  """size.batch padded CAM views (bucketing pieces) of a synthetic image of size.image_hw at scale 1: the view
  and its mirror, alternating."""
  from seam_jax.infer import cam_inference
  pair = cam_inference.prepare_views(harness.synthetic_image(size.image_hw), (1.0,), True, bucket)
  return [pair[i % 2] for i in range(size.batch)]


def torch_step(kind, size, threads):
  """The PyTorch reference's step (train_steps) or, for cam, its per-view eval forward over the same views."""
  harness.set_torch_threads(threads)
  if kind != 'cam':
    config, batch = harness.make_config(size), train_steps.make_batch(kind, size)
    return train_steps._torch_step(kind, config, batch)  # pylint: disable=protected-access
  import torch
  from seam_jax.data import input_pipeline
  net = harness.torch_net('seam', size.width_div, 0).eval()
  pair = [torch.from_numpy(np.ascontiguousarray(v.transpose(2, 0, 1))[None]) for v, _, _ in
          input_pipeline.inference_views(harness.synthetic_image(size.image_hw), (1.0,), True)]

  @torch.no_grad()
  def step():
    for i in range(size.batch):       # the original infers one view at a time
      net(pair[i % 2])
  return step


def profile_jax(step, compiled, steps):
  """{kind: ms per step}: each XLA operation's wall-clock span (merged over the threads it ran on)."""
  import jax
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
  return dict(total)


def torch_kind(name):
  """The kind of a PyTorch operator, by name (self time: nested operators are not counted twice)."""
  if 'convolution_backward' in name:
    return 'conv gradients (input + kernel)'
  if 'conv' in name:
    return 'conv forward'
  if name in ('aten::mm', 'aten::bmm', 'aten::addmm', 'aten::baddbmm', 'aten::matmul'):
    return 'matmul (PCM, heads, affinities)'
  if name in ('aten::copy_', 'aten::clone', 'aten::contiguous', 'aten::_to_copy', 'aten::cat'):
    return 'copy / transpose'
  return 'elementwise / reductions'


def profile_torch(step, steps):
  """{kind: ms per step}: the operators' self CPU time under torch.profiler."""
  import torch
  step()
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    for _ in range(steps):
      step()
  total = collections.Counter()
  for e in prof.key_averages():
    total[torch_kind(e.key)] += e.self_cpu_time_total / 1e3 / steps
  return dict(total)


def table(res):
  """Markdown rows: kind | JAX ms | share | PyTorch ms | share (conv gradients also summed for JAX, where PyTorch
  has one operator for both)."""
  whole = {f: sum(v.values()) for f, v in res.items()}
  res = {k: dict(v) for k, v in res.items()}
  grads = ('conv input gradient', 'conv kernel gradient')
  if 'jax' in res and any(k in res['jax'] for k in grads):
    res['jax']['conv gradients (input + kernel)'] = sum(res['jax'].get(k, 0.) for k in grads)
  fw = list(res)
  out = ['| operations | ' + ' | '.join(f'{f} ms/step | {f} share' for f in fw) + ' |',
         '|---|' + '---|---|' * len(fw)]
  for k in ROWS:
    if any(k in res[f] for f in fw):
      cells = [f'{res[f][k]:.1f} | {100 * res[f][k] / whole[f]:.1f} %' if k in res[f] else '– | –' for f in fw]
      out.append(f'| {k} | ' + ' | '.join(cells) + ' |')
  out.append('| total | ' + ' | '.join(f'{whole[f]:.1f} | 100 %' for f in fw) + ' |')
  return '\n'.join(out)


def main(argv):
  del argv
  size = dataclasses.replace(harness.SIZES['full'], crop=FLAGS.crop, width_div=FLAGS.width_div, batch=FLAGS.batch,
                             image_hw=tuple(int(v) for v in FLAGS.image_hw))
  res, wall = {}, {}
  if FLAGS.framework in ('both', 'jax'):
    step, compiled = jax_step(FLAGS.kind, size, FLAGS.dtype)
    res['jax'] = profile_jax(step, compiled, FLAGS.steps)
    wall['jax'] = harness.median_time(step, FLAGS.steps)[0]
  if FLAGS.framework in ('both', 'torch'):
    step = torch_step(FLAGS.kind, size, FLAGS.torch_threads)
    res['pytorch'] = profile_torch(step, FLAGS.steps)
    wall['pytorch'] = harness.median_time(step, FLAGS.steps)[0]
  what = (f'cam forward, {FLAGS.batch} views of {size.image_hw}' if FLAGS.kind == 'cam' else
          f'{FLAGS.kind} train step, crop {FLAGS.crop}, batch {FLAGS.batch}')
  print(f'{what}, width_div {FLAGS.width_div}, JAX {FLAGS.dtype}; XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}; '
        f'SEAM_JAX_CONV_WGRAD={os.environ.get("SEAM_JAX_CONV_WGRAD", "auto")}; PyTorch threads '
        f'{FLAGS.torch_threads or os.cpu_count()}; unprofiled median step: '
        + ', '.join(f'{f} {1e3 * t:.0f} ms' for f, t in wall.items()))
  print(table(res))


if __name__ == '__main__':
  app.run(main)
