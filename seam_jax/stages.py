"""The pipeline's stages, in order: the one registry that `python -m seam_jax`, pipeline.py and the root entry points
share (seam_jax.runner runs them).

  demo -> prepare -> pretrain -> train -> infer -> crf -> eval_cam -> eval_crf -> train_aff -> rw -> eval_rw ->
  train_seg -> test_seg -> eval_seg          (demo, pretrain: demo configs only; eval_custom: with eval.pred_dir)

A stage declares, next to its run function: its output paths, its input paths, the config fields it reads (field
patterns of seam_jax.provenance) and its kind, which says how it starts afresh when its record changed or --force:
  'train'    a training task: its folder (checkpoints, logs, export) is moved to <workdir>/superseded/ first;
  'files'    per-image outputs: its existing output files are removed first (then it resumes file by file);
  'rewrite'  rewrites its outputs whole on every run.
Adding a stage is one `@stage(...)` function below.
"""
import dataclasses
import json
import os
from typing import Callable

from seam_jax import layout
from seam_jax.common import errors
from seam_jax.data import prepare as prepare_lib


def _none(config):
  del config
  return []


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  run: Callable                       # (config, force=False, **options) -> summary dict
  outputs: Callable                   # config -> [paths]; None while unknown (its list is not prepared yet)
  inputs: Callable = _none            # config -> [paths] the outputs are computed from (None while unknown)
  fields: tuple = ()                  # config field patterns the stage reads (seam_jax.provenance.read_fields)
  kind: str = 'rewrite'               # 'train', 'files' or 'rewrite' (module doc)
  task: str = ''                      # kind 'train': the task folder name under the workdir
  evaluations: Callable | None = None  # config -> [(name, pred_dir, pred_type, list)]: evaluation stages
  applies: Callable = lambda config: True  # in the default order ('demo': demo configs only)
  main_only: bool = False             # run by process 0 alone (the others wait): host-only stages writing shared files
  skip_reason: Callable = lambda config: ''  # non-empty: the stage cannot run on this data (a line says why)


STAGES = {}  # name -> Stage, in pipeline order


def stage(name, outputs, inputs=_none, fields=(), kind='rewrite', task='', evaluations=None,
          applies=lambda config: True, main_only=False, skip_reason=lambda config: ''):
  """Register the decorated run function as the stage `name`, after the stages registered before it."""
  def register(fn):
    STAGES[name] = Stage(name, fn, outputs, inputs, tuple(fields), kind, task, evaluations, applies, main_only,
                         skip_reason)
    return fn
  return register


# ------------------------------------------------------------------------------------------------ file sets
def ids_or_none(config, list_name):
  """The ids of a list, None while it is not prepared (the outputs of a stage over it are then unknown)."""
  try:
    return layout.read_ids(config, list_name)
  except errors.DataError:
    return None


def _per_id(path_fn, ids):
  return None if ids is None else [path_fn(i) for i in ids]


def _concat(*lists):
  return None if any(l is None for l in lists) else [p for l in lists for p in l]


def _images(c, list_name):
  ids = ids_or_none(c, list_name)
  return None if ids is None else _per_id(layout.images(c), ids)


def _dataset(c):
  """[<list_dir>/dataset.json] once prepare wrote it (the class set a stage reads), else []."""
  path = layout.dataset_file(c)
  return [path] if os.path.isfile(path) else []


def _weights(path):
  """[the weights source] (an export folder or a file), [] for a random start."""
  return [path] if path else []


