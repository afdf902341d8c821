"""grain input pipelines: random-access VOC sources, a generic sharded loader, SEAM's training loader and the
multi-scale inference views (SEAM_SPEC sections 3 and 4).

Determinism: position k of the global stream is record `EpochOrder[k]` (a fresh permutation per epoch) augmented
with an `np.random.Generator` seeded by (seed, k); batches are formed before grain's worker processes split the
work, so the stream does not depend on the worker count, and `iter(loader).get_state()` / `set_state()` (or grain's
orbax handler, `grain.checkpoint.CheckpointSave/CheckpointRestore`) resume it bit-exactly.
"""
import collections
import concurrent.futures
import dataclasses
import functools
import os
import sys
import zlib

from absl import flags
from absl import logging
import grain
import numpy as np
from PIL import Image

from seam_jax import layout
from seam_jax.common import errors, files
from seam_jax.data import augment
from seam_jax.data import voc

ON_ERROR = ('raise', 'skip')


def image_path(voc_root, image_id):
  """VOC's <voc_root>/JPEGImages/<id>.jpg (any layout: layout.images(config), see as_images)."""
  return layout.Images(voc_root)(image_id)


def as_images(images):
  """id -> image file: a layout.Images (layout.images(config): VOC, COCO or CSV sets), or a VOC root folder."""
  return layout.Images(images) if isinstance(images, (str, os.PathLike)) else images


def _check_on_error(on_error):
  if on_error not in ON_ERROR:
    raise ValueError(f'on_error must be one of {ON_ERROR}, got {on_error!r}')


def ids_digest(ids):
  return f'{zlib.crc32(chr(10).join(ids).encode()):08x}'


class IdSource:
  """Base of the random-access sources over image ids (grain data sources): subclasses define load(index).

  A missing or undecodable file raises DataError naming it; with on_error='skip' it is logged and counted
  (`self.skipped`, per process) and the record is None (make_loader uses the next readable one).
  """

  def __init__(self, ids, on_error='raise'):
    _check_on_error(on_error)
    self.ids = list(ids)
    self.on_error = on_error
    self.skipped = 0

  def __len__(self):
    return len(self.ids)

  def load(self, index):
    raise NotImplementedError

  def __getitem__(self, index):
    try:
      return self.load(index)
    except errors.DataError as e:
      if self.on_error == 'raise':
        raise
      self.skipped += 1
      logging.warning('skipping record %d: %s (%d skipped so far in this process)', index, e, self.skipped)
      return None


class VOCClsSource(IdSource):
  """{'id': str, 'image': uint8 HWC RGB, 'label': float32[K]} records (IdSource error handling). `images`: a
  layout.Images or a VOC root (as_images); labels (N, K)."""

  def __init__(self, images, ids, labels, on_error='raise'):
    super().__init__(ids, on_error)
    self.images = as_images(images)
    self.labels = np.asarray(labels, np.float32).reshape(len(self.ids), -1)

  def load(self, index):
    image_id = self.ids[index]
    image = files.load_image(self.images(image_id))
    return {'id': image_id, 'image': image, 'label': self.labels[index].copy()}

  def __repr__(self):  # grain compares it when restoring an iterator: the ids, not where the folder lies
    return f'VOCClsSource(num_records={len(self.ids)}, ids_crc32={ids_digest(self.ids)})'


class EpochOrder:
  """Global stream position k -> record index.

  Epoch k // per_epoch is a fresh permutation (seeded by (seed, epoch)) cut to its first `per_epoch` records; with
  per_epoch a multiple of the global batch this is PyTorch's shuffle + drop_last (every batch inside one epoch).
  """

  def __init__(self, num_records, per_epoch, *, shuffle, seed, num_epochs=None):
    if not 0 < per_epoch <= num_records:
      raise ValueError(f'per_epoch must be in [1, {num_records}], got {per_epoch}')
    self.num_records, self.per_epoch = int(num_records), int(per_epoch)
    self.shuffle, self.seed, self.num_epochs = bool(shuffle), int(seed), num_epochs

  def __len__(self):
    return sys.maxsize if self.num_epochs is None else self.num_epochs * self.per_epoch

  def __getitem__(self, k):
    if not 0 <= k < len(self):
      raise IndexError(f'stream position {k} out of range [0, {len(self)})')
    epoch, pos = divmod(k, self.per_epoch)
    return int(_permutation(self.num_records, self.seed, epoch)[pos]) if self.shuffle else pos

  def __repr__(self):
    return (f'EpochOrder(num_records={self.num_records}, per_epoch={self.per_epoch}, shuffle={self.shuffle}, '
            f'seed={self.seed}, num_epochs={self.num_epochs})')


@functools.lru_cache(maxsize=4)
def _permutation(n, seed, epoch):
  return np.random.default_rng((seed, epoch)).permutation(n)


