"""COCO-format instance annotations (instances_*.json: images, annotations, categories) -> the run files `prepare`
writes for VOC: lists, cls_labels.npy, dataset.json (seam_jax.data.dataset_info), and ground-truth masks for
evaluation in a folder of the run.

Rules:
- Classes: the JSON's categories sorted by category id (the convention of published COCO WSSS code, e.g. COCO's 80
  ids 1..90 -> indices 0..79), whatever their order in the file; train and val JSON must list the same categories.
- Image ids: the stem of each image's file name ('train2014/COCO_train2014_000000000009.jpg' ->
  'COCO_train2014_000000000009'); unique over train and val together (dataset_info.image_id).
- Image-level label: the classes of the image's non-crowd annotations (float32[K] multi-hot, K categories), whether
  or not their pixels survive in the mask. An image without annotations is kept, background only (empty label).
- Masks (palette PNG, pixel = class index + 1, 0 background, ignore label 255), rasterised from polygons, RLE or
  uncompressed RLE by pycocotools: non-crowd instances painted larger area first (area of the rasterised mask;
  ties in file order), so smaller ones lie on top; then every crowd region (iscrowd=1) painted as 255 over
  everything: a crowd's pixels are not scored. Masks are written for every image of both splits.
- Lists: train_aug and train = the train JSON's images, val = the val JSON's, trainval = train then val (file order).

Checks (one DataError naming the file and item, before any output is written; masks are staged in a temporary
folder and renamed into place only when all are done): malformed JSON or fields, an unknown category id, an
annotation of an unknown image, an image file missing, named twice or outside its image folder (refused before any
image is opened), a polygon point more than 1 px outside its image, an RLE of another size, an image whose size
differs from the JSON's.
"""
import collections
import dataclasses
import os
import shutil
import warnings

from absl import logging
import numpy as np
from pycocotools import mask as mask_utils

from seam_jax.common import files, pools
from seam_jax.common.errors import DataError
from seam_jax.data import dataset_info

POLYGON_SLACK = 1.0   # px a polygon point may lie beyond the image border (COCO's own polygons do, slightly)


def _get(obj, key, kind, where, default=None):
  """obj[key] checked to be of `kind` (int excludes bool); a missing key with a default gives the default."""
  if not isinstance(obj, dict):
    raise DataError(f'{where}: expected an object, got {type(obj).__name__}')
  if key not in obj and default is not None:
    return default
  v = obj.get(key)
  if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
    names = kind.__name__ if isinstance(kind, type) else ' or '.join(k.__name__ for k in kind)
    raise DataError(f'{where}: field "{key}" must be {names}, got {v!r:.60}')
  return v


def load_json(path):
  """The parsed instances file; unreadable or malformed JSON, or a missing top-level list, is a DataError."""
  data = files.read_json(path, 'COCO annotation file')
  for key in ('images', 'annotations', 'categories'):
    _get(data, key, list, path)
  return data


def categories(path, data, name='coco'):
  """(DatasetInfo of the categories in id order, {category id: class index})."""
  ids, names = [], {}
  for n, c in enumerate(data['categories']):
    where = f'{path}: category #{n}'
    cid = _get(c, 'id', int, where)
    if cid in names:
      raise DataError(f'{where}: category id {cid} is given twice')
    ids.append(cid)
    names[cid] = _get(c, 'name', str, where)
  ids.sort()
  return dataset_info.DatasetInfo.parse(path, name, [names[i] for i in ids]), {cid: k for k, cid in enumerate(ids)}


@dataclasses.dataclass
class Record:
  """One image of a split: its file name, size, where it is named, and its annotations [(index, crowd, seg)]."""
  file_name: str
  size: tuple
  where: str
  anns: list = dataclasses.field(default_factory=list)


