"""The pipeline's stages, in order: the one registry that `python -m seam_jax`, pipeline.py and the root entry points
share.

  demo -> prepare -> pretrain -> train -> infer -> crf -> eval_cam -> eval_crf -> train_aff -> rw -> eval_rw ->
  train_seg -> test_seg -> eval_seg          (demo, pretrain: demo configs only)

A stage is `run(config, force=False, **options) -> summary dict` plus the files it writes and reads (seam_jax.layout
paths). Its outputs are *complete* when every output exists and none is older than the newest input: the pipeline
then skips it ("skipped: outputs complete"). Outputs older than an input are *stale*: the stage runs with force=True
(per-file stages recompute every file). Otherwise a stage resumes: per file, or training from its last checkpoint.
`force` (--force) runs every selected stage with force=True. Adding a stage is one `@stage(...)` function below.

Every stage run is logged (wall time, summary) in <workdir>/stages.json; the pipeline's report reads it.
"""
import dataclasses
import json
import os
import time
from typing import Callable

from absl import flags

from seam_jax import layout
from seam_jax.common import distributed, errors, files
from seam_jax.data import prepare as prepare_lib


def _none(config):
  del config
  return []


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  run: Callable                       # (config, force=False, **options) -> summary dict
  outputs: Callable                   # config -> [paths]; None while unknown (its list is not prepared yet)
  inputs: Callable = _none            # config -> [paths] the outputs are computed from
  evaluations: Callable | None = None  # config -> [(name, pred_dir, pred_type, list)]: evaluation stages
  applies: Callable = lambda config: True  # in the default order ('demo': demo configs only)


STAGES = {}  # name -> Stage, in pipeline order


def stage(name, outputs, inputs=_none, evaluations=None, applies=lambda config: True):
  """Register the decorated run function as the stage `name`, after the stages registered before it."""
  def register(fn):
    STAGES[name] = Stage(name, fn, outputs, inputs, evaluations, applies)
    return fn
  return register


# ------------------------------------------------------------------------------------------------ file sets
def _ids(config, list_name):
  try:
    return layout.read_ids(config, list_name)
  except errors.DataError:  # not prepared yet: outputs unknown, the stage is not complete
    return None


def _per_id(folder, ids, ext):
  return None if ids is None else [os.path.join(folder, i + ext) for i in ids]


def _weights_file(path):
  """The file that dates a weights source: an export folder's metadata (written last), or the file itself."""
  from seam_jax.models import export  # pylint: disable=g-import-not-at-top  (orbax: only when asked)
  return os.path.join(path, export.META) if os.path.isdir(path) or not os.path.splitext(path)[1] else path


def _concat(*lists):
  return None if any(l is None for l in lists) else [p for l in lists for p in l]


def status(st, config):
  """'complete' (every output present, none older than the newest input), 'stale' (present but older) or
  'incomplete'. Costs one stat per file."""
  outs = st.outputs(config)
  if outs is None or not all(os.path.exists(p) for p in outs):
    return 'incomplete'
  ins = st.inputs(config)
  if ins is None or not all(os.path.exists(p) for p in ins):
    return 'incomplete'
  newest_in = max((os.path.getmtime(p) for p in ins), default=0.)
  return 'complete' if all(os.path.getmtime(p) >= newest_in for p in outs) else 'stale'


def _forced(config, section, force):
  """config with `<section>.force = True` when force (per-file stages then recompute every file)."""
  if not force:
    return config
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c[section].force = True
  return c


def _train_summary(config, task_name):
  """Step and losses of the last logged training step (metrics.jsonl)."""
  path = os.path.join(layout.task_dir(config, task_name), 'metrics.jsonl')
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    lines = [l for l in f if l.strip()]
  last = json.loads(lines[-1]) if lines else {}
  return {k: last[k] for k in ('step', 'loss', 'cls', 'er', 'ecr', 'bg', 'fg', 'neg') if k in last}


# ------------------------------------------------------------------------------------------------ the stages
@stage('demo', outputs=lambda c: [layout.voc_split(c, s) for s in ('train', 'val')], applies=lambda c: 'demo' in c)
def run_demo(config, force=False, workers=0):
  """Generate the demo set (demo configs) at layout.voc_root."""
  return prepare_lib.make_demo(config, force=force, workers=workers or os.cpu_count()) or {}


