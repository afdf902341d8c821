"""A data set described in one place (class names, ignore label, palette), and what every reader of a new input
format (seam_jax.data.coco, seam_jax.data.csv_labels) shares: image ids from file names, checked before anything is
read, and the run files `prepare` writes.

`prepare` writes the description as <list_dir>/dataset.json, so every later stage reads the class set from the run
folder instead of assuming VOC's 20 classes. Beside it, <list_dir>/image_paths.tsv maps each id to its image file
(`<id>\\t<path>`), since these formats name images freely (subfolders, .png) where VOC has JPEGImages/<id>.jpg.
"""
import dataclasses
import json
import os
import shutil
from typing import ClassVar

import numpy as np
from PIL import Image

from seam_jax.common import files
from seam_jax.common.errors import DataError
from seam_jax.data import voc

FILE_NAME = 'dataset.json'
IMAGE_PATHS = 'image_paths.tsv'
LIST_NAMES = ('train_aug', 'train', 'val', 'trainval')   # those of seam_jax.data.prepare
_FIELDS = ('name', 'classes', 'num_classes', 'ignore_label', 'palette')
GT_MARKER = '.seam_jax_gt'   # written into a mask folder a reader generated: the only one it may replace


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """name; classes: the foreground class names in index order (mask value = index + 1, 0 = background);
  ignore_label: the mask value not scored; palette: ((r, g, b), ...) of mask values 0.. (None: VOC's colour map;
  a shorter one is completed with VOC's colours)."""
  name: str
  classes: tuple
  ignore_label: int = voc.IGNORE
  palette: tuple | None = None
  VOC: ClassVar['DatasetInfo']

  def __post_init__(self):
    if isinstance(self.classes, str) or not isinstance(self.classes, (list, tuple)):
      raise DataError(f'classes must be a list of names, got {self.classes!r}')
    object.__setattr__(self, 'classes', tuple(self.classes))
    if self.palette is not None:
      try:
        object.__setattr__(self, 'palette', tuple(tuple(c) for c in self.palette))
      except TypeError:
        raise DataError(f'palette must be a list of [r, g, b] triples, got {self.palette!r}') from None
    _validate(self)

  @property
  def num_classes(self):
    """Foreground classes (K): the width of every cls_labels.npy entry."""
    return len(self.classes)

  def palette_array(self):
    """uint8[256, 3] colour of every mask value."""
    pal = files.voc_palette()
    if self.palette:
      pal[:len(self.palette)] = np.asarray(self.palette, np.uint8)
    return pal

  def mask_values(self):
    """The values a ground-truth mask may hold: 0..K and the ignore label."""
    return np.r_[np.arange(self.num_classes + 1), self.ignore_label]

  def save_mask(self, path, mask):
    """A class-index mask as a palette PNG in this set's colours, atomically."""
    im = Image.fromarray(np.asarray(mask, np.uint8), mode='P')
    im.putpalette(self.palette_array().reshape(-1).tolist())
    files.atomic_write(path, lambda f: im.save(f, format='PNG'))

  def to_json(self):
    return json.dumps({'name': self.name, 'classes': list(self.classes), 'num_classes': self.num_classes,
                       'ignore_label': self.ignore_label,
                       'palette': None if self.palette is None else [list(c) for c in self.palette]}, indent=1) + '\n'

  def write(self, list_dir):
    """<list_dir>/dataset.json, atomically; returns its path."""
    path = os.path.join(list_dir, FILE_NAME)
    files.atomic_write_text(path, self.to_json())
    return path

  @classmethod
  def parse(cls, source, name, classes, ignore_label=voc.IGNORE, palette=None):
    """Construct from fields read from `source`; invalid fields -> one DataError naming it."""
    try:
      return cls(name, classes, ignore_label, palette)
    except DataError as e:
      raise DataError(f'{source}: {e}') from None

  @classmethod
  def from_json(cls, path):
    """Read a dataset.json (a path, or the list_dir holding one); every problem is a DataError naming the file."""
    path = os.path.join(path, FILE_NAME) if os.path.isdir(path) else path
    d = files.read_json(path, 'dataset description', ' (run prepare first)')
    if not isinstance(d, dict) or set(d) - set(_FIELDS) or not {'name', 'classes'} <= set(d):
      raise DataError(f'{path}: expected an object with "name" and "classes" (optional "num_classes", '
                      f'"ignore_label", "palette"), got {sorted(d) if isinstance(d, dict) else type(d).__name__}')
    info = cls.parse(path, d['name'], d['classes'], d.get('ignore_label', voc.IGNORE), d.get('palette'))
    if d.get('num_classes', info.num_classes) != info.num_classes:
      raise DataError(f'{path}: num_classes {d["num_classes"]} but {info.num_classes} class names')
    return info




