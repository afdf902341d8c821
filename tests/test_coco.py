"""COCO-format reader (seam_jax.data.coco): the demo set written as COCO JSON (seam_jax.data.demo_formats) reads back
to the VOC-layout set's labels and masks, and every bad input is one DataError line naming the file and item, with
nothing written."""
import json
import os

import numpy as np
import pytest

from seam_jax.common import files
from seam_jax.common.errors import DataError
from seam_jax.data import coco, dataset_info, demo_formats, prepare, voc


@pytest.fixture(scope='module')
def demo(tmp_path_factory):
  return demo_formats.generate(str(tmp_path_factory.mktemp('formats')), num_train=10, num_val=6, num_aug=4)


def _run(p, out, suffix='json', workers=1):
  lists, gt = os.path.join(out, 'lists'), os.path.join(out, 'gt')
  summary = coco.prepare(p[f'train_{suffix}'], p['image_dir'], lists, gt, p[f'val_{suffix}'], workers=workers)
  return summary, lists, gt


def _voc_masks(p, ids):
  return {i: voc.load_mask(os.path.join(p['voc_root'], 'SegmentationClassAug', i + '.png')) for i in ids}


def _check_labels(p, lists):
  """cls_labels.npy (K = 7, classes by category id) equals the VOC masks' labels of every id."""
  labels = voc.load_cls_labels(os.path.join(lists, 'cls_labels.npy'))
  order = [voc.CLASSES.index(c) - 1 for c in demo_formats.CLASSES]
  masks = _voc_masks(p, labels)
  assert {i: v.tolist() for i, v in labels.items()} == {i: prepare.mask_label(m)[order].tolist()
                                                        for i, m in masks.items()}
  assert all(v.dtype == np.float32 and v.shape == (7,) for v in labels.values())
  return masks


def test_rle_round_trip_is_exact(demo, tmp_path):
  summary, lists, gt = _run(demo, str(tmp_path), workers=2)
  ids = demo_formats.split_ids(demo['voc_root'])
  assert voc.read_list(os.path.join(lists, 'train_aug.txt')) == voc.read_list(os.path.join(lists, 'train.txt'))
  assert voc.read_list(os.path.join(lists, 'train.txt')) == ids['train']
  assert voc.read_list(os.path.join(lists, 'val.txt')) == ids['val']
  trainval = voc.read_list(os.path.join(lists, 'trainval.txt'))   # read_list refuses an id named twice
  assert trainval == ids['train'] + ids['val']
  info = dataset_info.DatasetInfo.from_json(lists)
  assert info.num_classes == 7 and info.classes == demo_formats.CLASSES
  assert dataset_info.read_image_paths(lists) == {i: os.path.join(demo['image_dir'], i + '.jpg') for i in trainval}
  lut = demo_formats.class_lut()
  for i, m in _check_labels(demo, lists).items():
    np.testing.assert_array_equal(files.load_index_png(os.path.join(gt, i + '.png'), info.mask_values()), lut[m],
                                  err_msg=i)
  assert summary['crowd'] > 0 and summary['no_annotation'] == summary['empty_labels'] > 0


def test_polygon_round_trip_within_one_boundary_pixel(demo, tmp_path):
  """Polygons through the boundary pixels' centres lose at most the outer pixel ring of a region: every differing
  pixel is a class pixel of the VOC mask next to another value (or on the image border), read as background; < 2%."""
  _, lists, gt = _run(demo, str(tmp_path), 'polygons')
  lut, differ, total = demo_formats.class_lut(), 0, 0
  for i, m in _check_labels(demo, lists).items():
    want, got = lut[m], files.load_index_png(os.path.join(gt, i + '.png'))
    pad = np.pad(want, 1, constant_values=254)   # the image border counts as a boundary
    h, w = want.shape
    boundary = np.any([pad[dy:dy + h, dx:dx + w] != want for dy in range(3) for dx in range(3)], axis=0)
    bad = want != got
    assert not (bad & ~boundary).any() and (got[bad] == 0).all() and (want[bad] != voc.IGNORE).all(), i
    differ, total = differ + bad.sum(), total + bad.size
  assert differ / total < .02


def test_overlap_rule_and_crowd():
  """Larger instances first, smaller on top (whatever the file order); crowd regions 255 over everything."""
  def square(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]
  anns = [(1, False, square(4, 4, 8, 8)), (0, False, square(0, 0, 16, 16)), (2, True, square(12, 12, 20, 20))]
  mask = coco.rasterise((20, 20), anns)
  assert mask[6, 6] == 2 and mask[2, 2] == 1 and mask[14, 14] == 255 and mask[18, 2] == 0 and mask[18, 18] == 255


def _bad_json(p, tmp_path, mutate):
  """prepare on a copy of the train JSON changed by mutate(data) -> (expected substrings, raw text or None); checks
  one line naming the JSON file and each substring, and nothing written."""
  with open(p['train_json']) as f:
    data = json.load(f)
  expected, text = mutate(data)
  path = str(tmp_path / 'instances_bad.json')
  with open(path, 'w') as f:
    f.write(json.dumps(data) if text is None else text)
  run = tmp_path / 'run'
  with pytest.raises(DataError) as e:
    coco.prepare(path, p['image_dir'], str(run / 'lists'), str(run / 'gt'), workers=1)
  assert not [n for _, _, names in os.walk(run) for n in names], 'something was written'
  assert not os.path.exists(run / 'lists') and not os.path.exists(run / 'gt')
  message = str(e.value)
  assert '\n' not in message and path in message, message
  for part in expected:
    assert part in message, message