class _Stream:
  """Random-access global stream: element k = (k, record at order[k]). A record the source skipped (None) is
  replaced by the next readable one, so batch shapes never change."""

  def __init__(self, source, order):
    self.source, self.order = source, order

  def __len__(self):
    return len(self.order)

  def __getitem__(self, k):
    key, n = self.order[k], len(self.source)
    for j in range(n):
      record = self.source[(key + j) % n]
      if record is not None:
        return k, record
    raise errors.DataError(f'{self.source!r}: no readable record')

  def __repr__(self):
    return f'_Stream({self.source!r}, {self.order!r})'


class _ProcessRows:
  """Process p's part of the global stream: its m-th element is row p b + m % b of global batch m // b (b = B / P
  rows each). The rows a process holds are the ones its devices hold in the global array (jax orders a mesh's
  devices process by process), so P processes see the same global batch, row for row, as one process."""

  def __init__(self, stream, global_batch_size, count, index):
    self.stream, self.batch, self.count, self.index = stream, global_batch_size, count, index
    self.rows = global_batch_size // count

  def __len__(self):
    full, last = divmod(len(self.stream), self.batch)
    return full * self.rows + min(max(last - self.index * self.rows, 0), self.rows)

  def __getitem__(self, m):
    j, i = divmod(m, self.rows)
    return self.stream[j * self.batch + self.index * self.rows + i]

  def __repr__(self):
    return f'_ProcessRows({self.stream!r}, batch={self.batch}, process={self.index}/{self.count})'


@dataclasses.dataclass(frozen=True)
class _AugmentRecord:
  """(k, record) -> augment_fn(record, rng) with rng = np.random.default_rng((seed, k))."""
  augment_fn: object
  seed: int

  def __call__(self, item):
    k, record = item
    return self.augment_fn(record, np.random.default_rng((self.seed, k)))


def make_loader(source, augment_fn, *, global_batch_size, seed, shuffle=True, num_epochs=None, worker_count=0,
                drop_remainder=True, worker_buffer_size=1, read_threads=2):
  """grain pipeline of batches of `augment_fn(record, rng) -> dict of arrays`, sharded over JAX processes.

  Global stream position k holds record EpochOrder[k] augmented with rng default_rng((seed, k)); global batch j
  is positions [j B, (j + 1) B) and process p of P gets its rows [p b, (p + 1) b), b = B / P (_ProcessRows).
  Batching happens before the worker processes split the work, so the stream is the same for any worker_count.
  `source[i]` may return None for a record to skip. `augment_fn` must be picklable (cloudpickle) when worker_count > 0.
  `read_threads` threads make batches ahead, up to max(read_threads, worker_buffer_size) of them (and
  `worker_buffer_size` per worker process).
  Returns a grain IterDataset: `it = iter(loader)`, `it.get_state()` / `it.set_state(state)` resume exactly.
  """
  import jax  # pylint: disable=g-import-not-at-top  (lazy: spawned grain workers need not import jax)
  count, index = jax.process_count(), jax.process_index()
  if global_batch_size % count:
    raise ValueError(f'global batch {global_batch_size} is not divisible by {count} processes')
  n = len(source)
  per_epoch = (n // global_batch_size) * global_batch_size if drop_remainder else n
  if per_epoch == 0:
    raise errors.DataError(f'{source!r}: {n} records, fewer than one global batch of {global_batch_size}')
  order = EpochOrder(n, per_epoch, shuffle=shuffle, seed=seed, num_epochs=num_epochs)
  stream = _Stream(source, order)
  ds = grain.MapDataset.source(stream if count == 1 else _ProcessRows(stream, global_batch_size, count, index))
  ds = ds.map(_AugmentRecord(augment_fn, int(seed))).batch(global_batch_size // count, drop_remainder=drop_remainder)
  # Each read thread makes whole batches: the buffer holds at least one per thread (grain warns otherwise).
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                            prefetch_buffer_size=max(read_threads, worker_buffer_size)))
  if worker_count:
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()  # grain's workers read its absl flags: outside an absl app use their defaults
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count,
                                                     per_worker_buffer_size=worker_buffer_size))
  return ds


@dataclasses.dataclass(frozen=True)
class SeamAugment:
  """Record -> {'image': float32 (crop, crop, 3), 'label': float32[K]} (augment.seam_train_augment), or with
  `device` only the host half: the resized, flipped uint8 image in a (resize_long[1])^2 canvas and the draws
  (augment.photometric_record), which seam_jax.data.device_augment finishes in the train step."""
  crop_size: int
  resize_long: tuple
  jitter: tuple
  device: bool = False

  @classmethod
  def from_config(cls, data_config, device=False):
    return cls(int(data_config.crop_size), tuple(data_config.resize_long), tuple(data_config.jitter), bool(device))

  def __call__(self, record, rng):
    if not self.device:
      return {'image': augment.seam_train_augment(record['image'], rng, self), 'label': record['label']}
    img, jitter, box = augment.seam_train_draws(record['image'], rng, self)
    side = max(self.resize_long[1], self.crop_size)
    return {**augment.photometric_record(img, jitter, box, side, name=record['id']), 'label': record['label']}


