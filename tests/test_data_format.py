"""data.format and the run's class set (issue 22): where layout.dataset / images / gt_dir come from for each format,
prepare on a VOC-layout set of other classes, and the stages' view of data without masks."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from configs import demo
from seam_jax import layout, runner, stages
from seam_jax.common.errors import DataError
from seam_jax.data import dataset_info, demo_formats, prepare


def config_at(tmp_path, **data):
  c = demo.get_config('tiny')
  c.workdir = str(tmp_path / 'run')
  c.data.update(data)
  return c


def test_voc_default_is_the_20_classes(tmp_path):
  c = config_at(tmp_path)
  assert layout.dataset(c) == dataset_info.DatasetInfo.VOC and layout.num_outputs(c) == 21
  assert layout.image_path(c, 'a') == os.path.join(layout.voc_root(c), 'JPEGImages', 'a.jpg')
  assert layout.gt_dir(c) == os.path.join(layout.voc_root(c), 'SegmentationClass')


def test_other_formats_need_prepare_first(tmp_path):
  for fmt in ('coco', 'csv'):
    c = config_at(tmp_path, format=fmt)
    with pytest.raises(DataError, match='dataset.json not found: run prepare first'):
      layout.dataset(c)
    with pytest.raises(DataError, match='image_paths.tsv not found: run prepare first'):
      layout.image_path(c, 'a')
  assert layout.gt_dir(config_at(tmp_path, format='coco')) == os.path.join(str(tmp_path / 'run'), 'gt')
  assert layout.gt_dir(config_at(tmp_path, format='csv')) == ''
  with pytest.raises(DataError, match="data.format must be one of"):
    layout.data_format(config_at(tmp_path, format='yolo'))


def test_missing_annotation_fields_are_one_line(tmp_path):
  with pytest.raises(DataError, match='config.data.train_annotations is empty'):
    prepare.prepare(config_at(tmp_path, format='coco'))
  with pytest.raises(DataError, match='data.format coco takes the classes from the JSON'):
    prepare.prepare(config_at(tmp_path, format='coco', train_annotations='x.json', image_dir='x', classes=('a',)))


def test_voc_layout_of_other_classes(tiny_demo, tmp_path):
  """data.classes on a VOC-layout set: the XML names give K-wide labels in the given order, and a mask whose values
  exceed K is one line naming the file (its values would be scored as other classes)."""
  names = ('person', 'aeroplane', 'cat', 'bus', 'dog')
  c = config_at(tmp_path, voc_root=layout.voc_root(tiny_demo), label_source='xml', classes=names)
  info = layout.configured_dataset(c)
  assert info.classes == names and info.num_classes == 5
  voc = np.load(layout.cls_labels(tiny_demo), allow_pickle=True).item()
  index = [demo_formats.voc.CLASSES.index(n) - 1 for n in names]
  for i in layout.read_ids(tiny_demo, 'train'):
    ours = prepare.xml_label(prepare.voc_path(layout.voc_root(c), 'Annotations', i), info.classes)
    assert np.array_equal(ours, voc[i][index]), i
  with pytest.raises(DataError, match=r'mask .*SegmentationClass.*has values outside 0/1/2/3/4/5/255'):
    prepare.prepare(c, workers=1)
  assert not os.path.exists(layout.dataset_file(c))


def test_csv_data_skips_evaluation_with_a_line(tmp_path, capsys):
  """On data without masks the eval stages say why they do not run; status lists them as skipped."""
  p = demo_formats.generate(str(tmp_path / 'user'), num_train=4, num_val=2, num_aug=0, image_size=(48, 64))
  c = config_at(tmp_path, format='csv', train_annotations=p['train_csv'], val_annotations=p['val_csv'],
                image_dir=p['image_dir'])
  assert 'demo' not in stages.select('all', c)
  prepare.prepare(c, workers=1)
  classes = layout.dataset(c).classes   # the sorted names the CSVs hold
  assert classes == tuple(sorted(classes)) and set(classes) <= set(demo_formats.CLASSES)
  records = runner.run_stages(c, ['eval_cam', 'eval_rw'])
  assert [r['status'] for r in records] == ['skipped', 'skipped']
  out = capsys.readouterr().out
  assert 'eval_cam: skipped: no ground truth' in out and 'eval_rw: skipped: no ground truth' in out
  assert not os.path.exists(layout.eval_dir(c))
  assert runner.status_lines(c, ['eval_cam'])[0].startswith('eval_cam: skipped (no ground truth')
  # and the user's folders are protected during the run
  assert {p['train_csv'], p['val_csv'], p['image_dir']} <= set(runner.user_data(c))
  shutil.rmtree(tmp_path / 'user')


def test_status_command_names_the_skipped_evaluations(tmp_path):
  """`python -m seam_jax status` on a CSV config before any run: every stage missing, evaluations skipped (why)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, '-m', 'seam_jax', 'status', f'--config={root}/configs/demo.py:tiny',
                         f'--config.workdir={tmp_path}', '--config.data.format=csv'], cwd=root,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = dict(l.split(': ', 1) for l in proc.stdout.splitlines() if ': ' in l)
  assert lines['prepare'] == 'missing' and lines['train'].startswith('missing')
  assert all(lines[n].startswith('skipped (no ground truth') for n in ('eval_cam', 'eval_crf', 'eval_rw', 'eval_seg'))


def test_a_described_class_set_of_your_own(tmp_path):
  """data.dataset_file: a dataset.json of the user's (names, ignore label, palette) describes a CSV set; the run's
  dataset.json carries it, and giving data.classes as well is one line."""
  p = demo_formats.generate(str(tmp_path / 'user'), num_train=4, num_val=2, num_aug=0, image_size=(48, 64))
  mine = dataset_info.DatasetInfo('shapes', list(demo_formats.CLASSES), ignore_label=254,
                                  palette=[[0, 0, 0]] + [[10 * k, 20 * k, 30 * k] for k in range(1, 8)])
  described = mine.write(str(tmp_path / 'user'))
  c = config_at(tmp_path, format='csv', train_annotations=p['train_csv'], image_dir=p['image_dir'],
                dataset_file=described)
  prepare.prepare(c, workers=1)
  assert layout.dataset(c) == mine and described in runner.user_data(c)
  assert layout.dataset(c).palette_array()[3].tolist() == [30, 60, 90]
  c.data.classes = ('a', 'b')
  with pytest.raises(DataError, match='data.classes and config.data.dataset_file are both set'):
    prepare.prepare(c, workers=1)
