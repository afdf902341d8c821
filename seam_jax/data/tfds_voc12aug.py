"""Optional tensorflow-datasets packaging of the prepared VOC12 classification data, and a grain source reading it.

Importing this module imports tensorflow_datasets (and so tensorflow, see requirements-tfds.txt); nothing else in
seam_jax imports it. The builder stores each image's original bytes, its K-dim label (K = the run's class count,
layout.num_classes: VOC's 20 by default) and its id in ArrayRecord files; `TfdsClsSource` decodes the bytes with
Pillow exactly as `files.load_image`, so it yields the same records as `input_pipeline.VOCClsSource` and plugs into
`input_pipeline.make_loader`.

  builder = build(config, data_dir)                   # once: writes <data_dir>/voc12_aug/1.0.0/
  source = TfdsClsSource(data_dir, 'train_aug', layout.num_classes(config))
"""
import io
import os
import tempfile

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from seam_jax import layout
from seam_jax.common import errors, files
from seam_jax.data import dataset_info, voc

SPLITS = ('train_aug', 'train', 'val')


class Voc12Aug(tfds.core.GeneratorBasedBuilder):
  """PASCAL VOC 2012 (+ SBD), or any prepared set, image-level classification: {image, label (K multi-hot), id} per
  list of prepare.py; `num_classes` = K (VOC: 20)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  manual_dir holds VOC2012/JPEGImages/<id>.jpg (or lists/image_paths.tsv naming each image) and
  lists/{train_aug,train,val}.txt + lists/cls_labels.npy as written by `python prepare.py` (`build(config, data_dir)`
  assembles it from config.data with symlinks)."""

  def __init__(self, *, num_classes=voc.NUM_FG, **kwargs):
    self.num_classes = int(num_classes)
    super().__init__(**kwargs)
    self._original_state['num_classes'] = self.num_classes   # tfds re-creates a pickled builder from this

  def _info(self):
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3)),
            'label': tfds.features.Tensor(shape=(self.num_classes,), dtype=np.float32),
            'id': tfds.features.Text(),
        }),
        homepage='http://host.robots.ox.ac.uk/pascal/VOC/voc2012/',
    )

  def _split_generators(self, dl_manager):
    root = dl_manager.manual_dir
    return {s: self._generate_examples(root, s) for s in SPLITS if (root / 'lists' / f'{s}.txt').exists()}

  def _generate_examples(self, root, split):
    ids = voc.read_list(os.fspath(root / 'lists' / f'{split}.txt'))
    label_path = os.fspath(root / 'lists' / 'cls_labels.npy')
    labels = voc.labels_for(ids, voc.load_cls_labels(label_path), label_path, self.num_classes)
    lists = root / 'lists'
    paths = dataset_info.read_image_paths(os.fspath(lists)) if (lists / dataset_info.IMAGE_PATHS).exists() else {}
    for image_id, label in zip(ids, labels):
      path = paths.get(image_id) or os.fspath(root / 'VOC2012' / 'JPEGImages' / f'{image_id}.jpg')
      files.load_image(path)  # a bad image fails here, named, instead of deep inside TF
      yield image_id, {'image': path, 'label': label, 'id': image_id}


def manual_dir_for(config, dest):
  """Assemble the builder's manual_dir layout at `dest` from the prepared data of `config` (symlinks)."""
  os.makedirs(os.path.join(dest, 'lists'), exist_ok=True)
  links = {'VOC2012': layout.voc_root(config), os.path.join('lists', 'cls_labels.npy'): layout.cls_labels(config)}
  links.update({os.path.join('lists', f'{s}.txt'): layout.list_path(config, s) for s in SPLITS})
  index = os.path.join(layout.list_dir(config), dataset_info.IMAGE_PATHS)   # COCO / CSV formats: images anywhere
  links[os.path.join('lists', dataset_info.IMAGE_PATHS)] = index
  for name, target in links.items():
    if os.path.exists(target):
      os.symlink(os.path.abspath(target), os.path.join(dest, name))
  return dest


def build(config, data_dir):
  """Build (or reuse) the ArrayRecord dataset under data_dir from the prepared data of config.data."""
  builder = Voc12Aug(data_dir=data_dir, file_format='array_record', num_classes=layout.num_classes(config))
  with tempfile.TemporaryDirectory() as tmp:
    dl_config = tfds.download.DownloadConfig(manual_dir=manual_dir_for(config, tmp))
    builder.download_and_prepare(download_config=dl_config)
  return builder


class TfdsClsSource:
  """grain random-access source over a built split: {'id', 'image' uint8 HWC (Pillow decode), 'label' float32[K]},
  K = `num_classes` as built (layout.num_classes(config)).

  Records come in the builder's storage order (tfds shuffles by key), not the list order.
  """

  def __init__(self, data_dir, split, num_classes=voc.NUM_FG):
    self.split = split
    self._data = Voc12Aug(data_dir=data_dir, num_classes=num_classes).as_data_source(
        split, decoders={'image': tfds.decode.SkipDecoding()})

  def __len__(self):
    return len(self._data)

  def __getitem__(self, index):
    r = self._data[index]
    image_id = r['id'].decode() if isinstance(r['id'], bytes) else str(r['id'])
    try:
      with Image.open(io.BytesIO(r['image'])) as im:
        image = np.asarray(im.convert('RGB'))
    except Exception as e:  # noqa: BLE001 - any decode failure is the same data error
      raise errors.DataError(f'cannot decode image {image_id} of tfds split {self.split}: {e}') from None
    return {'id': image_id, 'image': image, 'label': np.asarray(r['label'], np.float32)}

  def __repr__(self):
    return f'TfdsClsSource(split={self.split!r}, num_records={len(self)})'
