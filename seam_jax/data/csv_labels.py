"""Images + a CSV of image-level labels -> the run files `prepare` writes for VOC (lists, cls_labels.npy,
dataset.json, image_paths.tsv), for data with no masks at all: no ground truth, so evaluation is skipped later.

The CSV: a header line `image,labels`, then one row per image: the image's file name relative to the image folder
(ids are the file stems, dataset_info.image_id), and its class names separated by ';' (not blanks: names may hold
them, e.g. 'traffic light'; blanks around a name are dropped; an empty field = background only). Standard CSV
quoting applies. Classes: the `classes` given, in that order (a name not among them is a DataError), else the sorted
set of every name in the train and val CSVs. Lists: train_aug and train = the train CSV's images in file order;
val = the val CSV's (when given); trainval = train then val.

Checks (one DataError naming the file and line; nothing is written unless all pass): malformed CSV or header, an
unknown class name, an image named twice (or two with one id), outside its folder (refused before any image is
opened), missing, or not decodable.
"""
import csv
import os

from absl import logging

from seam_jax.common import pools
from seam_jax.common.errors import DataError
from seam_jax.data import dataset_info

HEADER = ['image', 'labels']
SEPARATOR = ';'


def read_csv(path):
  """[(file name, [class names], where)] of the rows of a label CSV, in file order."""
  if not os.path.isfile(path):
    raise DataError(f'label file not found: {path}')
  rows = []
  try:
    with open(path, newline='', encoding='utf-8-sig') as f:
      reader = csv.reader(f)
      header = next(reader, None)
      if [h.strip() for h in header or []] != HEADER:
        raise DataError(f'{path}: line 1 must be the header {",".join(HEADER)}, got {",".join(header or [])!r}')
      for row in reader:
        where = f'{path}: line {reader.line_num}'
        if not any(cell.strip() for cell in row):
          continue
        if len(row) != 2:
          raise DataError(f'{where}: expected 2 fields (image, labels), got {len(row)}: {row!r:.80}')
        names = [n.strip() for n in row[1].split(SEPARATOR) if n.strip()]
        rows.append((row[0].strip(), names, where))
  except (OSError, UnicodeDecodeError, csv.Error) as e:
    raise DataError(f'cannot read label file {path}: {e}') from None
  if not rows:
    raise DataError(f'{path}: lists no images')
  return rows


def prepare(train_csv, image_dir, list_dir, val_csv='', val_image_dir='', classes=None, cls_labels='', name='csv',
            workers=0):
  """Read and check the label CSV(s) and their images; write the lists, cls_labels.npy ('' = <list_dir>/
  cls_labels.npy, float32[K] per id), dataset.json and image_paths.tsv into list_dir. classes: the class names in
  index order (None: the sorted names of the CSVs), or a whole DatasetInfo (names, ignore label, palette);
  workers: processes decoding image headers (0 or 1: in this process). Returns a summary (also logged)."""
  splits = [('train', train_csv, image_dir)] + ([('val', val_csv, val_image_dir or image_dir)] if val_csv else [])
  dataset_info.refuse_inside([list_dir] + ([cls_labels] if cls_labels else []), [d for _, _, d in splits])
  rows = [(split, folder, row) for split, path, folder in splits for row in read_csv(path)]
  if isinstance(classes, dataset_info.DatasetInfo):
    info = classes
  elif classes is None:
    info = dataset_info.DatasetInfo.parse(f'the class names of {train_csv}', name,
                                          sorted({n for _, _, (_, names, _) in rows for n in names}))
  else:
    info = dataset_info.DatasetInfo.parse('the class list given', name, list(classes))
  index = {c: k for k, c in enumerate(info.classes)}
  for _, _, (_, names, where) in rows:
    unknown = [n for n in names if n not in index]
    if unknown:
      raise DataError(f'{where}: unknown class name {unknown[0]!r} (the classes: {", ".join(info.classes)})')
  images = dataset_info.list_images([(folder, file_name, where) for _, folder, (file_name, _, where) in rows])
  for _ in pools.pool_imap(dataset_info.image_size, images, max(int(workers), 1), desc='check images'):
    pass
  ids = {split: [m.id for m, (s, _, _) in zip(images, rows) if s == split] for split, _, _ in splits}
  lists = dataset_info.split_lists(ids['train'], ids.get('val'))
  labels = {m.id: dataset_info.label_vector({index[n] for n in names}, info.num_classes)
            for m, (_, _, (_, names, _)) in zip(images, rows)}
  dataset_info.write_run_files(list_dir, cls_labels, lists, labels, info, images)

  empty = [i for i, v in labels.items() if not v.any()]
  summary = {'images': {s: len(v) for s, v in ids.items()}, 'num_classes': info.num_classes,
             'classes': list(info.classes), 'empty_labels': len(empty)}
  logging.info('CSV set: %s images, %d classes (%s) -> lists and labels in %s; no masks: evaluation is skipped',
               summary['images'], info.num_classes, ', '.join(info.classes), list_dir)
  if empty:
    logging.info('%d images have no class in their label (background only), e.g. %s', len(empty),
                 ', '.join(empty[:5]))
  return summary