# Field patterns (seam_jax.provenance): what each stage's outputs are a function of.
CRF_FIELDS = ('infer.crf_alphas', 'infer.crf_iters', 'infer.crf_dir')
EVAL_FIELDS = ('eval', '!eval.pred_dir', '!eval.pred_type', 'infer.bg_threshold')
SEG_TEST_FIELDS = ('seg.test_list', 'seg.checkpoint', 'seg.scales', 'seg.flip', 'seg.crf', 'seg.crf_iters',
                   'seg.out_dir', 'seg.predict_dir', 'seg.bucket', 'seg.test_batch_size')


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
def _demo_applies(c):
  """Demo configs reading the VOC layout, whose set goes to the derived <workdir>/VOC2012 or to a folder the demo may
  write (not a user's)."""
  return ('demo' in c and layout.data_format(c) == 'voc' and
          (not c.data.voc_root or prepare_lib.demo_may_write(c.data.voc_root)))


@stage('demo', outputs=lambda c: [layout.voc_split(c, s) for s in ('train', 'val')], fields=('demo',),
       applies=_demo_applies, main_only=True)
def run_demo(config, force=False, workers=0):
  """Generate the demo set (demo configs) at layout.voc_root: only into an empty folder or its own earlier one."""
  return prepare_lib.make_demo(config, force=force, workers=workers or os.cpu_count()) or {}


def _prepare_outputs(c):
  extra = {'voc': [], 'coco': [layout.coco_gt_dir(c)], 'csv': []}[layout.data_format(c)]
  index = [] if layout.data_format(c) == 'voc' else [os.path.join(layout.list_dir(c), 'image_paths.tsv')]
  return ([layout.list_path(c, n) for n in prepare_lib.LIST_NAMES] + [layout.cls_labels(c), layout.dataset_file(c)]
          + index + extra)


def _prepare_inputs(c):
  d = c.data
  described = [d.dataset_file] if d.dataset_file else []
  if layout.data_format(c) == 'voc':
    return [layout.voc_root(c)] + ([d.sbd_root] if d.sbd_root else []) + described
  return [p for p in (d.train_annotations, d.image_dir, d.val_annotations, d.val_image_dir) if p] + described


@stage('prepare', outputs=_prepare_outputs, inputs=_prepare_inputs,
       fields=('data.format', 'data.classes', 'data.dataset_file', 'data.train_annotations', 'data.val_annotations',
               'data.image_dir', 'data.val_image_dir', 'data.voc_root', 'data.sbd_root', 'data.label_source',
               'data.list_dir', 'data.cls_labels', 'data.on_error'), main_only=True)
def run_prepare(config, force=False, workers=0):
  del force  # always rewrites its outputs
  return prepare_lib.prepare(config, workers=workers or os.cpu_count())


def _train_stage(name, task_name, train_fn, inputs, fields, applies=lambda config: True):
  """Register a training stage: train_fn(config) trains (resuming from its checkpoints) and exports."""
  def run(config, force=False):
    del force  # a forced run starts in a fresh task folder (seam_jax.runner); otherwise it resumes
    train_fn(config)
    return _train_summary(config, task_name)
  return stage(name, outputs=lambda c: [layout.export_dir(c, task_name)], inputs=inputs, fields=fields,
               kind='train', task=task_name, applies=applies)(run)


def _trains(module, task_fn):
  """train_fn of the task built by seam_jax.train.<module>.<task_fn>(config) (imported when it runs)."""
  def train_fn(config):
    import importlib  # pylint: disable=g-import-not-at-top
    from seam_jax.train import trainer  # pylint: disable=g-import-not-at-top
    trainer.train(config, getattr(importlib.import_module(f'seam_jax.train.{module}'), task_fn)(config))
  return train_fn


def _pretrain(config):
  from seam_jax.train import pretrain_task  # pylint: disable=g-import-not-at-top
  pretrain_task.run(config)


# The demo's backbone pretraining on its synthetic classification set (seam_jax.train.pretrain_task).
_train_stage('pretrain', 'pretrain', _pretrain, inputs=_none,
             fields=('seed', 'model.width_div', 'model.dtype', 'model.fast_compile', 'pretrain'),
             applies=lambda c: 'pretrain' in c and c.pretrain.enabled)