@stage('prepare', outputs=lambda c: ([layout.list_path(c, n) for n in prepare_lib.LIST_NAMES] +
                                     [layout.cls_labels(c)]),
       inputs=lambda c: [layout.voc_split(c, s) for s in ('train', 'val')])
def run_prepare(config, force=False, workers=0):
  del force  # always rewrites its outputs
  return prepare_lib.prepare(config, workers=workers or os.cpu_count())


@stage('pretrain', outputs=lambda c: [_weights_file(layout.export_dir(c, 'pretrain'))],
       applies=lambda c: 'pretrain' in c and c.pretrain.enabled)
def run_pretrain(config, force=False):
  """The demo's backbone pretraining on its synthetic classification set (seam_jax.train.pretrain_task)."""
  del force  # training resumes from its checkpoints
  from seam_jax.train import pretrain_task  # pylint: disable=g-import-not-at-top
  pretrain_task.run(config)
  return _train_summary(config, pretrain_task.TASK)


def _train_stage(name, task_name, make_task, inputs):
  def run(config, force=False):
    del force  # training resumes from its checkpoints; its export is rewritten at the end
    from seam_jax.train import trainer  # pylint: disable=g-import-not-at-top
    trainer.train(config, make_task(config))
    return _train_summary(config, task_name)
  return stage(name, outputs=lambda c: [_weights_file(layout.export_dir(c, task_name))], inputs=inputs)(run)


def _seam_task(config):
  from seam_jax.train import seam_task  # pylint: disable=g-import-not-at-top
  return seam_task.seam_task(config)


def _init_weights(path):
  """[the file dating the initial weights] ([] for a random start)."""
  return [_weights_file(path)] if path else []


_train_stage('train', 'seam', _seam_task,
             inputs=lambda c: ([layout.list_path(c, c.data.train_list), layout.cls_labels(c)] +
                               _init_weights(layout.init_weights(c))))


@stage('infer', outputs=lambda c: _per_id(layout.cam_dir(c), _ids(c, c.infer.list), '.npy'),
       inputs=lambda c: [_weights_file(layout.seam_weights(c)), layout.cls_labels(c)])
def run_infer(config, force=False):
  """CAM dicts of infer.list."""
  from seam_jax.infer import cam_inference  # pylint: disable=g-import-not-at-top
  return cam_inference.run_inference(_forced(config, 'infer', force))


def _crf_outputs(c):
  ids = _ids(c, c.infer.list)
  return _concat(*[_per_id(layout.crf_dir(c, a), ids, '.npy') for a in c.infer.crf_alphas])


@stage('crf', outputs=_crf_outputs, inputs=lambda c: _per_id(layout.cam_dir(c), _ids(c, c.infer.list), '.npy'))
def run_crf(config, force=False):
  """The la / ha CRF score dicts of infer.list (every infer.crf_alphas)."""
  from seam_jax.infer import crf  # pylint: disable=g-import-not-at-top
  return {'files_written': crf.run_crf(_forced(config, 'infer', force))}


def results_path(config, name):
  return os.path.join(layout.eval_dir(config, name), 'results.json')


def brief(res, config):
  """The figures of a results.json the pipeline reports: mIoU over 21 and over present classes (at the best
  threshold for CAMs, plus at the fixed infer.bg_threshold when it lies on the curve)."""
  out = {k: res[k] for k in ('miou', 'miou_present', 'best_threshold') if k in res}
  ts = res.get('thresholds', [])
  at = [k for k, t in enumerate(ts) if abs(t - float(config.infer.bg_threshold)) < 1e-9]
  if at:
    out.update(fixed_threshold=ts[at[0]], miou_fixed=res['miou_curve'][at[0]],
               miou_present_fixed=res['miou_present_curve'][at[0]])
  return out


