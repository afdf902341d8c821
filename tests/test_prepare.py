"""Data preparation: lists, labels from XML / masks, file checks and the prepare.py entry point."""
import os
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
from PIL import Image
import pytest

from configs import demo as demo_config
from seam_jax.common import errors
from seam_jax.data import demo_data
from seam_jax.data import prepare
from seam_jax.data import voc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def demo_root(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('demo') / 'VOC2012')
  demo_data.generate(root, num_train=12, num_val=6, num_aug=6, image_size=(40, 56), seed=1)
  return root


@pytest.fixture
def voc_copy(demo_root, tmp_path):
  """A private, editable copy of the demo set."""
  root = str(tmp_path / 'VOC2012')
  shutil.copytree(demo_root, root)
  return root


def data_config(voc_root, out_dir, **kw):
  d = ml_collections.ConfigDict(dict(format='voc', classes=(), dataset_file='', voc_root=voc_root, sbd_root='',
                                     list_dir=str(out_dir / 'lists'),
                                     cls_labels=str(out_dir / 'lists' / 'cls_labels.npy'), label_source='masks',
                                     on_error='raise'))
  d.update(kw)
  return d


def full(data):
  """A run config around data fields (prepare reads its paths through seam_jax.layout)."""
  return ml_collections.ConfigDict({'workdir': '', 'data': data})


def seg_list(root, name):
  return voc.read_list(os.path.join(root, 'ImageSets', 'Segmentation', name + '.txt'))


def aug_ids(root):
  return sorted(f[:-4] for f in os.listdir(os.path.join(root, 'SegmentationClassAug')))


def written(d):
  lists = {n: voc.read_list(os.path.join(d.list_dir, n + '.txt')) for n in prepare.LIST_NAMES}
  return lists, voc.load_cls_labels(d.cls_labels)


def test_lists_and_mask_labels(demo_root, tmp_path):
  d = data_config(demo_root, tmp_path)
  summary = prepare.prepare(full(d))
  lists, labels = written(d)
  train, val = seg_list(demo_root, 'train'), seg_list(demo_root, 'val')
  assert lists['train'] == train and lists['val'] == val and lists['trainval'] == train + val
  assert lists['train_aug'] == sorted(set(aug_ids(demo_root)) - set(val))   # aug masks cover train + val + aug
  assert len(lists['train_aug']) == 12 + 6 and not set(lists['train_aug']) & set(val)
  assert set(train) <= set(lists['train_aug'])
  assert summary['lists'] == {'train_aug': 18, 'train': 12, 'val': 6, 'trainval': 18} and summary['skipped'] == []
  assert set(labels) == set(lists['train_aug']) | set(val)
  for i in lists['train_aug'][:5] + val[:2]:   # classes present in the mask, 0 and 255 excluded
    m = np.asarray(Image.open(os.path.join(demo_root, 'SegmentationClassAug', i + '.png')))
    expected = np.zeros(20, np.float32)
    expected[[c - 1 for c in np.unique(m) if 0 < c < 255]] = 1
    assert labels[i].dtype == np.float32 and labels[i].shape == (20,)
    np.testing.assert_array_equal(labels[i], expected)
  assert summary['label_mismatch'] == []        # the demo set's XML and masks agree


def test_xml_label_every_object_name(tmp_path):
  p = tmp_path / 'a.xml'
  p.write_text('<annotation><filename>a.jpg</filename>'
               '<object><name>dog</name><difficult>0</difficult></object>'
               '<object><name>person</name><difficult>1</difficult>'
               '<part><name>head</name></part></object>'
               '<object><name> tvmonitor </name></object></annotation>')
  expected = np.zeros(20, np.float32)
  expected[[11, 14, 19]] = 1                    # dog, person (difficult counts), tvmonitor; part names ignored
  np.testing.assert_array_equal(prepare.xml_label(str(p)), expected)
  (tmp_path / 'b.xml').write_text('<annotation><object><name>dog</name></annotation>')
  with pytest.raises(errors.DataError, match='b.xml'):
    prepare.xml_label(str(tmp_path / 'b.xml'))


