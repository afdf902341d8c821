"""tfds packaging (requirements-tfds.txt, part of requirements-dev.txt): the built ArrayRecord data yields the
records of VOCClsSource."""
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import demo as demo_config
from seam_jax.data import demo_data
from seam_jax.data import input_pipeline as ip
from seam_jax.data import prepare
from seam_jax.data import tfds_voc12aug
from seam_jax.data import voc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  out = tmp_path_factory.mktemp('tfds')
  c = demo_config.get_config()
  c.data.voc_root, c.data.list_dir = str(out / 'VOC2012'), str(out / 'lists')
  c.data.cls_labels = str(out / 'lists' / 'cls_labels.npy')
  c.data.crop_size, c.data.resize_long = 48, (40, 64)
  demo_data.generate(c.data.voc_root, num_train=12, num_val=4, num_aug=4, image_size=(40, 56), seed=3)
  prepare.prepare(c)
  data_dir = str(out / 'tfds_data')
  tfds_voc12aug.build(c, data_dir)
  return c, data_dir


@pytest.mark.parametrize('split', tfds_voc12aug.SPLITS)
def test_records_match_voc_source(built, split):
  c, data_dir = built
  ids = voc.read_list(os.path.join(c.data.list_dir, split + '.txt'))
  ref = ip.VOCClsSource(c.data.voc_root, ids, voc.labels_for(ids, voc.load_cls_labels(c.data.cls_labels)))
  ref_by_id = {ref[i]['id']: ref[i] for i in range(len(ref))}
  src = tfds_voc12aug.TfdsClsSource(data_dir, split)
  assert len(src) == len(ids)
  got = [src[i] for i in range(len(src))]
  assert sorted(r['id'] for r in got) == sorted(ids)
  for r in got:
    e = ref_by_id[r['id']]
    assert r['image'].dtype == np.uint8 and r['label'].dtype == np.float32
    np.testing.assert_array_equal(r['image'], e['image'])
    np.testing.assert_array_equal(r['label'], e['label'])


def test_training_batches_from_tfds(built):
  c, data_dir = built
  src = tfds_voc12aug.TfdsClsSource(data_dir, 'train_aug')
  loader = ip.make_loader(src, ip.SeamAugment.from_config(c.data), global_batch_size=4, seed=0)
  it = iter(loader)
  b = next(it)
  assert b['image'].shape == (4, 48, 48, 3) and b['label'].shape == (4, 20)
  state = it.get_state()
  expected = next(it)
  it2 = iter(ip.make_loader(src, ip.SeamAugment.from_config(c.data), global_batch_size=4, seed=0))
  it2.set_state(state)
  np.testing.assert_array_equal(next(it2)['image'], expected['image'])


def test_rebuild_reuses_and_library_does_not_import_tensorflow(built):
  c, data_dir = built
  assert tfds_voc12aug.build(c, data_dir).info.splits['train_aug'].num_examples == 16
  code = ('import sys; from seam_jax.data import voc, augment, input_pipeline, prepare, demo_data; '
          'print(sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "tensorflow_datasets")))')
  r = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr
  assert r.stdout.strip() == '[]'
