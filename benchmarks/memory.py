"""Memory benchmarks (issue 24): what each train step needs at the original's per-GPU batch, JAX with and without
remat (trainer sections' `remat`, seam_jax.models.build) against PyTorch, and what remat costs in step time.

- `jax_memory_job`: XLA's memory analysis of the compiled step (arguments, outputs, temporaries, generated code;
  computed by the compiler, the step is never run) at the original's per-GPU batch (PER_GPU_BATCH) and the size's
  crop, remat off and on, each with the trainer's buffer donation and, for SEAM, also without it.
- `torch_memory_job`: PyTorch's peak of allocated tensor memory over two steps of the same batch (CPU: the torch
  profiler's allocation events, from before the net is built; CUDA: max_memory_allocated).
- `jax_time_job`: the JAX step time at the size's training batch (full size on CPU: 1), remat off or on; also the
  process's CPU seconds per step.
"""
import dataclasses
import time

import numpy as np

from benchmarks import harness, report, train_steps

KINDS = train_steps.KINDS
# The original's batch per GPU: SEAM and AffinityNet 8 on 4 GPUs, the segmentation retrain 10 on 2 (RETRAIN_SPEC).
PER_GPU_BATCH = {'seam': 2, 'affinity': 2, 'deeplab': 5}


def per_gpu_size(kind, size):
  return dataclasses.replace(size, batch=PER_GPU_BATCH[kind])


def _jitted_step(kind, config, variables, remat, donate=True):
  """(tx, jitted train step) of `kind` as the trainer builds it, the model with `remat`; without `donate`, the same
  jit without the state's donation."""
  import jax  # pylint: disable=g-import-not-at-top
  from seam_jax import models  # pylint: disable=g-import-not-at-top
  from seam_jax.common import sharding  # pylint: disable=g-import-not-at-top
  from seam_jax.train import optim, trainer  # pylint: disable=g-import-not-at-top
  task = train_steps.make_task(kind, config)
  tx, _ = optim.make_optimizer(task.hparams, variables['params'], 10_000)
  step = trainer.make_train_step(models.build(task.model_kind, config.model, remat, task.num_outputs), task, tx)
  mesh = sharding.make_mesh()
  if donate:
    return tx, trainer.jit_train_step(step, mesh, bool(task.hparams.fast_compile))
  repl, data = sharding.replicated(mesh), sharding.data_sharded(mesh)
  return tx, jax.jit(step, in_shardings=(repl, data, repl), out_shardings=(repl, repl),
                     compiler_options=sharding.compiler_options(bool(task.hparams.fast_compile)))


def jax_memory_job(kind, size):
  """XLA's memory analysis (MB) of `kind`'s step at the per-GPU batch: remat_off, remat_on (+ _no_donation: SEAM)."""
  import jax  # pylint: disable=g-import-not-at-top
  from seam_jax.train import trainer  # pylint: disable=g-import-not-at-top
  size = per_gpu_size(kind, size)
  config = harness.make_config(size)
  task = train_steps.make_task(kind, config)
  variables = jax.eval_shape(trainer.random_init(config, task), jax.random.PRNGKey(0))
  batch = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), train_steps.make_batch(kind, size))
  out = {'batch': size.batch, 'crop': train_steps.crop_of(kind, size)}
  for donate in (True, False) if kind == 'seam' else (True,):
    for remat in (False, True):
      tx, step = _jitted_step(kind, config, variables, remat, donate)
      state = jax.eval_shape(lambda v, tx=tx: trainer.state_from_variables(v, tx), variables)
      t = time.perf_counter()
      compiled = step.lower(state, batch, jax.random.PRNGKey(1)).compile()
      name = f'remat_{"on" if remat else "off"}' + ('' if donate else '_no_donation')
      out[name] = {**harness.memory_analysis_mb(compiled), 'compile_s': time.perf_counter() - t}
  return out


def torch_memory_job(kind, size, threads=0):
  """PyTorch's peak allocated tensor memory (MB) over two steps of `kind` at the per-GPU batch."""
  import torch  # pylint: disable=g-import-not-at-top
  threads = harness.set_torch_threads(threads)
  size = per_gpu_size(kind, size)
  config, data = harness.make_config(size), train_steps.make_batch(kind, size)
  device = harness.torch_device()
  if device == 'cuda':
    step = train_steps._torch_step(kind, config, data)  # pylint: disable=protected-access
    torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
      step()
    peak = torch.cuda.max_memory_allocated()
  else:   # allocations and frees in order, from before the net exists: their running sum's maximum is the peak
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
      step = train_steps._torch_step(kind, config, data)  # pylint: disable=protected-access
      for _ in range(2):
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == '[memory]')
    peak = float(np.max(np.cumsum([b for _, b in events])))
  return {'peak_alloc_mb': peak / 2 ** 20, 'batch': size.batch, 'crop': train_steps.crop_of(kind, size),
          'threads': threads, 'device': device}


