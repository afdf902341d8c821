"""Running stages (seam_jax.stages) with their records: what to run, what to skip, and why.

Before each stage the record it would write now is compared with the stored one (seam_jax.provenance.check):
complete -> "skipped: outputs complete"; missing or interrupted -> it runs, resuming; stale (a field it reads, an
input or the version changed; outputs without a record; outputs changed by hand) or --force -> it starts afresh and
its start line says why (`train: started (train.lr 0.01 -> 0.02)`). Starting afresh: a training stage's task folder
is moved to <workdir>/superseded/<task>.<k> (never resumed into), a per-image stage's output files are removed. A
stage that reran changes its outputs' fingerprints, so the stages reading them follow.

The run folder holds the resolved config (<workdir>/config.json), the records (<workdir>/records/<stage>.json) and
the log of stage times and summaries (<workdir>/stages.json). `pipeline` holds the workdir lock around it all (one
run per workdir). With several processes every process takes the same decisions; process 0 alone writes records
and moves or removes files, between barriers.
"""
import json
import os
import time

from absl import flags

from seam_jax import layout, provenance, stages
from seam_jax.common import distributed, files, workdir_lock

flags.DEFINE_bool('force', False, 'run the selected stages afresh even where their outputs are complete')


def fmt_seconds(s):
  if s is None:
    return '-'
  if s < 60:
    return f'{s:.1f} s'
  m, s = divmod(int(round(s)), 60)
  return f'{m}m{s:02d}s' if m < 60 else f'{m // 60}h{m % 60:02d}m'


def _short(summary, config):
  """One-line gist of a stage summary: mIoUs of evaluations (over the run's K + 1 classes), else a few scalar
  fields."""
  if summary and all(isinstance(v, dict) and 'miou' in v for v in summary.values()):
    n = layout.num_outputs(config)
    return '; '.join(f'{k} mIoU {100 * v["miou"]:.1f} ({n} classes) / {100 * v["miou_present"]:.1f} (present)'
                     for k, v in summary.items())
  scalars = [(k, v) for k, v in (summary or {}).items() if isinstance(v, (int, float))]
  return ', '.join(f'{k} {v:.4g}' if isinstance(v, float) else f'{k} {v}' for k, v in scalars[:5])


def read_log(config):
  path = layout.stage_log(config)
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    return json.load(f)


# ------------------------------------------------------------------------------------------------ decisions
def check(st, config):
  """(state, reasons, record) of stage `st` on `config` (seam_jax.provenance.check)."""
  return provenance.check(config.workdir, st.name, provenance.read_fields(config, st.fields), st.inputs(config),
                          st.outputs(config))


def user_data(config):
  """The data folders and files the run reads but did not create, where nothing may be written (seam_jax.common.files
  .protecting): data.voc_root unless the demo generated it (or may: missing or empty), data.sbd_root, eval.gt_dir,
  and the COCO / CSV formats' annotation files and image folders."""
  from seam_jax.data import prepare as prepare_lib  # pylint: disable=g-import-not-at-top
  d = config.data
  roots = [d.sbd_root, config.eval.gt_dir, d.train_annotations, d.val_annotations, d.image_dir, d.val_image_dir,
           d.dataset_file]
  voc_root = d.voc_root
  if voc_root and not prepare_lib.demo_may_write(voc_root):
    roots.append(voc_root)
  return [r for r in roots if r]


def start_afresh(st, config):
  """Clear the way for a run from scratch (module doc); process 0 only."""
  if st.kind == 'train':
    src = layout.task_dir(config, st.task)
    if os.path.exists(src):
      dst_dir = layout.superseded_dir(config)
      os.makedirs(dst_dir, exist_ok=True)
      k = 1 + sum(1 for n in os.listdir(dst_dir) if n.startswith(st.task + '.'))
      while os.path.exists(os.path.join(dst_dir, f'{st.task}.{k}')):
        k += 1
      files.move(src, os.path.join(dst_dir, f'{st.task}.{k}'))
  elif st.kind == 'files':
    for p in st.outputs(config) or []:
      if os.path.isfile(p):
        files.remove(p)


def _why(state, reasons, force):
  if force:
    return ' (--force)'
  if state == 'stale':
    shown = reasons[:4] + ([f'{len(reasons) - 4} more'] if len(reasons) > 4 else [])
    return f' ({"; ".join(shown)})'
  return f' ({reasons[0]})' if state == 'incomplete' else ''


def write_config(config):
  """The resolved config of this run as <workdir>/config.json (process 0)."""
  if distributed.is_main():
    files.atomic_write_text(layout.config_record(config), json.dumps(provenance.plain(config), indent=1))


