"""Where every stage reads and writes: the one owner of the run's paths.

Every output folder derives from `config.workdir`; a path field set explicitly in the config ('' = derived)
overrides the derived one. The run folder:

  <workdir>/VOC2012/              the generated demo set (demo configs; real runs set data.voc_root)
  <workdir>/lists/                train_aug.txt, train.txt, val.txt, cls_labels.npy, dataset.json
                                  (+ image_paths.tsv: COCO and CSV formats)                  (prepare)
  <workdir>/gt/<id>.png           ground-truth masks rasterised from COCO-format JSON        (prepare, coco)
  <workdir>/pretrain/             ckpt/, export/, metrics.jsonl, tb/               (pretrain: demo backbone)
  <workdir>/seam/                 ckpt/, export/, metrics.jsonl, tb/                         (train)
  <workdir>/cam/<id>.npy          CAM dicts                                                  (infer)
  <workdir>/crf_<alpha>/<id>.npy  CRF score dicts for every infer.crf_alphas                 (crf)
  <workdir>/affinity/             ckpt/, export/, ...                                        (train_aff)
  <workdir>/rw/<id>.png           random-walk pseudo labels                                  (rw)
  <workdir>/eval/<name>/          results.json, miou_curve.png                               (eval_*)
  <workdir>/seg/                  ckpt/, export/, metrics.jsonl, tb/                         (train_seg)
  <workdir>/seg_pred/<id>.png     segmentation label maps of seg.test_list                   (test_seg)
  <workdir>/predict/              label PNGs + overlays of predict.py on any images          (predict)
  <workdir>/stages.json           wall time and summary of each stage's last run             (every stage)
  <workdir>/records/<stage>.json  what made each stage's outputs (fields, inputs, version)   (seam_jax.runner)
  <workdir>/config.json           the resolved config of the last run                        (seam_jax.runner)
  <workdir>/superseded/<task>.<k> training folders set aside when their stage started afresh (seam_jax.runner)
  <workdir>/.lock                 one run per workdir: names the running process             (seam_jax.runner)
  <workdir>/report/               summary.json, report.html, curve and image-strip PNGs      (pipeline)
  <workdir>/baseline/             the same stages again with the plain-CAM baseline          (compare_baseline)
"""
import dataclasses
import functools
import os

from seam_jax.common.errors import DataError
from seam_jax.data import dataset_info, voc

FORMATS = ('voc', 'coco', 'csv')   # data.format: the input layouts prepare reads (README, "Bring your own data")


def _or(value, *default):
  return value if value else os.path.join(*default)


def voc_root(config):
  """data.voc_root, '' = <workdir>/VOC2012 (where the demo stage generates its set)."""
  return _or(config.data.voc_root, config.workdir, 'VOC2012')


def list_dir(config):
  return _or(config.data.list_dir, config.workdir, 'lists')


def cls_labels(config):
  return _or(config.data.cls_labels, list_dir(config), 'cls_labels.npy')


def list_path(config, name_or_path):
  """A list by name (`train_aug` -> <list_dir>/train_aug.txt) or by path."""
  return voc.resolve_list(name_or_path, list_dir(config))


def read_ids(config, name_or_path):
  return voc.read_list(list_path(config, name_or_path))


def data_format(config):
  """data.format, checked: 'voc' (the VOC layout), 'coco' (COCO-format JSON) or 'csv' (images + a label CSV)."""
  fmt = config.data.format
  if fmt not in FORMATS:
    raise DataError(f'config.data.format must be one of {FORMATS}, got {fmt!r}')
  return fmt


def dataset_file(config):
  """<list_dir>/dataset.json: the class set prepare wrote (seam_jax.data.dataset_info)."""
  return os.path.join(list_dir(config), dataset_info.FILE_NAME)


@functools.lru_cache(maxsize=8)
def _read_dataset(path, stamp):
  del stamp   # the cache key: a rewritten file is read again
  return dataset_info.DatasetInfo.from_json(path)


