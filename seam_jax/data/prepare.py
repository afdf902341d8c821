"""Data preparation (SEAM_SPEC sections 0 and 8): list files, image-level labels, and one check of every input.

Writes to config.data.list_dir: train.txt / val.txt (VOC ImageSets/Segmentation), train_aug.txt (SBD train + val,
or every id with a SegmentationClassAug mask when no sbd_root is given, plus VOC train, minus VOC val; sorted), and
config.data.cls_labels (np.save of a dict id -> float32[20] for train_aug + val ids), built from the XML
annotations (every object name, difficult ones included: the original) or from the SegmentationClassAug masks
(classes present but 0 and 255), per config.data.label_source. Every listed image and mask is decoded once in a
process pool; a bad file raises DataError naming it, or with on_error='skip' is logged and its id dropped.

The class set is VOC's 20 classes, or config.data.classes for a VOC-layout set of other classes (XML names and mask
values 1..K follow its order); it is written as <list_dir>/dataset.json, which every later stage reads
(seam_jax.layout.dataset). config.data.format 'coco' and 'csv' read COCO-format JSON (seam_jax.data.coco: masks
rasterised into <workdir>/gt) or images + a label CSV (seam_jax.data.csv_labels) into the same files.
"""
import dataclasses
import os
import xml.etree.ElementTree as ET

from absl import logging
import numpy as np

from seam_jax import layout
from seam_jax.common import errors, files, pools
from seam_jax.data import dataset_info, voc

LIST_NAMES = ('train_aug', 'train', 'val', 'trainval')
LABEL_SOURCES = ('xml', 'masks')


def voc_path(voc_root, folder, image_id):
  ext = {'JPEGImages': '.jpg', 'Annotations': '.xml'}.get(folder, '.png')
  return os.path.join(voc_root, folder, image_id + ext)


def xml_label(path, classes=voc.CLASSES[1:]):
  """Multi-hot float32[K] of every `name` tag of a VOC annotation that is one of the K `classes` (the original's
  rule)."""
  if not os.path.isfile(path):
    raise errors.DataError(f'annotation not found: {path}')
  try:
    root = ET.parse(path).getroot()
  except (ET.ParseError, OSError) as e:
    raise errors.DataError(f'cannot parse annotation {path}: {e}') from None
  index = {name: k for k, name in enumerate(classes)}
  label = np.zeros(len(classes), np.float32)
  for el in root.iter('name'):
    k = index.get((el.text or '').strip())
    if k is not None:
      label[k] = 1.
  return label


def mask_label(mask, num_classes=voc.NUM_FG):
  """Multi-hot float32[K] of the classes present in a class-index mask (values 1..K; 0 and 255 excluded)."""
  label = np.zeros(num_classes, np.float32)
  present = np.unique(mask)
  present = present[(present >= 1) & (present <= num_classes)]
  label[present.astype(int) - 1] = 1.
  return label


def build_lists(voc_root, sbd_root=''):
  """{'train_aug', 'train', 'val', 'trainval'} id lists (section 8); train/val keep the order of
  ImageSets/Segmentation, trainval is train then val (to infer CAMs once for training and for scoring on val)."""
  seg = os.path.join(voc_root, 'ImageSets', 'Segmentation')
  train, val = voc.read_list(os.path.join(seg, 'train.txt')), voc.read_list(os.path.join(seg, 'val.txt'))
  if sbd_root:
    sbd = voc.read_list(os.path.join(sbd_root, 'train.txt')) + voc.read_list(os.path.join(sbd_root, 'val.txt'))
  else:
    aug_dir = os.path.join(voc_root, 'SegmentationClassAug')
    if not os.path.isdir(aug_dir):
      raise errors.DataError(f'no SBD ids: {aug_dir} does not exist and config.data.sbd_root is not set')
    sbd = [os.path.splitext(f)[0] for f in os.listdir(aug_dir) if f.endswith('.png')]
  train_aug = sorted((set(sbd) | set(train)) - set(val))
  return {'train_aug': train_aug, 'train': train, 'val': val,
          'trainval': train + [i for i in val if i not in set(train)]}


@dataclasses.dataclass
class Checked:
  """Result of checking one id: labels from each source that was readable, and problems (each names a file)."""
  image_id: str
  xml: np.ndarray | None = None
  mask: np.ndarray | None = None
  errors: list = dataclasses.field(default_factory=list)


