"""Images + label CSV reader (seam_jax.data.csv_labels) on the demo set written as CSV (seam_jax.data.demo_formats),
its bad inputs (one DataError line naming the file and line, nothing written), and the data set description
(seam_jax.data.dataset_info)."""
import os

import numpy as np
from PIL import Image
import pytest

from seam_jax.common import files
from seam_jax.common.errors import DataError
from seam_jax.data import csv_labels, dataset_info, demo_formats, prepare, voc
from seam_jax.data.dataset_info import DatasetInfo


@pytest.fixture(scope='module')
def demo(tmp_path_factory):
  return demo_formats.generate(str(tmp_path_factory.mktemp('formats')), num_train=8, num_val=4, num_aug=2)


def _voc_labels(p, ids, classes):
  order = [voc.CLASSES.index(c) - 1 for c in classes]
  return {i: prepare.mask_label(voc.load_mask(os.path.join(p['voc_root'], 'SegmentationClassAug', i + '.png')))[order]
          for i in ids}


@pytest.mark.parametrize('classes', [None, demo_formats.CLASSES])
def test_round_trip(demo, tmp_path, classes):
  """Labels equal the VOC masks' in the stated class order (given, or the sorted names of the CSVs); no masks."""
  lists = str(tmp_path / 'lists')
  summary = csv_labels.prepare(demo['train_csv'], demo['image_dir'], lists, demo['val_csv'], classes=classes,
                               workers=2 if classes is None else 1)
  info = DatasetInfo.from_json(lists)
  assert info.classes == (tuple(sorted(demo_formats.CLASSES)) if classes is None else demo_formats.CLASSES)
  assert info.num_classes == 7 and summary['images'] == {'train': 10, 'val': 4}
  ids = demo_formats.split_ids(demo['voc_root'])
  assert voc.read_list(os.path.join(lists, 'train_aug.txt')) == ids['train']
  assert voc.read_list(os.path.join(lists, 'trainval.txt')) == ids['train'] + ids['val']
  labels = voc.load_cls_labels(os.path.join(lists, 'cls_labels.npy'))
  want = _voc_labels(demo, ids['train'] + ids['val'], info.classes)
  assert {i: v.tolist() for i, v in labels.items()} == {i: v.tolist() for i, v in want.items()}
  assert summary['empty_labels'] == sum(not v.any() for v in want.values()) > 0
  assert sorted(os.listdir(tmp_path)) == ['lists']


def test_without_val_writes_no_val_list(demo, tmp_path):
  csv_labels.prepare(demo['train_csv'], demo['image_dir'], str(tmp_path), workers=1)
  assert not os.path.exists(tmp_path / 'val.txt')
  assert voc.read_list(str(tmp_path / 'trainval.txt')) == voc.read_list(str(tmp_path / 'train.txt'))


def _corrupt(image_dir):
  with open(os.path.join(image_dir, 'broken.jpg'), 'wb') as f:
    f.write(b'not a jpeg')
  return 'broken.jpg'


BAD = {   # rows after the header, the class list given, the substrings of the one-line error
    'unknown class': (['a.jpg,cat;zebra'], demo_formats.CLASSES, ['line 2', "unknown class name 'zebra'"]),
    'duplicate image': (['a.jpg,cat', 'b.jpg,dog', 'a.jpg,dog'], None, ['line 4', 'named twice', 'line 2']),
    'missing image': (['a.jpg,cat', 'nowhere.jpg,dog'], None, ['line 3', 'image not found', 'nowhere.jpg']),
    'outside the folder': (['nowhere.jpg,cat', '../a.jpg,dog'], None, ['line 3', 'points outside the image folder']),
    'absolute path': (['/etc/hosts,cat'], None, ['line 2', 'points outside the image folder']),
    'three fields': (['a.jpg,cat,dog'], None, ['line 2', 'expected 2 fields']),
    'no header': (['a.jpg,cat'], None, ['line 1 must be the header image,labels']),
    'undecodable image': (['a.jpg,cat', 'broken.jpg,cat'], None, ['cannot decode image', 'broken.jpg']),
    'background named': (['a.jpg,background'], None, ["'background' is not a foreground class"]),
}