def _check_segmentation(seg, size, where):
  """A polygon list or an RLE dict that fits an image of `size` (h, w); else DataError."""
  h, w = size
  if isinstance(seg, list):
    for poly in seg:
      try:
        p = np.asarray(poly, np.float64)
      except (TypeError, ValueError):
        p = None
      if p is None or p.ndim != 1 or p.size < 6 or p.size % 2 or not np.isfinite(p).all():
        raise DataError(f'{where}: a polygon must be a flat list of at least 3 x, y pairs, got {poly!r:.60}')
      xy = p.reshape(-1, 2)
      out = (xy < -POLYGON_SLACK).any(1) | (xy[:, 0] > w + POLYGON_SLACK) | (xy[:, 1] > h + POLYGON_SLACK)
      if out.any():
        x, y = xy[np.argmax(out)]
        raise DataError(f'{where}: polygon point ({x:g}, {y:g}) lies outside the {w}x{h} (width x height) image')
    return
  counts = seg.get('counts') if isinstance(seg, dict) else None
  if not isinstance(counts, (list, str)):
    raise DataError(f'{where}: segmentation must be a list of polygons or an RLE {{"size", "counts"}}, got '
                    f'{seg!r:.60}')
  if list(seg.get('size') or ()) != [h, w]:
    raise DataError(f'{where}: RLE size {seg.get("size")} differs from the image size [{h}, {w}]')
  runs = counts if isinstance(counts, list) else rle_string_counts(counts)
  if runs is None or not all(isinstance(c, int) and c >= 0 for c in runs) or sum(runs) != h * w:
    raise DataError(f'{where}: RLE counts must be non-negative integers summing to {h} * {w} (the pixel count); '
                    f'got {counts!r:.40}')


def rle_string_counts(text):
  """The run lengths of a compressed RLE string (pycocotools' rleFrString: 5 bits a character from '0', 0x20 =
  more to come, 0x10 = negative, from the third run on a delta to the run two before), None when malformed. Checked
  here because pycocotools decodes a malformed string into undefined pixels instead of failing."""
  runs, p = [], 0
  while p < len(text):
    x, k, more = 0, 0, True
    while more:
      c = ord(text[p]) - 48 if p < len(text) else -1
      if not 0 <= c < 64:
        return None
      x |= (c & 0x1f) << (5 * k)
      more, p, k = c & 0x20, p + 1, k + 1
      if not more and c & 0x10:
        x |= -1 << (5 * k)
    runs.append(x + (runs[-2] if len(runs) > 2 else 0))
  return runs


def read_split(path, image_dir, name='coco'):
  """(DatasetInfo, [Record]) of one instances file: every field checked, annotations grouped by image once."""
  data = load_json(path)
  info, cat_index = categories(path, data, name)
  records = {}
  for n, im in enumerate(data['images']):
    where = f'{path}: image #{n}'
    iid = _get(im, 'id', (int, str), where)
    if iid in records:
      raise DataError(f'{where}: image id {iid!r} is given twice')
    file_name = _get(im, 'file_name', str, where)
    size = tuple(_get(im, k, int, where) for k in ('height', 'width'))
    if min(size) < 1:
      raise DataError(f'{where}: image size {size[0]}x{size[1]} is empty')
    records[iid] = Record(file_name, size, f'{where} ({os.path.join(image_dir, file_name)})')
  if not records:
    raise DataError(f'{path}: lists no images')
  for n, a in enumerate(data['annotations']):
    where = f'{path}: annotation #{n} (id {a.get("id") if isinstance(a, dict) else "?"})'
    rec = records.get(_get(a, 'image_id', (int, str), where))
    if rec is None:
      raise DataError(f'{where}: image_id {a["image_id"]!r} is not an image of the file')
    cid = _get(a, 'category_id', int, where)
    if cid not in cat_index:
      raise DataError(f'{where}: unknown category id {cid} (the file\'s categories: {sorted(cat_index)})')
    crowd = _get(a, 'iscrowd', int, where, default=0)
    seg = a.get('segmentation')
    _check_segmentation(seg, rec.size, f'{where} of {rec.file_name}')
    rec.anns.append((cat_index[cid], bool(crowd), seg))
  return info, list(records.values())


def _rle(seg, h, w):
  """The compressed RLE of one annotation's segmentation (None for an empty polygon list)."""
  if isinstance(seg, list):
    return mask_utils.merge(mask_utils.frPyObjects(seg, h, w)) if seg else None
  if isinstance(seg['counts'], list):
    return mask_utils.frPyObjects(seg, h, w)
  return {'size': [h, w], 'counts': seg['counts'].encode('ascii')}