def check_id(voc_root, label_source, item, info=dataset_info.DatasetInfo.VOC):
  """Decode the image, the VOC mask (ids of train/val), the SegmentationClassAug mask and the annotation of one id.

  The label source's file must exist; the other source is read when present (to compare the two).
  """
  image_id, in_voc_seg = item
  out = Checked(image_id)

  def attempt(fn, *args):
    try:
      return fn(*args)
    except errors.DataError as e:
      out.errors.append(str(e))
      return None

  image_path = voc_path(voc_root, 'JPEGImages', image_id)
  image = attempt(files.load_image, image_path)

  def load_mask(path):   # a mask must cover its image pixel for pixel
    m = files.load_index_png(path, info.mask_values())
    if image is not None and m.shape != image.shape[:2]:
      raise errors.DataError(f'mask {path} is {m.shape[0]}x{m.shape[1]} but its image {image_path} is '
                             f'{image.shape[0]}x{image.shape[1]}')
    return m
  if in_voc_seg:
    attempt(load_mask, voc_path(voc_root, 'SegmentationClass', image_id))
  aug = voc_path(voc_root, 'SegmentationClassAug', image_id)
  if label_source == 'masks' or os.path.exists(aug):
    m = attempt(load_mask, aug)
    out.mask = None if m is None else mask_label(m, info.num_classes)
  ann = voc_path(voc_root, 'Annotations', image_id)
  if label_source == 'xml' or os.path.exists(ann):
    out.xml = attempt(xml_label, ann, info.classes)
  return out


def check_all(voc_root, items, label_source, workers=0, info=dataset_info.DatasetInfo.VOC):
  """check_id over [(id, in_voc_seg)] with a process pool of `workers` (0: in this process), in order."""
  fn = _CheckFn(voc_root, label_source, info)
  return list(pools.pool_imap(fn, items, max(int(workers), 1), desc='check files'))


@dataclasses.dataclass(frozen=True)
class _CheckFn:  # picklable partial of check_id
  voc_root: str
  label_source: str
  info: dataset_info.DatasetInfo

  def __call__(self, item):
    return check_id(self.voc_root, self.label_source, item, self.info)


def _few(ids, n=5):
  return ', '.join(ids[:n]) + (' ...' if len(ids) > n else '')


def prepare(config, workers=0):
  """Build, check and write the lists, cls_labels.npy and dataset.json (seam_jax.layout) of data.format; returns a
  summary dict (also logged)."""
  fmt = layout.data_format(config)
  if fmt != 'voc':
    return prepare_other(config, fmt, workers)
  d = config.data
  voc_root, list_dir, cls_labels = layout.voc_root(config), layout.list_dir(config), layout.cls_labels(config)
  info = layout.configured_dataset(config)
  if d.label_source not in LABEL_SOURCES:
    raise errors.DataError(f'config.data.label_source must be one of {LABEL_SOURCES}, got {d.label_source!r}')
  if d.on_error not in ('raise', 'skip'):
    raise errors.DataError(f"config.data.on_error must be 'raise' or 'skip', got {d.on_error!r}")
  lists = build_lists(voc_root, d.sbd_root)
  seg_ids = set(lists['train']) | set(lists['val'])
  all_ids = sorted(set(lists['train_aug']) | seg_ids)
  checked = check_all(voc_root, [(i, i in seg_ids) for i in all_ids], d.label_source, workers, info)

  bad = [c for c in checked if c.errors]
  if bad and d.on_error == 'raise':
    more = f' (and {len(bad) - 1} more ids with problems)' if len(bad) > 1 else ''
    raise errors.DataError('; '.join(bad[0].errors) + more)
  for c in bad:
    for e in c.errors:
      logging.warning('skipping id %s: %s', c.image_id, e)
  dropped = {c.image_id for c in bad}
  lists = {k: [i for i in v if i not in dropped] for k, v in lists.items()}

  by_id = {c.image_id: c for c in checked if c.image_id not in dropped}
  labelled = sorted(set(lists['train_aug']) | set(lists['val']))
  field = 'xml' if d.label_source == 'xml' else 'mask'
  labels = {i: getattr(by_id[i], field) for i in labelled}
  mismatch = [i for i in labelled if by_id[i].xml is not None and by_id[i].mask is not None
              and not np.array_equal(by_id[i].xml, by_id[i].mask)]
  empty = [i for i in labelled if not labels[i].any()]

  for name in LIST_NAMES:
    voc.write_list(os.path.join(list_dir, name + '.txt'), lists[name])
  files.save_npy_dict(cls_labels, labels)
  info.write(list_dir)

  summary = {'lists': {k: len(lists[k]) for k in LIST_NAMES}, 'labels': len(labels), 'skipped': sorted(dropped),
             'label_mismatch': mismatch, 'empty_labels': empty}
  logging.info('lists in %s: %s', list_dir, ', '.join(f'{k} {n} ids' for k, n in summary['lists'].items()))
  logging.info('labels (%s) of %d ids -> %s', d.label_source, len(labels), cls_labels)
  if dropped:
    logging.warning('%d ids skipped for bad files: %s', len(dropped), _few(sorted(dropped)))
  compared = sum(by_id[i].xml is not None and by_id[i].mask is not None for i in labelled)
  logging.info('XML and mask labels differ on %d of %d ids compared%s', len(mismatch), compared,
               f': {_few(mismatch)}' if mismatch else '')
  if empty:
    logging.warning('%d ids have no foreground class in their label: %s', len(empty), _few(empty))
  return summary