@pytest.mark.parametrize('case', sorted(BAD))
def test_bad_input_is_one_line_naming_file_and_line(tmp_path, case):
  rows, classes, expected = BAD[case]
  images = tmp_path / 'images'
  images.mkdir()
  for name in ('a.jpg', 'b.jpg'):
    Image.new('RGB', (8, 6)).save(images / name)
  _corrupt(str(images))
  path = tmp_path / 'labels.csv'
  path.write_text(('' if case == 'no header' else 'image,labels\n') + ''.join(r + '\n' for r in rows))
  with pytest.raises(DataError) as e:
    csv_labels.prepare(str(path), str(images), str(tmp_path / 'run' / 'lists'), classes=classes, workers=1)
  message = str(e.value)
  assert '\n' not in message and str(path) in message, message
  for part in expected:
    assert part in message, message
  assert not os.path.exists(tmp_path / 'run')


def test_separator_and_blanks(tmp_path):
  """';' separates names, blanks around them are dropped, names may hold blanks; an empty field = background."""
  (tmp_path / 'im' / 'sub').mkdir(parents=True)
  Image.new('RGB', (8, 6)).save(tmp_path / 'im' / 'sub' / 'a.png')
  Image.new('RGB', (8, 6)).save(tmp_path / 'im' / 'b.jpg')
  (tmp_path / 'l.csv').write_text('image,labels\nsub/a.png," traffic light ; cat"\nb.jpg,\n')
  csv_labels.prepare(str(tmp_path / 'l.csv'), str(tmp_path / 'im'), str(tmp_path / 'out'), workers=1)
  labels = voc.load_cls_labels(str(tmp_path / 'out' / 'cls_labels.npy'))
  assert DatasetInfo.from_json(str(tmp_path / 'out')).classes == ('cat', 'traffic light')
  assert labels['a'].tolist() == [1, 1] and labels['b'].tolist() == [0, 0]
  assert dataset_info.read_image_paths(str(tmp_path / 'out'))['a'] == str(tmp_path / 'im' / 'sub' / 'a.png')


# --- the data set description ---

def test_dataset_info_round_trip(tmp_path):
  info = DatasetInfo('mine', ['cat', 'dog', 'traffic light'], palette=[[0, 0, 0], [255, 0, 0]])
  path = info.write(str(tmp_path))
  assert DatasetInfo.from_json(path) == info and info.num_classes == 3
  pal = info.palette_array()
  assert pal.shape == (256, 3) and pal[1].tolist() == [255, 0, 0] and (pal[2:] == files.voc_palette()[2:]).all()
  info.save_mask(str(tmp_path / 'm.png'), np.array([[0, 1], [3, 255]], np.uint8))
  np.testing.assert_array_equal(files.load_index_png(str(tmp_path / 'm.png'), info.mask_values()), [[0, 1], [3, 255]])
  assert DatasetInfo.VOC.num_classes == 20 and DatasetInfo.VOC.classes == voc.CLASSES[1:]
  assert DatasetInfo.VOC.palette_array().tolist() == files.voc_palette().tolist()


@pytest.mark.parametrize('text, expected', [
    ('{"name": "x", "classes": ["a", "a"]}', "class name 'a' is given more than once"),
    ('{"name": "x", "classes": ["a", ""]}', 'class names must be non-empty'),
    ('{"name": "x", "classes": ["Background", "a"]}', "'background' is not a foreground class"),
    ('{"name": "x", "classes": []}', 'no foreground class names'),
    ('{"name": "x", "classes": "ab"}', 'classes must be a list'),
    ('{"name": "x", "classes": ["a"], "num_classes": 2}', 'num_classes 2 but 1 class names'),
    ('{"name": "x", "classes": ["a"], "ignore_label": 1}', 'ignore_label must be an integer in 2..255'),
    ('{"name": "x", "classes": ["a"], "colours": 1}', 'expected an object with "name" and "classes"'),
    ('{"name": "x", "classes": ["a"], "palette": [[1, 2]]}', 'palette must be'),
    ('{"name": "x", "classes": ["a"', 'cannot parse dataset description'),
])
def test_dataset_info_bad_file_names_it(tmp_path, text, expected):
  path = tmp_path / 'dataset.json'
  path.write_text(text)
  with pytest.raises(DataError) as e:
    DatasetInfo.from_json(str(path))
  assert str(path) in str(e.value) and expected in str(e.value), str(e.value)