def rasterise(size, anns, ignore_label=255):
  """uint8 class-index mask of one image from [(class index, crowd, segmentation)] by the module's rules."""
  h, w = size
  mask = np.zeros((h, w), np.uint8)
  rles = [(k, crowd, _rle(seg, h, w)) for k, crowd, seg in anns]
  things = [(k, r) for k, crowd, r in rles if r is not None and not crowd]
  areas = mask_utils.area([r for _, r in things]) if things else []
  order = sorted(range(len(things)), key=lambda j: -int(areas[j]))   # stable: equal areas keep file order
  paint = ([(things[j][0] + 1, things[j][1]) for j in order] +
           [(ignore_label, r) for _, crowd, r in rles if crowd and r is not None])
  with warnings.catch_warnings():   # pycocotools' decode trips numpy 2's copy=False deprecation; harmless
    warnings.filterwarnings('ignore', '__array__ implementation', DeprecationWarning)
    for value, r in paint:
      mask[mask_utils.decode(r) > 0] = value
  return mask


@dataclasses.dataclass(frozen=True)
class _Rasterise:  # picklable: one image per call in a pool worker
  out_dir: str
  info: dataset_info.DatasetInfo

  def __call__(self, item):
    image, rec = item
    size = dataset_info.image_size(image)
    if tuple(size) != rec.size:
      raise DataError(f'{rec.where}: the JSON gives {rec.size[0]}x{rec.size[1]} (height x width) but the image is '
                      f'{size[0]}x{size[1]}')
    try:
      mask = rasterise(rec.size, rec.anns, self.info.ignore_label)
    except Exception as e:  # noqa: BLE001 - a corrupt RLE string fails inside pycocotools
      raise DataError(f'{rec.where}: cannot rasterise its annotations: {e}') from None
    self.info.save_mask(os.path.join(self.out_dir, image.id + '.png'), mask)
    return int((mask == self.info.ignore_label).sum())


def prepare(train_json, train_images, list_dir, gt_dir, val_json='', val_images='', cls_labels='', name='coco',
            workers=0):
  """Read, check and convert a COCO-format set (val optional; val_images '' = train_images); write the lists,
  cls_labels.npy ('' = <list_dir>/cls_labels.npy), dataset.json and image_paths.tsv into list_dir and one mask PNG
  per image into gt_dir (a folder of the run). workers: processes rasterising (0 or 1: in this process).
  Returns a summary (also logged)."""
  splits = [('train', train_json, train_images)] + ([('val', val_json, val_images or train_images)] if val_json else [])
  dataset_info.refuse_inside([list_dir, gt_dir] + ([cls_labels] if cls_labels else []), [d for _, _, d in splits])
  dataset_info.refuse_inside([list_dir] + ([cls_labels] if cls_labels else []), [gt_dir], 'the mask folder')
  info, recs = None, []
  for split, path, image_dir in splits:
    split_info, split_recs = read_split(path, image_dir, name)
    if info is not None and split_info != info:
      raise DataError(f'{path}: its categories {list(split_info.classes)} differ from those of {train_json}')
    info = split_info
    recs += [(split, image_dir, r) for r in split_recs]
  images = dataset_info.list_images([(image_dir, r.file_name, r.where) for _, image_dir, r in recs])
  work = [(m, r) for m, (_, _, r) in zip(images, recs)]
  ids = {split: [m.id for m, (s, _, _) in zip(images, recs) if s == split] for split, _, _ in splits}
  lists = dataset_info.split_lists(ids['train'], ids.get('val'))
  labels = {m.id: dataset_info.label_vector({k for k, crowd, _ in r.anns if not crowd}, info.num_classes)
            for m, r in work}

  tmp = dataset_info.staging_dir(gt_dir)
  try:
    ignored = sum(pools.pool_imap(_Rasterise(tmp, info), work, max(int(workers), 1), desc='coco masks'))
    dataset_info.publish_dir(tmp, gt_dir)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  dataset_info.write_run_files(list_dir, cls_labels, lists, labels, info, images)

  n_ann = collections.Counter(crowd for _, r in work for _, crowd, _ in r.anns)
  unannotated = [m.id for m, r in work if not r.anns]
  summary = {'images': {s: len(lists[s]) for s in ('train', 'val') if s in lists}, 'num_classes': info.num_classes,
             'annotations': n_ann[False], 'crowd': n_ann[True], 'ignored_pixels': ignored,
             'no_annotation': len(unannotated), 'empty_labels': sum(not v.any() for v in labels.values())}
  logging.info('COCO set: %s images, %d classes, %d annotations + %d crowd -> lists and labels in %s, masks in %s',
               summary['images'], info.num_classes, n_ann[False], n_ann[True], list_dir, gt_dir)
  if unannotated:
    logging.info('%d images have no annotation: kept as background only (empty label), e.g. %s',
                 len(unannotated), ', '.join(unannotated[:5]))
  return summary
