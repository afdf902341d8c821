"""Tests of the generated VOC-layout demo set (seam_jax.data.demo_data)."""
import colorsys
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import numpy as np
from PIL import Image
import pytest

from seam_jax.common import errors, files
from seam_jax.data import demo_data
from seam_jax.data import voc

SMALL = dict(num_train=12, num_val=6, num_aug=4, seed=0)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def small(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('demo') / 'VOC2012')
  return root, demo_data.generate(root, **SMALL)


def _files(root):
  """{relative path: bytes} of every file under root."""
  out = {}
  for d, _, names in os.walk(root):
    for n in names:
      p = os.path.join(d, n)
      with open(p, 'rb') as f:
        out[os.path.relpath(p, root)] = f.read()
  return out


def _ids(root, split):
  return voc.read_list(os.path.join(root, 'ImageSets', 'Segmentation', split + '.txt'))


def _xml_objects(root, image_id):
  a = ET.parse(os.path.join(root, 'Annotations', image_id + '.xml')).getroot()
  size = tuple(int(a.find('size/' + t).text) for t in ('height', 'width'))
  objs = [(o.find('name').text, int(o.find('difficult').text),
           tuple(int(o.find('bndbox/' + t).text) for t in ('xmin', 'ymin', 'xmax', 'ymax')))
          for o in a.iter('object')]
  return size, objs


def _all_ids(root):
  return sorted(os.path.splitext(n)[0] for n in os.listdir(os.path.join(root, 'JPEGImages')))


def test_layout_and_lists(small):
  root, summary = small
  train, val = _ids(root, 'train'), _ids(root, 'val')
  assert (len(train), len(val)) == (12, 6) and train == sorted(train) and not set(train) & set(val)
  assert _ids(root, 'trainval') == sorted(train + val)
  ids = _all_ids(root)
  assert len(ids) == 22 and all(len(i) == 11 and i[4] == '_' and 2007 <= int(i[:4]) <= 2012 for i in ids)
  aug = sorted(set(ids) - set(train) - set(val))
  assert len(aug) == 4
  listing = {d: sorted(os.listdir(os.path.join(root, d))) for d in
             ('JPEGImages', 'SegmentationClass', 'SegmentationClassAug', 'Annotations')}
  assert listing['SegmentationClass'] == sorted(i + '.png' for i in train + val)   # VOC masks: no aug ids
  assert listing['SegmentationClassAug'] == [i + '.png' for i in ids]
  assert listing['Annotations'] == [i + '.xml' for i in ids]
  assert (summary['num_train'], summary['num_val'], summary['num_aug'], summary['num_images']) == (12, 6, 4, 22)


def test_file_formats_and_void_band(small):
  root, _ = small
  pal = files.voc_palette().reshape(-1).tolist()
  for i in _all_ids(root):
    with Image.open(os.path.join(root, 'JPEGImages', i + '.jpg')) as im:
      assert im.format == 'JPEG' and im.mode == 'RGB'
      h, w = im.height, im.width
    assert 96 <= h <= 128 and 96 <= w <= 128
    with Image.open(os.path.join(root, 'SegmentationClassAug', i + '.png')) as im:
      assert im.mode == 'P' and im.getpalette()[:768] == pal
    m = voc.load_mask(os.path.join(root, 'SegmentationClassAug', i + '.png'))   # values 0..20 / 255
    assert m.shape == (h, w) and (m == 255).any() and (m == 0).any()
    # Two different labels never touch: every boundary lies inside the void band ...
    for a, b in ((m[1:], m[:-1]), (m[:, 1:], m[:, :-1])):
      assert not ((a != b) & (a != 255) & (b != 255)).any()
    # ... and the band is thin: every void pixel has a labelled pixel within 2 px.
    p = np.pad(m != 255, 2)
    near = np.zeros_like(m, bool)
    for dy in range(5):
      for dx in range(5):
        near |= p[dy:dy + h, dx:dx + w]
    assert near[m == 255].all()
  for i in _ids(root, 'train') + _ids(root, 'val'):   # VOC and Aug masks agree on VOC ids
    assert np.array_equal(voc.load_mask(os.path.join(root, 'SegmentationClass', i + '.png')),
                          voc.load_mask(os.path.join(root, 'SegmentationClassAug', i + '.png')))