def jax_time_job(kind, size, remat):
  """Median step time of `kind`'s JAX step at the size's batch with `remat` (the train group's weights and batch)."""
  import jax  # pylint: disable=g-import-not-at-top
  from seam_jax.common import sharding  # pylint: disable=g-import-not-at-top
  from seam_jax.train import trainer  # pylint: disable=g-import-not-at-top
  config = harness.make_config(size)
  variables = harness.jax_variables(kind, config.model)
  tx, step = _jitted_step(kind, config, variables, remat)
  mesh = sharding.make_mesh()
  holder = {'state': sharding.replicate(trainer.state_from_variables(variables, tx), mesh)}
  batch = sharding.shard_batch(train_steps.make_batch(kind, size), mesh)
  rng = sharding.replicate(jax.random.PRNGKey(1), mesh)
  t = time.perf_counter()
  compiled = step.lower(holder['state'], batch, rng).compile()
  compile_s = time.perf_counter() - t

  cpu, losses = [], []   # process CPU seconds of each call: less sensitive to other processes than seconds

  def run():
    t = time.process_time()
    holder['state'], metrics = compiled(holder['state'], batch, rng)
    losses.append(float(np.asarray(jax.block_until_ready(metrics['loss']))))
    cpu.append(time.process_time() - t)
    return losses[-1]
  seconds, loss = harness.median_time(run, size.steps)
  # first_loss: the step from the initial weights (the forward pass is the same program with remat on or off).
  return {'seconds': seconds, 'cpu_seconds': float(np.median(cpu[1:])), 'compile_s': compile_s, 'loss': loss,
          'first_loss': losses[0], 'batch': size.batch, 'remat': remat,
          **harness.memory_analysis_mb(compiled), 'device_peak_mb': harness.device_peak_mb()}


def run_group(measure, results, size, threads=0):
  """Every job of the group, each in its own process (benchmarks.run.measure)."""
  for kind in KINDS:
    measure(results, f'memory/{kind}/jax', jax_memory_job, kind=kind, size=size)
    measure(results, f'memory/{kind}/torch', torch_memory_job, kind=kind, size=size, threads=threads)
    for remat in (False, True):
      measure(results, f'memory/{kind}/time/remat_{"on" if remat else "off"}', jax_time_job, kind=kind, size=size,
              remat=remat)


# ------------------------------------------------------------------------------------------------------ report
def _ok(d):
  return isinstance(d, dict) and 'error' not in d


def _f(x, fmt='.0f'):
  return '–' if x is None else format(x, fmt)


def _mb(x):
  return _f(x, '.0f' if x is None or x >= 100 else '.3g')


def _plan(m):
  return ' / '.join(_mb(m[f'{k}_mb']) for k in ('argument', 'output', 'temp', 'generated_code')) + \
      f" / **{_mb(m['total_mb'])}**"


def _row(name, jx, pt, off, on):
  """One network's cells: XLA's plans, PyTorch's peak, their ratio, step times and their ratios, RSS."""
  get = lambda d, k: d.get(k) if _ok(d) else None
  ratio = lambda k: _f(get(on, k) / get(off, k), '.2f') if get(on, k) and get(off, k) else '–'
  torch_mb, on_mb = get(pt, 'peak_alloc_mb'), get(jx, 'remat_on') and jx['remat_on']['total_mb']
  return [name, f"{jx['batch']} x {jx['crop']}" if _ok(jx) else '–',
          _plan(jx['remat_off']) if _ok(jx) else '–', _plan(jx['remat_on']) if _ok(jx) else '–',
          f"{_mb(torch_mb)} / {_f(get(pt, 'peak_rss_mb'))}",
          _f(on_mb / torch_mb, '.2f') if on_mb and torch_mb else '–',
          f"{_f(get(off, 'seconds'), '.3g')} / {_f(get(on, 'seconds'), '.3g')}",
          f"{ratio('seconds')} / {ratio('cpu_seconds')}",
          f"{_f(get(off, 'peak_rss_mb'))} / {_f(get(on, 'peak_rss_mb'))}"]


def markdown(res):
  """The group's tables ('' when it was not run)."""
  names = {'seam': 'SEAM', 'affinity': 'AffinityNet', 'deeplab': 'segmentation'}
  rows = []
  for kind in KINDS:
    jobs = [res.get(f'memory/{kind}/{k}') for k in ('jax', 'torch', 'time/remat_off', 'time/remat_on')]
    if any(_ok(d) for d in jobs):
      rows.append(_row(names[kind], *jobs))
  if not rows:
    return ''
  batch = next((d['batch'] for k, d in res.items() if k.startswith('memory/') and '/time/' in k and _ok(d)), None)
  out = ["Memory at the original's per-GPU batch (`--only=memory`): XLA's plan of the compiled step in MB, "
         'argument / output / temporaries / generated code / **total** (arguments + outputs + temporaries - '
         "donated), remat off and on; PyTorch's peak allocated tensor memory / its process's peak RSS, same step; "
         f'JAX step time at batch {batch}, remat off / on, its ratio and the ratio of the process CPU seconds per '
         'step, and the peak RSS of those processes.', '',
         report._table(  # pylint: disable=protected-access
             ['network', 'batch x crop', 'JAX remat off', 'JAX remat on', 'PyTorch peak / RSS', 'JAX on / PyTorch',
              'JAX s/step off / on', 'on / off: s, CPU s', 'JAX RSS MB off / on'], rows), '']
  seam = res.get('memory/seam/jax')
  if _ok(seam) and 'remat_off_no_donation' in seam:
    out += ['Buffer donation (the trainer donates the state), SEAM step: total '
            + ', '.join(f"remat {r}: {_mb(seam[f'remat_{r}_no_donation']['total_mb'])} MB without, "
                        f"{_mb(seam[f'remat_{r}']['total_mb'])} MB with" for r in ('off', 'on')) + '.', '']
  return '\n'.join(out)