_train_stage('train', 'seam', _trains('seam_task', 'seam_task'),
             inputs=lambda c: _concat([layout.list_path(c, c.data.train_list), layout.cls_labels(c)], _dataset(c),
                                      _weights(layout.init_weights(c)), _images(c, c.data.train_list)),
             fields=('seed', 'model', 'data', '!data.aff_canvas', 'train'))


def _per_image_outputs(name, list_of):
  """outputs(config) of per-image stage `name` over the list `list_of(config)` (layout.per_image_outputs)."""
  def outputs(c):
    ids = ids_or_none(c, list_of(c))
    return None if ids is None else [p for i in ids for p in layout.per_image_outputs(c, name, i)]
  return outputs


@stage('infer', outputs=_per_image_outputs('infer', lambda c: c.infer.list), kind='files',
       inputs=lambda c: _concat([layout.seam_weights(c), layout.cls_labels(c), layout.list_path(c, c.infer.list)],
                                _dataset(c), _images(c, c.infer.list)),
       fields=('model', 'infer', '!infer.crf_alphas', '!infer.crf_iters', '!infer.crf_dir', 'train.method'))
def run_infer(config, force=False):
  """CAM dicts of infer.list."""
  from seam_jax.infer import cam_inference  # pylint: disable=g-import-not-at-top
  return cam_inference.run_inference(config, force=force)


@stage('crf', outputs=_per_image_outputs('crf', lambda c: c.infer.list), kind='files', fields=CRF_FIELDS + ('infer.list',),
       inputs=lambda c: _concat(_per_id(lambda i: layout.cam_path(c, i), ids_or_none(c, c.infer.list)),
                                _images(c, c.infer.list)))
def run_crf(config, force=False):
  """The la / ha CRF score dicts of infer.list (every infer.crf_alphas)."""
  from seam_jax.infer import crf  # pylint: disable=g-import-not-at-top
  return crf.run_crf(config, force=force)


def results_path(config, name):
  return os.path.join(layout.eval_dir(config, name), 'results.json')


def brief(res, config):
  """The figures of a results.json the pipeline reports: mIoU over all K + 1 and over present classes (at the best
  threshold for CAMs, plus at the fixed infer.bg_threshold when it lies on the curve)."""
  out = {k: res[k] for k in ('miou', 'miou_present', 'best_threshold') if k in res}
  ts = res.get('thresholds', [])
  at = [k for k, t in enumerate(ts) if abs(t - float(config.infer.bg_threshold)) < 1e-9]
  if at:
    out.update(fixed_threshold=ts[at[0]], miou_fixed=res['miou_curve'][at[0]],
               miou_present_fixed=res['miou_present_curve'][at[0]])
  return out


_PRED_EXT = {'png': '.png', 'npy': '.npy', 'crf': '.npy'}


def no_ground_truth(config):
  """Why the evaluation stages cannot run: the data set has no masks (data.format csv, no eval.gt_dir); '' else."""
  if layout.gt_dir(config):
    return ''
  return (f'no ground truth: data.format {config.data.format!r} has no masks (set eval.gt_dir to score against '
          'masks of your own)')


def eval_stage(name, evaluations, fields=EVAL_FIELDS, applies=lambda config: True):
  """Register an evaluation stage: `evaluations(config)` -> [(name, pred_dir, pred_type, list)], each scored into
  <eval_dir>/<name>/results.json by seam_jax.infer.evaluation; skipped (no_ground_truth) on data without masks."""
  def run(config, force=False):
    del force  # always rewrites its outputs
    from seam_jax.infer import evaluation  # pylint: disable=g-import-not-at-top
    return {ev_name: brief(evaluation.evaluate(config, pred_dir, pred_type, list_name,
                                               layout.eval_dir(config, ev_name)), config)
            for ev_name, pred_dir, pred_type, list_name in evaluations(config)}

  def inputs(config):
    preds = [_per_id(lambda i, d=d, t=t: os.path.join(d, i + _PRED_EXT[t]), ids_or_none(config, l))
             for _, d, t, l in evaluations(config)]
    return _concat([layout.gt_dir(config)] if layout.gt_dir(config) else [], _dataset(config), *preds)

  return stage(name, outputs=lambda c: [results_path(c, n) for n, *_ in evaluations(c)], inputs=inputs,
               fields=fields, evaluations=evaluations, applies=applies, skip_reason=no_ground_truth)(run)