def test_masks_xml_and_image_agree(small):
  root, _ = small
  names = voc.CLASSES
  for i in _all_ids(root):
    m = voc.load_mask(os.path.join(root, 'SegmentationClassAug', i + '.png'))
    size, objs = _xml_objects(root, i)
    assert size == m.shape and 1 <= len(objs) <= 4
    present = sorted(set(np.unique(m).tolist()) - {0, 255})
    assert present == sorted({names.index(n) for n, _, _ in objs})
    hsv = np.asarray(Image.open(os.path.join(root, 'JPEGImages', i + '.jpg')).convert('HSV'), np.float32) / 255
    for c in present:
      boxes = [b for n, _, b in objs if names.index(n) == c]
      ys, xs = np.nonzero(m == c)
      in_box = np.zeros(len(xs), bool)
      for x0, y0, x1, y1 in boxes:
        assert 1 <= x0 <= x1 <= size[1] and 1 <= y0 <= y1 <= size[0]
        in_box |= (xs + 1 >= x0) & (xs + 1 <= x1) & (ys + 1 >= y0) & (ys + 1 <= y1)
      assert in_box.all()
      # The labelled pixels are the drawn object: their colour has the class hue (20 hues, 0.05 apart).
      px = hsv[m == c]
      px = px[(px[:, 1] > .35) & (px[:, 2] > .25)]
      d = np.abs(px[:, 0] - (c - 1) / 20)
      assert np.median(np.minimum(d, 1 - d)) < .025, (i, c)


def test_same_seed_and_workers_give_identical_bytes_other_seed_differs(small, tmp_path):
  root, summary = small
  again = str(tmp_path / 'a')
  assert demo_data.generate(again, workers=2, **SMALL) == dict(summary, root=again)
  assert _files(again) == _files(root)
  other = str(tmp_path / 'b')
  demo_data.generate(other, **dict(SMALL, seed=1))
  a, b = _files(root), _files(other)
  jpgs = [k for k in a if k.startswith('JPEGImages')]
  assert len(jpgs) == 22 and all(a[k] != b[k] for k in jpgs)     # same ids, other pictures
  assert _ids(root, 'train') != _ids(other, 'train')           # and other splits


def test_classes_cover_all_balanced_and_summary_matches(tmp_path):
  root = str(tmp_path / 'VOC2012')
  s = demo_data.generate(root, num_train=40, num_val=20, num_aug=0, image_size=(64, 80), seed=3)
  counts = {sp: np.zeros(voc.NUM_FG, int) for sp in ('train', 'val')}
  sizes, difficult, overlaps = [], [], 0
  for sp in counts:
    for i in _ids(root, sp):
      m = voc.load_mask(os.path.join(root, 'SegmentationClass', i + '.png'))
      for c in set(np.unique(m).tolist()) - {0, 255}:
        counts[sp][c - 1] += 1
      _, objs = _xml_objects(root, i)
      difficult += [d for _, d, _ in objs]
      sizes += [max(x1 - x0, y1 - y0) / min(m.shape) for _, _, (x0, y0, x1, y1) in objs]
      boxes = [b for _, _, b in objs]
      overlaps += sum(min(a[2], b[2]) >= max(a[0], b[0]) and min(a[3], b[3]) >= max(a[1], b[1])
                      for j, a in enumerate(boxes) for b in boxes[:j])
  for sp in counts:
    assert list(s['class_hist'][sp].values()) == counts[sp].tolist()
    assert counts[sp].min() >= 1          # every class in train and in val
  total = counts['train'] + counts['val']
  assert total.max() <= 3 * total.min()  # roughly balanced
  assert 0 < sum(difficult) < len(difficult) == s['num_objects']
  assert min(sizes) < .3 and max(sizes) > .45 and overlaps > 0   # scale variation, occlusion


def test_plain_style_subset_colours_and_counts(tmp_path):
  """The demo config's set: only `classes`, flat discs of each class's own colour (plain_colour), 1-2 per image."""
  root = str(tmp_path / 'VOC2012')
  classes = (1, 6, 8, 15)
  s = demo_data.generate(root, num_train=24, num_val=8, num_aug=4, image_size=(64, 80), seed=1, classes=classes,
                         object_scale=(0.3, 0.5), plain=True)
  assert {voc.CLASSES.index(k) for k, v in s['class_hist']['all'].items() if v} == set(classes)
  for i in _all_ids(root):
    img = np.asarray(Image.open(os.path.join(root, 'JPEGImages', i + '.jpg')), np.float32)
    m = voc.load_mask(os.path.join(root, 'SegmentationClassAug', i + '.png'))
    _, objs = _xml_objects(root, i)
    assert 1 <= len(objs) <= 2 and {voc.CLASSES.index(n) for n, _, _ in objs} == set(np.unique(m).tolist()) - {0, 255}
    for c in set(np.unique(m).tolist()) - {0, 255}:
      want = demo_data.plain_colour(c, classes)
      assert np.abs(np.median(img[m == c], axis=0) - want).max() < 12   # flat colour (JPEG + pixel noise)
    assert np.std(img[m == 0]) > 12                                        # grey noise background
  assert demo_data.generate(str(tmp_path / 'again'), num_train=24, num_val=8, num_aug=4, image_size=(64, 80),
                            seed=1, classes=classes, object_scale=(0.3, 0.5), plain=True) == dict(
                                s, root=str(tmp_path / 'again'))