def _stamp(path):
  st = os.stat(path)
  return st.st_mtime_ns, st.st_size


def dataset(config):
  """The run's class set (DatasetInfo): <list_dir>/dataset.json when prepare wrote it; before that (and for a VOC
  layout whose lists come from elsewhere) configured_dataset. The COCO and CSV formats have no class set before
  prepare: an error saying so."""
  path = dataset_file(config)
  if os.path.isfile(path):
    return _read_dataset(path, _stamp(path))
  if data_format(config) != 'voc':
    raise DataError(f'{path} not found: run prepare first (it reads the class set of the {config.data.format} data)')
  return configured_dataset(config)


def configured_dataset(config):
  """The class set the config gives (what prepare writes for the VOC and CSV formats): data.dataset_file (a
  dataset.json of your own: names, ignore label, palette), else data.classes; with neither, VOC's 20 classes for
  the VOC layout and None for CSV (its reader takes the sorted names of the CSVs). Both at once is an error."""
  d = config.data
  if d.dataset_file:
    if d.classes:
      raise DataError('config.data.classes and config.data.dataset_file are both set: give the classes once')
    return dataset_info.DatasetInfo.from_json(d.dataset_file)
  if d.classes:
    return dataset_info.DatasetInfo.parse('config.data.classes', f'{d.format}_layout', list(d.classes))
  return dataset_info.DatasetInfo.VOC if data_format(config) == 'voc' else None


def num_classes(config):
  """K, the foreground classes of the run: the width of every image label."""
  return dataset(config).num_classes


def num_outputs(config):
  """K + 1: the class heads' outputs (background first)."""
  return dataset(config).num_classes + 1


@dataclasses.dataclass(frozen=True)
class Images:
  """Where each image id's file is (picklable, for loader workers): VOC's <voc_root>/JPEGImages/<id>.jpg, or for
  the COCO and CSV formats the map prepare wrote to <list_dir>/image_paths.tsv."""
  voc_root: str
  paths: dict | None = None

  def __call__(self, image_id):
    if self.paths is None:
      return os.path.join(self.voc_root, 'JPEGImages', image_id + '.jpg')
    try:
      return self.paths[image_id]
    except KeyError:
      raise DataError(f'image id {image_id!r} is not in the image index of prepare ({dataset_info.IMAGE_PATHS})'
                      ) from None


@functools.lru_cache(maxsize=8)
def _read_image_paths(folder, stamp):
  del stamp
  return dataset_info.read_image_paths(folder)


def images(config):
  """The run's Images (id -> image file)."""
  if data_format(config) == 'voc':
    return Images(voc_root(config))
  index = os.path.join(list_dir(config), dataset_info.IMAGE_PATHS)
  if not os.path.isfile(index):
    raise DataError(f'{index} not found: run prepare first (it indexes the images of the {config.data.format} data)')
  return Images(voc_root(config), _read_image_paths(list_dir(config), _stamp(index)))


def image_path(config, image_id):
  return images(config)(image_id)


def gt_dir(config):
  """The ground-truth masks: eval.gt_dir; '' = <voc_root>/SegmentationClass (VOC), <workdir>/gt (COCO: prepare
  rasterises them), '' for the CSV format, which has none (the evaluation stages are skipped)."""
  if config.eval.gt_dir:
    return config.eval.gt_dir
  fmt = data_format(config)
  if fmt == 'csv':
    return ''
  return coco_gt_dir(config) if fmt == 'coco' else os.path.join(voc_root(config), 'SegmentationClass')


def coco_gt_dir(config):
  """<workdir>/gt: where prepare rasterises the masks of a COCO-format set (a folder of the run)."""
  return os.path.join(config.workdir, 'gt')


def task_dir(config, task_name):
  """Checkpoints and logs of a training task ('seam', 'affinity')."""
  return os.path.join(config.workdir, task_name)