eval_stage('eval_cam', lambda c: [('cam', layout.cam_dir(c), 'npy', c.eval.list)])
eval_stage('eval_crf', lambda c: [(f'crf_{float(a)}', layout.crf_dir(c, a), 'crf', c.eval.list)
                                  for a in c.infer.crf_alphas], fields=EVAL_FIELDS + ('infer.crf_alphas',))

_train_stage('train_aff', 'affinity', _trains('affinity_task', 'affinity_task'),
             inputs=lambda c: _concat(_weights(c.aff.init_weights or layout.init_weights(c)),
                                      *[_per_id(lambda i, d=d: os.path.join(d, i + '.npy'),
                                                ids_or_none(c, c.aff.train_list)) for d in layout.score_dirs(c)],
                                      _images(c, c.aff.train_list)),
             fields=('seed', 'model', 'data', 'aff', 'infer.crf_alphas'))


@stage('rw', outputs=_per_image_outputs('rw', lambda c: c.rw.list), kind='files', fields=('model', 'rw'),
       inputs=lambda c: _concat([layout.affinity_weights(c)],
                                _per_id(lambda i: layout.rw_cam_path(c, i), ids_or_none(c, c.rw.list)),
                                _images(c, c.rw.list)))
def run_rw(config, force=False):
  """Random-walk label PNGs of rw.list."""
  from seam_jax.infer import random_walk  # pylint: disable=g-import-not-at-top
  return random_walk.run(config, force=force)


eval_stage('eval_rw', lambda c: [('rw', layout.rw_dir(c), 'png', c.eval.list)])   # rw.list may be train_aug

# Segmentation retrain on the random-walk labels (RETRAIN_SPEC), its multi-scale test and evaluation.
_train_stage('train_seg', 'seg', _trains('seg_task', 'seg_task'),
             inputs=lambda c: _concat(_weights(layout.seg_init_weights(c)),
                                      _per_id(lambda i: os.path.join(layout.seg_label_dir(c), i + '.png'),
                                              ids_or_none(c, c.seg.train_list)), _images(c, c.seg.train_list)),
             fields=('seed', 'model', 'data', 'seg') + tuple('!' + f for f in SEG_TEST_FIELDS))


@stage('test_seg', outputs=_per_image_outputs('test_seg', lambda c: c.seg.test_list), kind='files', fields=('model',) + SEG_TEST_FIELDS,
       inputs=lambda c: _concat([layout.seg_weights(c)], _dataset(c), _images(c, c.seg.test_list)))
def run_test_seg(config, force=False):
  """Multi-scale + flip (+ CRF) label PNGs of seg.test_list with the segmentation net."""
  from seam_jax.infer import seg_inference  # pylint: disable=g-import-not-at-top
  return seg_inference.run_test(config, force=force)


eval_stage('eval_seg', lambda c: [('seg', layout.seg_pred_dir(c), 'png', c.seg.test_list)],
           fields=('eval', '!eval.list', '!eval.pred_dir', '!eval.pred_type', 'seg.test_list'))
# Any other predictions (eval.pred_dir of eval.pred_type, evaluate.py): scored into <eval_dir>/custom.
eval_stage('eval_custom', lambda c: [('custom', c.eval.pred_dir, c.eval.pred_type, c.eval.list)],
           fields=('eval', 'infer.bg_threshold'), applies=lambda c: bool(c.eval.pred_dir))


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