def eval_stage(name, evaluations):
  """Register an evaluation stage: `evaluations(config)` -> [(name, pred_dir, pred_type, list)], each scored into
  <eval_dir>/<name>/results.json by seam_jax.infer.evaluation."""
  def run(config, force=False):
    del force  # always rewrites its outputs
    from seam_jax.infer import evaluation  # pylint: disable=g-import-not-at-top
    out = {}
    for ev_name, pred_dir, pred_type, list_name in evaluations(config):
      c = config.copy_and_resolve_references()
      with c.unlocked():
        c.eval.pred_dir, c.eval.pred_type, c.eval.list = pred_dir, pred_type, list_name
        c.eval.out_dir = layout.eval_dir(config, ev_name)
      out[ev_name] = brief(evaluation.evaluate(c), config)
    return out

  def inputs(config):
    ext = {'png': '.png'}
    return _concat(*[_per_id(d, _ids(config, l), ext.get(t, '.npy')) for _, d, t, l in evaluations(config)])

  return stage(name, outputs=lambda c: [results_path(c, n) for n, *_ in evaluations(c)], inputs=inputs,
               evaluations=evaluations)(run)


eval_stage('eval_cam', lambda c: [('cam', layout.cam_dir(c), 'npy', c.eval.list)])
eval_stage('eval_crf', lambda c: [(f'crf_{float(a)}', layout.crf_dir(c, a), 'crf', c.eval.list)
                                  for a in c.infer.crf_alphas])


def _affinity_task(config):
  from seam_jax.train import affinity_task  # pylint: disable=g-import-not-at-top
  return affinity_task.affinity_task(config)


_train_stage('train_aff', 'affinity', _affinity_task,
             inputs=lambda c: _concat(_init_weights(c.aff.init_weights or layout.init_weights(c)),
                                      *[_per_id(d, _ids(c, c.aff.train_list), '.npy') for d in layout.score_dirs(c)]))


@stage('rw', outputs=lambda c: _per_id(layout.rw_dir(c), _ids(c, c.rw.list), '.png'),
       inputs=lambda c: _concat([_weights_file(layout.affinity_weights(c))],
                                _per_id(layout.rw_cam_dir(c), _ids(c, c.rw.list), '.npy')))
def run_rw(config, force=False):
  """Random-walk label PNGs of rw.list."""
  from seam_jax.infer import random_walk  # pylint: disable=g-import-not-at-top
  return random_walk.run(_forced(config, 'rw', force)) or {}


eval_stage('eval_rw', lambda c: [('rw', layout.rw_dir(c), 'png', c.eval.list)])   # rw.list may be train_aug


# Segmentation retrain on the random-walk labels (RETRAIN_SPEC), its multi-scale test and evaluation.
def _seg_task(config):
  from seam_jax.train import seg_task  # pylint: disable=g-import-not-at-top
  return seg_task.seg_task(config)


_train_stage('train_seg', 'seg', _seg_task,
             inputs=lambda c: _per_id(layout.seg_label_dir(c), _ids(c, c.seg.train_list), '.png'))


@stage('test_seg', outputs=lambda c: _per_id(layout.seg_pred_dir(c), _ids(c, c.seg.test_list), '.png'),
       inputs=lambda c: [_weights_file(layout.seg_weights(c))])
def run_test_seg(config, force=False):
  """Multi-scale + flip (+ CRF) label PNGs of seg.test_list with the segmentation net."""
  from seam_jax.infer import seg_inference  # pylint: disable=g-import-not-at-top
  return seg_inference.run_test(_forced(config, 'seg', force))


eval_stage('eval_seg', lambda c: [('seg', layout.seg_pred_dir(c), 'png', c.seg.test_list)])


# ------------------------------------------------------------------------------------------------ selection
def select(spec, config=None):
  """Stage names of `spec`: '' or 'all' (every stage that applies to `config`), a name, a comma list, a range
  'a..b' (inclusive, in pipeline order; '..b' from the first stage, 'a..' to the last; stages that do not apply to
  `config` are left out of ranges), or a mix: 'demo,infer..rw'. An unknown name is a DataError listing the stages."""
  names = list(STAGES)
  applies = lambda n: config is None or STAGES[n].applies(config)

  def index(name):
    if name not in STAGES:
      raise errors.DataError(f'unknown stage {name!r} in {spec!r}; the stages are: {", ".join(names)}')
    return names.index(name)

  if spec.strip() in ('', 'all'):
    return [n for n in names if applies(n)]
  out = []
  for part in (p.strip() for p in spec.split(',')):
    if '..' in part:
      a, b = (s.strip() for s in part.split('..', 1))
      i, j = index(a) if a else 0, index(b) if b else len(names) - 1
      if i > j:
        raise errors.DataError(f'stage range {part!r} runs backwards; the order is: {" -> ".join(names)}')
      out += [n for n in names[i:j + 1] if applies(n)]
    elif part:
      out.append(names[index(part)])
  return list(dict.fromkeys(out))