def check_label_width(cls_labels, ids, label_path, num_classes):
  """A label file written for another class set (no listed id has a K-dim label, some have labels of another
  width) is one DataError naming the file and both widths, whatever on_error says: no id of it is usable."""
  widths = collections.Counter(int(np.size(cls_labels[i])) for i in ids if i in cls_labels)
  if widths and num_classes not in widths:
    width = widths.most_common(1)[0][0]
    raise errors.DataError(f'{label_path}: labels of {width} classes, but the data set has {num_classes} '
                           '(dataset.json / config.data.classes): a label file of another class set')


def labelled_ids(ids, label_path, on_error='raise', num_classes=voc.NUM_FG):
  """(ids, float32 (N, K) labels) from cls_labels.npy, K = `num_classes` (layout.num_classes). A file of another
  width is a DataError naming it (check_label_width); ids without a K-dim label -> DataError naming the label file
  (on_error='skip': warn, count, drop them)."""
  _check_on_error(on_error)
  cls_labels = voc.load_cls_labels(label_path)
  check_label_width(cls_labels, ids, label_path, num_classes)
  bad = [i for i in ids if i not in cls_labels or np.size(cls_labels[i]) != num_classes]
  if bad and on_error == 'raise':
    raise errors.DataError(f'{len(bad)} listed ids have no {num_classes}-dim label in {label_path}, e.g. {bad[:3]}')
  if bad:
    logging.warning('skipping %d ids without a %d-dim label in %s, e.g. %s', len(bad), num_classes, label_path,
                    bad[:3])
    bad = set(bad)
    ids = [i for i in ids if i not in bad]
  if not ids:
    raise errors.DataError(f'no labelled ids left (label file {label_path})')
  return ids, voc.labels_for(ids, cls_labels, label_path, num_classes)


def seam_train_loader(config, seed=None):
  """(loader of SEAM training batches {'image' (B,H,W,3), 'label' (B,K)} (make_loader), number of records); with
  config.data.device_augment the batches hold the photometric records instead of 'image' (SeamAugment).

  Reads the class set (layout.num_classes), the images (layout.images: any data format), config.data
  (train_list in list_dir, cls_labels, crop/resize/jitter, device_augment,
  num_workers, prefetch, on_error), config.train.batch_size (global) and config.seed (unless `seed` is given).
  The stream is infinite: the trainer stops after its step count.
  """
  d = config.data
  ids = layout.read_ids(config, d.train_list)
  ids, labels = labelled_ids(ids, layout.cls_labels(config), d.on_error, layout.num_classes(config))
  source = VOCClsSource(layout.images(config), ids, labels, on_error=d.on_error)
  augment_fn = SeamAugment.from_config(d, device=d.device_augment)
  loader = make_loader(source, augment_fn, global_batch_size=config.train.batch_size,
                       seed=config.seed if seed is None else seed, worker_count=d.num_workers,
                       worker_buffer_size=max(1, d.prefetch))
  return loader, len(ids)


def view_size(hw, scale):
  """PIL size (W, H) of an inference view: (round(W * s), round(H * s)) as the original (Python round)."""
  h, w = hw
  return int(round(w * scale)), int(round(h * scale))


def inference_views(img_uint8, scales, flip):
  """[(normalised float32 HWC view, flipped, scale)]: per scale the PIL-bicubic resize, then its mirror if `flip`
  (the original's view order)."""
  img = Image.fromarray(np.asarray(img_uint8, np.uint8))
  views = []
  for s in scales:
    v = voc.normalize(img.resize(view_size((img.height, img.width), s), Image.Resampling.BICUBIC))
    views.append((v, False, s))
    if flip:
      views.append((np.ascontiguousarray(v[:, ::-1]), True, s))
  return views


def iterate_images(images, ids, prefetch=4, threads=2):
  """Yield (id, uint8 HWC image) in list order, decoding up to `prefetch` images ahead in threads; `images`: a
  layout.Images or a VOC root (as_images)."""
  images = as_images(images)
  with concurrent.futures.ThreadPoolExecutor(threads) as ex:
    pending = collections.deque()
    for image_id in ids:
      pending.append((image_id, ex.submit(files.load_image, images(image_id))))
      if len(pending) > prefetch:
        i, f = pending.popleft()
        yield i, f.result()
    while pending:
      i, f = pending.popleft()
      yield i, f.result()