def export_dir(config, task_name):
  return os.path.join(task_dir(config, task_name), 'export')


def init_weights(config):
  """Initial backbone weights of the trained networks: model.init_weights (the ImageNet ResNet38); '' with an
  enabled `pretrain` section (the demo) = this run's pretraining export (seam_jax.train.pretrain_task); else ''
  (random)."""
  if config.model.init_weights:
    return config.model.init_weights
  return export_dir(config, 'pretrain') if 'pretrain' in config and config.pretrain.enabled else ''


def seam_weights(config):
  """infer.checkpoint, '' = the SEAM export of this run."""
  return config.infer.checkpoint or export_dir(config, 'seam')


def cam_dir(config):
  return _or(config.infer.cam_dir, config.workdir, 'cam')


def crf_dir(config, alpha):
  """`<infer.crf_dir>_<alpha>` (python str(float): 4 -> `crf_4.0`), infer.crf_dir '' = <workdir>/crf."""
  return f'{_or(config.infer.crf_dir, config.workdir, "crf")}_{float(alpha)}'


def score_dirs(config):
  """(la_dir, ha_dir) AffinityNet learns from: aff.la_dir / ha_dir, '' = the CRF folders of infer.crf_alphas."""
  la_alpha, ha_alpha = config.infer.crf_alphas
  return config.aff.la_dir or crf_dir(config, la_alpha), config.aff.ha_dir or crf_dir(config, ha_alpha)


def affinity_weights(config):
  """rw.checkpoint, '' = the AffinityNet export of this run."""
  return config.rw.checkpoint or export_dir(config, 'affinity')


def rw_cam_dir(config):
  return config.rw.cam_dir or cam_dir(config)


def rw_dir(config):
  return _or(config.rw.out_dir, config.workdir, 'rw')


def eval_dir(config, name=''):
  """eval.out_dir ('' = <workdir>/eval), with a subfolder per evaluated prediction when `name` is given."""
  base = _or(config.eval.out_dir, config.workdir, 'eval')
  return os.path.join(base, name) if name else base


def eval_pred_dir(config):
  """eval.pred_dir, '' = the CAMs."""
  return config.eval.pred_dir or cam_dir(config)


# --- segmentation retrain (RETRAIN_SPEC): <workdir>/seg/ (ckpt/, export/, logs), <workdir>/seg_pred/<id>.png,
# <workdir>/predict/ (predict.py on arbitrary images).
def seg_label_dir(config):
  """seg.label_dir, '' = the random-walk pseudo labels (rw_dir)."""
  return config.seg.label_dir or rw_dir(config)


def seg_init_weights(config):
  """Initial weights of the segmentation net: seg.init_weights; else, with seg.init_from_seam, the backbone of
  this run's SEAM export; else init_weights(config) (the ImageNet ResNet38, or the demo's pretraining; '' = random)."""
  if config.seg.init_weights:
    return config.seg.init_weights
  return export_dir(config, 'seam') if config.seg.init_from_seam else init_weights(config)


def seg_weights(config):
  """seg.checkpoint, '' = the segmentation export of this run."""
  return config.seg.checkpoint or export_dir(config, 'seg')


def seg_pred_dir(config):
  """seg.out_dir, '' = <workdir>/seg_pred: label PNGs of the test list."""
  return _or(config.seg.out_dir, config.workdir, 'seg_pred')


def predict_dir(config):
  """seg.predict_dir, '' = <workdir>/predict: label PNGs and overlays of predict.py."""
  return _or(config.seg.predict_dir, config.workdir, 'predict')


# --- pipeline bookkeeping (seam_jax.stages, seam_jax.report) and variant runs.
def voc_split(config, split):
  """<voc_root>/ImageSets/Segmentation/<split>.txt (train / val: what the demo stage generates)."""
  return os.path.join(voc_root(config), 'ImageSets', 'Segmentation', split + '.txt')


def stage_log(config):
  return os.path.join(config.workdir, 'stages.json')