# ------------------------------------------------------------------------------------------------ running
def fmt_seconds(s):
  if s is None:
    return '-'
  if s < 60:
    return f'{s:.1f} s'
  m, s = divmod(int(round(s)), 60)
  return f'{m}m{s:02d}s' if m < 60 else f'{m // 60}h{m % 60:02d}m'


def _short(summary):
  """One-line gist of a stage summary: mIoUs of evaluations, else a few scalar fields."""
  if summary and all(isinstance(v, dict) and 'miou' in v for v in summary.values()):
    return '; '.join(f'{k} mIoU {100 * v["miou"]:.1f} (21 classes) / {100 * v["miou_present"]:.1f} (present)'
                     for k, v in summary.items())
  scalars = [(k, v) for k, v in (summary or {}).items() if isinstance(v, (int, float))]
  return ', '.join(f'{k} {v:.4g}' if isinstance(v, float) else f'{k} {v}' for k, v in scalars[:5])


def read_log(config):
  path = layout.stage_log(config)
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    return json.load(f)


def run_stages(config, names, force=False, check=True, options=None, label=''):
  """Run the stages `names` in order; each prints a line when it starts and one when it ends, or one line
  "skipped: outputs complete" (`check` and not `force`; `check=False`: always run, as the root entry points do).
  options: {stage name: extra keyword arguments of its run}. Returns one record per stage:
  {'stage', 'status' ('ran' / 'skipped'), 'seconds' (now), 'run_seconds' (the run that made the outputs),
  'summary'}."""
  log, records = read_log(config), []
  for k, name in enumerate(names, 1):
    st, tag, t0 = STAGES[name], f'[{k}/{len(names)}] {label}{name}', time.time()
    state = status(st, config) if check else 'incomplete'
    if state == 'complete' and not force:
      seconds = time.time() - t0
      print(f'{tag}: skipped: outputs complete ({fmt_seconds(seconds)})', flush=True)
      past = log.get(name, {})
      records.append({'stage': label + name, 'status': 'skipped', 'seconds': seconds,
                      'run_seconds': past.get('seconds'), 'summary': past.get('summary', {})})
      continue
    note = ' (outputs older than their inputs: recomputing)' if state == 'stale' and not force else ''
    print(f'{tag}: started{note}', flush=True)
    try:
      summary = st.run(config, force=force or state == 'stale', **(options or {}).get(name, {})) or {}
    except BaseException:
      print(f'{tag}: failed after {fmt_seconds(time.time() - t0)}', flush=True)
      raise
    seconds = time.time() - t0
    gist = _short(summary)
    print(f'{tag}: done in {fmt_seconds(seconds)}' + (f': {gist}' if gist else ''), flush=True)
    summary = json.loads(json.dumps(summary, default=str))
    log[name] = {'seconds': seconds, 'summary': summary, 'finished': time.strftime('%Y-%m-%d %H:%M:%S')}
    if distributed.is_main():
      files.atomic_write_text(layout.stage_log(config), json.dumps(log, indent=1))
    records.append({'stage': label + name, 'status': 'ran', 'seconds': seconds, 'run_seconds': seconds,
                    'summary': summary})
  return records


def baseline_config(config):
  """The plain-CAM baseline run: the same data and budget, train.method 'cam' (CAMs from the CAM branch), every
  output in <workdir>/baseline."""
  c = layout.variant(config, 'baseline')
  with c.unlocked():
    c.train.method = 'cam'
  return c


def baseline_stages(names):
  """The stages the baseline repeats: those of `names` from train to eval_rw."""
  return [n for n in names if n in select('train..eval_rw')]


def main(*names):
  """The absl main of a root entry point: run `names` on --config, always (each stage resumes by itself)."""
  def run(argv):
    del argv
    run_stages(flags.FLAGS.config, list(names), check=False)
  return run