def _validate(info):
  """DataError (what is wrong, without the source: DatasetInfo.parse adds it) for invalid fields."""
  if not isinstance(info.name, str) or not info.name.strip():
    raise DataError(f'dataset name must be a non-empty string, got {info.name!r}')
  if not info.classes:
    raise DataError('no foreground class names')
  bad = [c for c in info.classes if not isinstance(c, str) or not c.strip() or c != c.strip()]
  if bad:
    raise DataError(f'class names must be non-empty strings without surrounding blanks, got {bad[0]!r}')
  seen = set()
  twice = [c for c in info.classes if c in seen or seen.add(c)]
  if twice:
    raise DataError(f'class name {twice[0]!r} is given more than once')
  if 'background' in {c.lower() for c in info.classes}:
    raise DataError("'background' is not a foreground class: it is mask value 0 of every set; leave it out")
  if not isinstance(info.ignore_label, int) or not info.num_classes < info.ignore_label <= 255:
    raise DataError(f'ignore_label must be an integer in {info.num_classes + 1}..255 (above the {info.num_classes} '
                    f'class values, within a uint8 mask), got {info.ignore_label!r}')
  pal = info.palette
  if pal is not None and not (len(pal) <= 256 and all(len(c) == 3 and all(isinstance(v, int) and 0 <= v <= 255
                                                                            for v in c) for c in pal)):
    raise DataError('palette must be at most 256 [r, g, b] triples of integers 0..255')


DatasetInfo.VOC = DatasetInfo('voc12', voc.CLASSES[1:])


# --- image ids and the run files (shared by the readers of new formats) ---

@dataclasses.dataclass(frozen=True)
class ListedImage:
  """One image a label file names: its id, its path (image_dir joined with the name) and where it was named."""
  id: str
  path: str
  where: str   # e.g. 'instances_val.json: image #42 (...)' or 'labels.csv: line 7'


def image_id(file_name, where):
  """The id of an image named `file_name` (relative to its image folder): the stem of its base name
  ('sub/000042.jpg' -> '000042'). An empty, absolute or escaping ('../x.jpg') name is refused, and so is a stem
  that a list file would not read back as itself (blanks, or a stem ending in .jpg)."""
  if not isinstance(file_name, str) or not file_name.strip():
    raise DataError(f'{where}: empty or missing file name {file_name!r}')
  norm = os.path.normpath(file_name)
  if os.path.isabs(file_name) or norm == '..' or norm.startswith('..' + os.sep) or norm == '.':
    raise DataError(f'{where}: file name {file_name!r} points outside the image folder; give it relative to the '
                    'image folder, without ..')
  stem = os.path.splitext(os.path.basename(norm))[0]
  if not stem or voc.parse_id(stem) != stem or len(stem.split()) != 1:
    raise DataError(f'{where}: file name {file_name!r} does not give a usable image id (its stem {stem!r} must be '
                    'one word, without / and not ending in .jpg)')
  return stem


def list_images(named):
  """[ListedImage] (absolute paths) of [(image_dir, file_name, where)], every split of a run together: every name
  checked (image_id), no file named twice and no id twice, then every file checked to exist. Nothing is opened."""
  out, by_file, by_id = [], {}, {}
  for image_dir, file_name, where in named:
    i = image_id(file_name, where)
    path = os.path.abspath(os.path.join(image_dir, os.path.normpath(file_name)))
    if path in by_file:
      raise DataError(f'{where}: file {path} is named twice (also at {by_file[path].where})')
    if i in by_id:
      raise DataError(f'{where}: files {by_id[i].path} and {path} have the same id {i!r} (also at {by_id[i].where}; '
                      'ids are file stems: rename one)')
    by_file[path] = by_id[i] = ListedImage(i, path, where)
    out.append(by_id[i])
  missing = [m for m in out if not os.path.isfile(m.path)]
  if missing:
    more = f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''
    raise DataError(f'{missing[0].where}: image not found: {missing[0].path}{more}')
  return out