def report_dir(config):
  return os.path.join(config.workdir, 'report')


def config_record(config):
  """<workdir>/config.json: the resolved config of the last run (seam_jax.runner)."""
  return os.path.join(config.workdir, 'config.json')


def superseded_dir(config):
  """<workdir>/superseded/: training folders set aside when their stage starts afresh (seam_jax.runner)."""
  return os.path.join(config.workdir, 'superseded')


# Path fields naming a stage output: a variant run derives them all again below its own workdir.
OUTPUT_FIELDS = ('infer.checkpoint', 'infer.cam_dir', 'infer.crf_dir', 'infer.label_dir', 'infer.overlay_dir',
                 'eval.pred_dir', 'eval.out_dir', 'aff.la_dir', 'aff.ha_dir', 'rw.checkpoint', 'rw.cam_dir',
                 'rw.out_dir', 'seg.label_dir', 'seg.checkpoint', 'seg.out_dir', 'seg.predict_dir')


def variant(config, name):
  """A copy of `config` for a second run in <workdir>/<name> on the same data (e.g. the CAM baseline): the input
  paths (VOC root, lists, labels, ground truth, initial weights) are pinned to this run's, every output path
  derives anew."""
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.data.voc_root, c.data.list_dir, c.data.cls_labels = voc_root(config), list_dir(config), cls_labels(config)
    c.eval.gt_dir, c.model.init_weights = gt_dir(config), init_weights(config)
    for field in OUTPUT_FIELDS:
      section, key = field.split('.')
      if section in c and key in c[section]:
        c[section][key] = ''
    c.workdir = os.path.join(config.workdir, name)
  return c


# --- per-image outputs (declared once; seam_jax.stages and the stage modules call these)
def cam_path(config, image_id):
  return os.path.join(cam_dir(config), image_id + '.npy')


def crf_path(config, alpha, image_id):
  return os.path.join(crf_dir(config, alpha), image_id + '.npy')


def rw_path(config, image_id):
  return os.path.join(rw_dir(config), image_id + '.png')


def rw_score_path(config, image_id):
  """The walk's score dict (rw.save_scores), beside its label PNG."""
  return os.path.join(rw_dir(config), image_id + '.npy')


def seg_pred_path(config, image_id):
  return os.path.join(seg_pred_dir(config), image_id + '.png')


def rw_cam_path(config, image_id):
  """The CAM dict the random walk starts from (rw.cam_dir, '' = the CAMs)."""
  return os.path.join(rw_cam_dir(config), image_id + '.npy')


def cam_label_path(config, image_id):
  """The optional label PNG of CAM inference (infer.label_dir; '' = none: None)."""
  return os.path.join(config.infer.label_dir, image_id + '.png') if config.infer.label_dir else None


def cam_overlay_path(config, image_id, cls):
  """The optional CAM overlay of foreground class `cls` (0-based) of one image (infer.overlay_dir)."""
  name = dataset(config).classes[cls].replace(' ', '_').replace(os.sep, '_')
  return os.path.join(config.infer.overlay_dir, f'{image_id}_{name}.png')


_PER_IMAGE_OUTPUTS = {
    'infer': lambda c, i: [cam_path(c, i)] + ([cam_label_path(c, i)] if c.infer.label_dir else []),
    'crf': lambda c, i: [crf_path(c, a, i) for a in c.infer.crf_alphas],
    'rw': lambda c, i: [rw_path(c, i)] + ([rw_score_path(c, i)] if c.rw.save_scores else []),
    'test_seg': lambda c, i: [seg_pred_path(c, i)],
}


def per_image_outputs(config, stage_name, image_id):
  """Every file per-image stage `stage_name` writes for one id (what its resume checks; CRF: in the order of
  infer.crf_alphas). Overlays, pictures for people, are not outputs."""
  return _PER_IMAGE_OUTPUTS[stage_name](config, image_id)