def test_xml_source_and_mismatch_report(voc_copy, tmp_path):
  target = seg_list(voc_copy, 'train')[0]
  ann = os.path.join(voc_copy, 'Annotations', target + '.xml')
  text = open(ann).read()
  extra = 'sheep' if '<name>sheep</name>' not in text else 'boat'
  with open(ann, 'w') as f:
    f.write(text.replace('</annotation>', f'<object><name>{extra}</name></object></annotation>'))
  d = data_config(voc_copy, tmp_path, label_source='xml')
  summary = prepare.prepare(full(d))
  _, labels = written(d)
  assert summary['label_mismatch'] == [target]
  assert labels[target][voc.CLASSES.index(extra) - 1] == 1
  d_masks = data_config(voc_copy, tmp_path / 'm')
  prepare.prepare(full(d_masks))
  _, mask_labels = written(d_masks)
  assert mask_labels[target][voc.CLASSES.index(extra) - 1] == 0
  assert all(np.array_equal(labels[i], mask_labels[i]) for i in labels if i != target)


def test_sbd_lists(demo_root, tmp_path):
  train, val = seg_list(demo_root, 'train'), seg_list(demo_root, 'val')
  extra = sorted(set(aug_ids(demo_root)) - set(train) - set(val))
  sbd = tmp_path / 'sbd'
  sbd.mkdir()
  (sbd / 'train.txt').write_text('\n'.join(extra[:2] + val[:1]) + '\n')   # a val id in SBD is removed
  (sbd / 'val.txt').write_text('\n'.join(extra[2:3] + train[:2]) + '\n')
  d = data_config(demo_root, tmp_path, sbd_root=str(sbd), label_source='xml')
  prepare.prepare(full(d))
  lists, labels = written(d)
  assert lists['train_aug'] == sorted(set(extra[:3]) | set(train))
  assert set(labels) == set(lists['train_aug']) | set(val)


@pytest.mark.parametrize('damage,label_source,file_part', [
    ('corrupt_jpg', 'masks', 'JPEGImages'),
    ('missing_jpg', 'masks', 'JPEGImages'),
    ('mask_value', 'masks', 'SegmentationClassAug'),
    ('voc_mask_value', 'xml', 'SegmentationClass/'),
    ('missing_xml', 'xml', 'Annotations'),
    ('missing_aug_mask', 'masks', 'SegmentationClassAug'),
])
def test_bad_files_raise_or_skip(voc_copy, tmp_path, damage, label_source, file_part):
  victim = seg_list(voc_copy, 'train')[1]
  path = {'corrupt_jpg': ('JPEGImages', '.jpg'), 'missing_jpg': ('JPEGImages', '.jpg'),
          'mask_value': ('SegmentationClassAug', '.png'), 'voc_mask_value': ('SegmentationClass', '.png'),
          'missing_xml': ('Annotations', '.xml'), 'missing_aug_mask': ('SegmentationClassAug', '.png')}[damage]
  path = os.path.join(voc_copy, path[0], victim + path[1])
  if damage.startswith('missing'):
    os.remove(path)
  elif damage == 'corrupt_jpg':
    with open(path, 'wb') as f:
      f.write(b'\xff\xd8\xff\xe0 not really a jpeg')
  else:
    m = np.asarray(Image.open(path)).copy()
    m[0, 0] = 30
    Image.fromarray(m).save(path)
  d = data_config(voc_copy, tmp_path, label_source=label_source)
  with pytest.raises(errors.DataError, match=f'{file_part}.*{victim}'):
    prepare.prepare(full(d))
  assert not os.path.exists(d.cls_labels)      # nothing half-written
  d.on_error = 'skip'
  summary = prepare.prepare(full(d))
  lists, labels = written(d)
  assert summary['skipped'] == [victim]
  assert victim not in labels and all(victim not in l for l in lists.values())
  assert len(lists['train']) == 11 and len(lists['train_aug']) == 17