def prepare_other(config, fmt, workers=0):
  """data.format 'coco' or 'csv': the reader's run files in list_dir (COCO: masks in layout.coco_gt_dir)."""
  d = config.data
  for key in ('train_annotations', 'image_dir'):
    if not d[key]:
      raise errors.DataError(f'config.data.{key} is empty: data.format {fmt!r} reads the training images from '
                             'data.image_dir and their labels from data.train_annotations')
  common = dict(list_dir=layout.list_dir(config), val_image_dir=d.val_image_dir, cls_labels=d.cls_labels,
                workers=workers)
  if fmt == 'coco':
    from seam_jax.data import coco  # pylint: disable=g-import-not-at-top
    if d.classes or d.dataset_file:
      raise errors.DataError('config.data.classes or data.dataset_file is set, but data.format coco takes the '
                             'classes from the JSON categories: leave them empty')
    common['val_images'] = common.pop('val_image_dir')
    return coco.prepare(d.train_annotations, d.image_dir, gt_dir=layout.coco_gt_dir(config),
                        val_json=d.val_annotations, **common)
  from seam_jax.data import csv_labels  # pylint: disable=g-import-not-at-top
  return csv_labels.prepare(d.train_annotations, d.image_dir, val_csv=d.val_annotations,
                            classes=layout.configured_dataset(config), **common)


DEMO_MARKER = '.seam_jax_demo'   # written first into a folder the demo generates: the folder is the run's own


def demo_present(voc_root):
  seg = os.path.join(voc_root, 'ImageSets', 'Segmentation')
  return all(os.path.isfile(os.path.join(seg, f)) for f in ('train.txt', 'val.txt'))


def is_demo_folder(root):
  """True when the demo generated `root` (it holds DEMO_MARKER): the only data folder a stage may write into."""
  return os.path.isfile(os.path.join(root, DEMO_MARKER))


def demo_may_write(root):
  """The demo may generate into `root`: missing, empty, or generated by it before (is_demo_folder)."""
  return not (os.path.isdir(root) and os.listdir(root)) or is_demo_folder(root)


def make_demo(config, force=False, workers=0):
  """Generate the demo set at layout.voc_root(config) from config.demo, unless one is there already (or `force`).
  It writes only into a missing or empty folder, or one it generated before (DEMO_MARKER): any other folder is the
  user's data, and that is a DataError before anything is written."""
  from seam_jax.data import demo_data  # pylint: disable=g-import-not-at-top
  if 'demo' not in config:
    raise errors.DataError('this config has no `demo` fields: use --config=configs/demo.py with --demo')
  root = layout.voc_root(config)
  if not demo_may_write(root):
    raise errors.DataError(f'{root} (data.voc_root) holds files the demo did not generate: the demo writes only into '
                           'an empty folder or its own; leave data.voc_root empty (<workdir>/VOC2012) or name a new '
                           'folder')
  if demo_present(root) and not force:
    logging.info('demo set already at %s (--force regenerates it)', root)
    return None
  files.atomic_write_text(os.path.join(root, DEMO_MARKER), 'generated by seam_jax.data.demo_data\n')
  g = config.demo
  summary = demo_data.generate(root, num_train=g.num_train, num_val=g.num_val, num_aug=g.num_aug,
                               image_size=tuple(g.image_size), seed=g.seed, workers=workers,
                               **{k: g[k] for k in ('classes', 'object_scale', 'clutter', 'plain', 'empty_p') if k in g})
  logging.info('demo set: %d images under %s', summary['num_images'], root)
  return summary