def _image(d, n, **fields):
  d['images'][n].update(fields)
  return d['images'][n]


def _annotation(d, n, **fields):
  d['annotations'][n].update(fields)
  return next(im for im in d['images'] if im['id'] == d['annotations'][n]['image_id'])


def _unannotated(d):
  used = {a['image_id'] for a in d['annotations']}
  return next(n for n, im in enumerate(d['images']) if im['id'] not in used)


def _outside(d):
  w = _annotation(d, 0)['width']
  _annotation(d, 0, segmentation=[[1, 1, 3, 1, w + 1.5, 2]])
  return ['annotation #0', f'point ({w + 1.5:g}, 2) lies outside the'], None


def _escaping(d):  # the first image is missing too: the escaping name is refused before any file is looked at
  _image(d, 0, file_name='gone.jpg')
  _image(d, 5, file_name='../x.jpg')
  return ['image #5', "'../x.jpg' points outside the image folder"], None


def _size_differs(d):  # an image without annotations: only its worker, opening the image, can tell
  n = _unannotated(d)
  _image(d, n, height=d['images'][n]['height'] + 1)
  return [f'image #{n}', 'but the image is'], None


BAD = {
    'unknown category': lambda d: (_annotation(d, 3, category_id=99) and ['annotation #3', 'unknown category id 99'],
                                   None),
    'missing image': lambda d: (_image(d, 2, file_name='nowhere.jpg') and ['image #2', 'image not found: ',
                                                                           'nowhere.jpg'], None),
    'polygon outside': _outside,
    'duplicate file name': lambda d: (_image(d, 4, file_name=d['images'][1]['file_name']) and
                                      ['image #4', 'named twice', 'image #1'], None),
    'same id in two folders': lambda d: (_image(d, 4, file_name='sub/' + d['images'][1]['file_name']) and
                                         ['image #4', 'the same id'], None),
    'name outside the folder': _escaping,
    'absolute name': lambda d: (_image(d, 5, file_name='/etc/passwd') and ['image #5', 'points outside'], None),
    'malformed json': lambda d: (['cannot parse COCO annotation file'], json.dumps(d)[:-40]),
    'missing list': lambda d: (d.pop('categories') and ['field "categories" must be list'], None),
    'size differs from image': _size_differs,
    'rle of another size': lambda d: (_annotation(d, 0, segmentation={'size': [5, 5], 'counts': [25]}) and
                                      ['annotation #0', 'RLE size [5, 5]'], None),
    'corrupt rle string': lambda d: (_annotation(d, 0, segmentation={'size': [_annotation(d, 0)['height'],
                                                                             _annotation(d, 0)['width']],
                                                                    'counts': 'zzzz'}) and
                                     ['annotation #0', "RLE counts must be", "'zzzz'"], None),
    'unknown image id': lambda d: (d['annotations'][2].update(image_id=12345) or ['annotation #2', 'image_id 12345'],
                                   None),
    'background category': lambda d: (d['categories'][0].update(name='background') or ["'background'"], None),
    'duplicate category name': lambda d: (d['categories'][0].update(name=d['categories'][1]['name']) or
                                          ['given more than once'], None),
}


@pytest.mark.parametrize('case', sorted(BAD))
def test_bad_input_is_one_line_naming_file_and_item(demo, tmp_path, case):
  _bad_json(demo, tmp_path, BAD[case])


def test_image_without_annotation_is_background(demo, tmp_path, caplog):
  caplog.set_level('INFO')
  summary, lists, gt = _run(demo, str(tmp_path))
  labels = voc.load_cls_labels(os.path.join(lists, 'cls_labels.npy'))
  empty = [i for i, v in labels.items() if not v.any()]
  assert summary['no_annotation'] == len(empty) > 0
  assert all(not files.load_index_png(os.path.join(gt, i + '.png')).any() for i in empty)
  assert f'{len(empty)} images have no annotation' in caplog.text


def test_outputs_stay_out_of_user_folders(demo, tmp_path):
  with pytest.raises(DataError, match='inside the input folder'):
    coco.prepare(demo['train_json'], demo['image_dir'], str(tmp_path / 'lists'),
                 os.path.join(demo['image_dir'], 'gt'), workers=1)
  user = tmp_path / 'mine'
  user.mkdir()
  (user / 'notes.txt').write_text('keep')
  with pytest.raises(DataError, match='did not generate'):
    coco.prepare(demo['train_json'], demo['image_dir'], str(tmp_path / 'lists'), str(user), workers=1)
  assert (user / 'notes.txt').read_text() == 'keep' and not os.path.exists(tmp_path / 'lists')


def test_rerun_replaces_its_own_masks(demo, tmp_path):
  _run(demo, str(tmp_path))
  _, _, gt = _run(demo, str(tmp_path), 'polygons')
  assert sorted(os.listdir(tmp_path)) == ['gt', 'lists']   # no staging or old folders left
  assert os.path.isfile(os.path.join(gt, dataset_info.GT_MARKER))