@pytest.mark.parametrize('classes', [demo_data.ALL_CLASSES, (1, 6, 8, 15), (3, 11, 12, 20), (7, 2)])
def test_plain_colours_spread_over_the_hue_wheel(classes):
  """The k-th of n drawn classes has hue k / n (uint8 rounding moves a hue by under 1 / (6 * chroma) of a turn,
  chroma = 0.85 * 0.9 * 255 = 195 levels): with all 20 classes, class c has hue (c - 1) / 20."""
  for k, c in enumerate(classes):
    h, s, v = colorsys.rgb_to_hsv(*(np.array(demo_data.plain_colour(c, classes)) / 255.))
    d = abs(h - k / len(classes))
    assert min(d, 1 - d) < 1 / (6 * 194) and abs(s - .85) < .01 and abs(v - .9) < .01


def test_empty_images_in_train_and_aug_only(tmp_path):
  """empty_p: round(empty_p * n) train and aug ids hold nothing (mask all background, XML without objects, empty
  labels after prepare); val ids always hold an object; every other id is the image it is without empty_p."""
  kw = dict(num_train=20, num_val=6, num_aug=10, image_size=(40, 56), seed=2, classes=(1, 6, 8, 15),
            object_scale=(0.3, 0.5), plain=True)
  a, b = str(tmp_path / 'a'), str(tmp_path / 'b')
  demo_data.generate(a, **kw)
  demo_data.generate(b, **kw, empty_p=0.3)
  plan = demo_data.plan(2, 20, 6, 10, (1, 6, 8, 15), 0.3)
  empty = {i for _, i, _, p in plan if p == 0}
  assert sorted(s for _, i, s, _ in plan if i in empty) == ['aug'] * 3 + ['train'] * 6
  fa, fb = _files(a), _files(b)
  for i in _all_ids(b):
    m = voc.load_mask(os.path.join(b, 'SegmentationClassAug', i + '.png'))
    if i in empty:
      assert not m.any() and _xml_objects(b, i)[1] == []
    else:
      assert m.any() and all(fa[k] == fb[k] for k in fb if f'/{i}.' in k)
  with pytest.raises(errors.DataError, match='empty_p'):
    demo_data.generate(str(tmp_path / 'c'), **kw, empty_p=1.0)


def test_style_defaults_reproduce_the_hard_set(tmp_path):
  """Explicit default style arguments == no style arguments, byte for byte."""
  a, b = str(tmp_path / 'a'), str(tmp_path / 'b')
  demo_data.generate(a, **SMALL)
  demo_data.generate(b, **SMALL, classes=demo_data.ALL_CLASSES, object_scale=(0.15, 0.5), clutter=1.0, plain=False)
  assert _files(a) == _files(b)


@pytest.mark.parametrize('kw, match', [(dict(classes=(1, 1)), 'classes'), (dict(classes=(0, 3)), 'classes'),
                                       (dict(object_scale=(0.5, 0.2)), 'object_scale'),
                                       (dict(clutter=2.0), 'clutter')])
def test_bad_style(tmp_path, kw, match):
  with pytest.raises(errors.DataError, match=match):
    demo_data.generate(str(tmp_path / 'x'), **SMALL, **kw)


def test_bad_arguments_and_foreign_root(small, tmp_path):
  root, _ = small
  with pytest.raises(errors.DataError, match='num_val'):
    demo_data.generate(str(tmp_path / 'x'), num_val=0)
  with pytest.raises(errors.DataError, match='image_size'):
    demo_data.generate(str(tmp_path / 'x'), image_size=(128, 96))
  with pytest.raises(errors.DataError, match='JPEGImages'):   # fewer ids than already there: refuse to mix
    demo_data.generate(root, **dict(SMALL, num_train=2))


def test_cli(tmp_path):
  root = str(tmp_path / 'cli')
  cmd = [sys.executable, '-m', 'seam_jax.data.demo_data', '--root', root, '--num_train', '3', '--num_val', '2',
         '--num_aug', '1', '--seed', '5']
  r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
  assert r.returncode == 0, r.stderr
  assert 'wrote 6 images' in r.stdout and len(_all_ids(root)) == 6
  r = subprocess.run(cmd[:-4] + ['--num_val', '0'], cwd=REPO, capture_output=True, text=True, check=False)
  assert r.returncode != 0 and 'num_val' in r.stderr and 'Traceback' not in r.stderr


def test_cli_plain_style(tmp_path):
  root = str(tmp_path / 'plain')
  cmd = [sys.executable, '-m', 'seam_jax.data.demo_data', '--root', root, '--num_train', '4', '--num_val', '2',
         '--num_aug', '0', '--plain', '--classes', '2,7', '--object_scale', '0.3,0.4']
  r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
  assert r.returncode == 0, r.stderr
  seen = set()
  for i in _all_ids(root):
    seen |= {n for n, _, _ in _xml_objects(root, i)[1]}
  assert seen <= {voc.CLASSES[2], voc.CLASSES[7]} and seen