# ------------------------------------------------------------------------------------------------ running
def run_stages(config, names, force=False, options=None, label=''):
  """Run the stages `names` in order (module doc): a line when each starts (with why) and ends, or one line
  "skipped: outputs complete". options: {stage name: extra keyword arguments of its run}. Returns one record per
  stage: {'stage', 'status' ('ran' / 'skipped'), 'seconds' (now), 'run_seconds' (the run that made the outputs),
  'summary'}."""
  with files.protecting(user_data(config)):
    return _run_stages(config, names, force, options or {}, label)


def _run_stages(config, names, force, options, label):
  write_config(config)
  log, records = read_log(config), []
  for k, name in enumerate(names, 1):
    st, tag, t0 = stages.STAGES[name], f'[{k}/{len(names)}] {label}{name}', time.time()
    why_not = st.skip_reason(config)
    if why_not:
      print(f'{tag}: skipped: {why_not}', flush=True)
      records.append({'stage': label + name, 'status': 'skipped', 'seconds': 0., 'run_seconds': None,
                      'summary': {}, 'reason': why_not})
      continue
    state, reasons, record = check(st, config)
    distributed.barrier(f'{name} checked')   # every process decided before process 0 changes anything
    if state == 'complete' and not force:
      seconds = time.time() - t0
      print(f'{tag}: skipped: outputs complete ({fmt_seconds(seconds)})', flush=True)
      past = log.get(name, {})
      records.append({'stage': label + name, 'status': 'skipped', 'seconds': seconds,
                      'run_seconds': past.get('seconds'), 'summary': past.get('summary', {})})
      continue
    afresh = force or state == 'stale'
    print(f'{tag}: started{_why(state, reasons, force)}', flush=True)
    if distributed.is_main():
      if afresh:
        start_afresh(st, config)
      if record is not None:
        provenance.write_record(config.workdir, name, record, 'running')
    distributed.barrier(f'{name} started')
    try:
      run_here = distributed.is_main() or not st.main_only
      summary = (st.run(config, force=afresh, **options.get(name, {})) if run_here else {}) or {}
    except BaseException:
      print(f'{tag}: failed after {fmt_seconds(time.time() - t0)}', flush=True)
      raise
    seconds = time.time() - t0
    gist = _short(summary, config)
    print(f'{tag}: done in {fmt_seconds(seconds)}' + (f': {gist}' if gist else ''), flush=True)
    summary = json.loads(json.dumps(summary, default=str))
    log[name] = {'seconds': seconds, 'summary': summary, 'finished': time.strftime('%Y-%m-%d %H:%M:%S')}
    if distributed.is_main():
      files.atomic_write_text(layout.stage_log(config), json.dumps(log, indent=1))
      if record is None:   # its inputs were not there before it ran (it made them)
        record = check(st, config)[2]
      if record is not None:
        provenance.write_record(config.workdir, name, record, 'complete',
                                provenance.fingerprint_outputs(st.outputs(config)))
    distributed.barrier(f'{name} recorded')
    records.append({'stage': label + name, 'status': 'ran', 'seconds': seconds, 'run_seconds': seconds,
                    'summary': summary})
  return records


def pipeline(config, names, force=False, options=None):
  """run_stages under the workdir lock, then (pipeline.compare_baseline) the baseline's stages in
  <workdir>/baseline. Returns the records of both."""
  with workdir_lock.hold(config.workdir, distributed.is_main()):
    records = run_stages(config, names, force, options)
    if config.pipeline.compare_baseline and stages.baseline_stages(names):
      records += run_stages(stages.baseline_config(config), stages.baseline_stages(names), force,
                            label='baseline/')
  return records


def status_lines(config, names):
  """One line per stage: complete / incomplete / stale (why) / missing, where a stage reading the outputs of one that
  will run is stale too ('after <stage>')."""
  lines, rerun = [], {}   # rerun: output path -> the stage that will remake it
  for name in names:
    st = stages.STAGES[name]
    if st.skip_reason(config):
      lines.append(f'{name}: skipped ({st.skip_reason(config)})')
      continue
    state, reasons, _ = check(st, config)
    ins = st.inputs(config) or []
    upstream = sorted({rerun[p] for p in ins if p in rerun})
    if state == 'complete' and upstream:
      state, reasons = 'stale', [f'after {", ".join(upstream)}']
    if state != 'complete':
      rerun.update({p: name for p in st.outputs(config) or []})
    lines.append(f'{name}: {state}' + (f' ({"; ".join(reasons)})' if reasons else ''))
  return lines


def main(*names):
  """The absl main of a root entry point: the pipeline of `names` on --config (--force reruns them)."""
  def run(argv):
    del argv
    pipeline(flags.FLAGS.config, list(names), flags.FLAGS.force)
  return run