def test_bad_config_values(voc_copy, tmp_path):
  with pytest.raises(errors.DataError, match='label_source'):
    prepare.prepare(full(data_config(voc_copy, tmp_path, label_source='json')))
  with pytest.raises(errors.DataError, match='nosbd/train.txt'):
    prepare.prepare(full(data_config(voc_copy, tmp_path, sbd_root=str(tmp_path / 'nosbd'))))
  with pytest.raises(errors.DataError, match='list file not found: .*nowhere/ImageSets/Segmentation/train.txt'):
    prepare.prepare(full(data_config(str(tmp_path / 'nowhere'), tmp_path)))
  shutil.rmtree(os.path.join(voc_copy, 'SegmentationClassAug'))
  with pytest.raises(errors.DataError, match='SegmentationClassAug does not exist and config.data.sbd_root'):
    prepare.prepare(full(data_config(voc_copy, tmp_path)))


def test_process_pool_same_output(demo_root, tmp_path):
  d0, d2 = data_config(demo_root, tmp_path / 'a'), data_config(demo_root, tmp_path / 'b')
  prepare.prepare(full(d0), workers=0)
  prepare.prepare(full(d2), workers=2)
  (l0, c0), (l2, c2) = written(d0), written(d2)
  assert l0 == l2 and c0.keys() == c2.keys() and all(np.array_equal(c0[k], c2[k]) for k in c0)


def test_make_demo_requires_demo_fields(tmp_path):
  from configs import voc12
  with pytest.raises(errors.DataError, match='demo'):
    prepare.make_demo(voc12.get_config())
  c = demo_config.get_config()
  c.data.voc_root = str(tmp_path / 'VOC2012')
  os.makedirs(os.path.join(c.data.voc_root, 'ImageSets', 'Segmentation'))
  for n in ('train', 'val'):
    open(os.path.join(c.data.voc_root, 'ImageSets', 'Segmentation', n + '.txt'), 'w').close()
  with pytest.raises(errors.DataError, match='did not generate'):   # a folder the demo did not make: never touched
    prepare.make_demo(c)
  open(os.path.join(c.data.voc_root, prepare.DEMO_MARKER), 'w').close()
  assert prepare.make_demo(c) is None          # its own, already there: not regenerated
  assert not os.path.exists(os.path.join(c.data.voc_root, 'JPEGImages'))


def run_entry(tmp_path, *args):
  out = tmp_path / 'work'
  cmd = [sys.executable, 'prepare.py', '--config=configs/demo.py', '--workers=1',
         f'--config.data.voc_root={out}/VOC2012', f'--config.data.list_dir={out}/lists',
         f'--config.data.cls_labels={out}/lists/cls_labels.npy', '--config.demo.num_train=8',
         '--config.demo.num_val=4', '--config.demo.num_aug=4', '--config.demo.image_size=(40,48)', *args]
  return out, subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                             timeout=120)


def test_entry_point_demo_then_clean_error(tmp_path):
  out, r = run_entry(tmp_path, '--demo')
  assert r.returncode == 0, r.stderr
  assert 'train_aug 12 ids, train 8 ids, val 4 ids' in r.stderr
  assert len(voc.read_list(str(out / 'lists' / 'train_aug.txt'))) == 12
  victim = voc.read_list(str(out / 'lists' / 'train.txt'))[0]
  os.remove(out / 'VOC2012' / 'JPEGImages' / f'{victim}.jpg')
  _, r = run_entry(tmp_path, '--demo')          # demo set present: not regenerated, the missing image is found
  assert r.returncode != 0 and '] demo: skipped: outputs complete' in r.stdout
  assert '] prepare: started (input ' in r.stdout    # the data folder changed: lists and labels are remade
  assert f'JPEGImages/{victim}.jpg' in r.stderr and 'Traceback' not in r.stderr