def image_size(image):
  """(h, w) of a ListedImage from its header; a corrupt file is a DataError naming where it is listed."""
  try:
    return files.image_size(image.path)
  except DataError as e:
    raise DataError(f'{image.where}: {e}') from None


def refuse_inside(outputs, folders, what='the input folder'):
  """DataError when an output path lies in (or is) one of `folders` (by default the user's input: the run writes
  only its own)."""
  for out in outputs:
    real = os.path.realpath(out)
    for d in folders:
      root = os.path.realpath(d)
      if real == root or real.startswith(root + os.sep):
        raise DataError(f'refusing to write {out}: it is inside {what} {d}; give another folder of the run')


def split_lists(train, val=None):
  """The lists prepare writes, from the training ids and the optional val ids: train_aug = train (what SEAM trains
  on), val (only when given), trainval = train then val (what CAMs are inferred on)."""
  lists = {'train_aug': list(train), 'train': list(train), 'trainval': list(train) + list(val or [])}
  if val is not None:
    lists['val'] = list(val)
  return lists


def write_run_files(list_dir, cls_labels, lists, labels, info, images):
  """The lists (LIST_NAMES present in `lists`), cls_labels.npy (dict id -> float32[K]), dataset.json and
  image_paths.tsv, each atomically. `cls_labels` '' = <list_dir>/cls_labels.npy."""
  for name in LIST_NAMES:
    if name in lists:
      voc.write_list(os.path.join(list_dir, name + '.txt'), lists[name])
  files.save_npy_dict(cls_labels or os.path.join(list_dir, 'cls_labels.npy'), labels)
  info.write(list_dir)
  files.atomic_write_text(os.path.join(list_dir, IMAGE_PATHS), ''.join(f'{m.id}\t{m.path}\n' for m in images))


def read_image_paths(list_dir):
  """{id: image path} of <list_dir>/image_paths.tsv (what layout.image_path reads for these formats)."""
  path = os.path.join(list_dir, IMAGE_PATHS)
  if not os.path.isfile(path):
    raise DataError(f'image index not found: {path} (run prepare first)')
  with open(path, encoding='utf-8') as f:
    return dict(line.rstrip('\n').split('\t', 1) for line in f if line.strip())


def staging_dir(out_dir):
  """A fresh temporary folder beside `out_dir` to fill; publish_dir puts it in place. Refused inside protected
  folders (files.protecting), and when `out_dir` holds files a reader did not generate (no GT_MARKER)."""
  files.check_writable(out_dir)
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise DataError(f'{out_dir} is a file, not a folder for the masks')
  if os.path.isdir(out_dir) and os.listdir(out_dir) and not os.path.isfile(os.path.join(out_dir, GT_MARKER)):
    raise DataError(f'{out_dir} holds files this reader did not generate: the masks go only into a new or empty '
                    'folder or one generated before; name another folder')
  tmp = f'{out_dir}.tmp.{os.getpid()}'
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  files.atomic_write_text(os.path.join(tmp, GT_MARKER), 'generated by seam_jax.data (mask folder of the run)\n')
  return tmp


def publish_dir(tmp, out_dir):
  """Rename the filled `tmp` onto `out_dir` (an older one of ours is set aside, then removed)."""
  old = f'{out_dir}.old.{os.getpid()}'
  if os.path.isdir(out_dir):
    files.move(out_dir, old)
  files.move(tmp, out_dir)
  shutil.rmtree(old, ignore_errors=True)


def label_vector(indices, num_classes):
  """float32[K] multi-hot of the 0-based class indices."""
  v = np.zeros(num_classes, np.float32)
  v[sorted(indices)] = 1.
  return v
