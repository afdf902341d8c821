"""grain input pipeline: sources, epoch/shard semantics, exact resume (get/set_state and orbax), inference views."""
import os

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from PIL import Image
import pytest

from configs import demo as demo_config
from seam_jax.common import errors, files
from seam_jax.data import demo_data
from seam_jax.data import device_augment
from seam_jax.data import input_pipeline as ip
from seam_jax.data import prepare
from seam_jax.data import voc


@pytest.fixture(scope='module')
def demo(tmp_path_factory):
  """A small prepared demo set and a config pointing at it (train list: 16 ids)."""
  out = tmp_path_factory.mktemp('demo')
  c = demo_config.get_config()
  c.data.voc_root, c.data.list_dir = str(out / 'VOC2012'), str(out / 'lists')
  c.data.cls_labels = str(out / 'lists' / 'cls_labels.npy')
  c.data.train_list = 'train'
  c.data.crop_size, c.data.resize_long = 48, (40, 64)
  c.train.batch_size = 4
  c.data.device_augment = False     # the host path; test_device_augment_loader covers the other
  demo_data.generate(c.data.voc_root, num_train=16, num_val=4, num_aug=4, image_size=(40, 56), seed=2)
  prepare.prepare(c)
  return c


class RangeSource:
  """n records {'key': i}: makes the sampling order visible."""

  def __init__(self, n):
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return {'key': np.int64(i)}

  def __repr__(self):
    return f'RangeSource({self.n})'


def key_and_draw(record, rng):
  return {'key': record['key'], 'draw': np.float64(rng.random())}


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_source_records_and_errors(demo, tmp_path):
  d = demo.data
  ids = voc.read_list(os.path.join(d.list_dir, 'train.txt'))
  labels = voc.labels_for(ids, voc.load_cls_labels(d.cls_labels))
  src = ip.VOCClsSource(d.voc_root, ids, labels)
  r = src[3]
  assert len(src) == 16 and r['id'] == ids[3]
  np.testing.assert_array_equal(r['image'], np.asarray(Image.open(ip.image_path(d.voc_root, ids[3])).convert('RGB')))
  assert r['image'].dtype == np.uint8 and r['label'].dtype == np.float32
  np.testing.assert_array_equal(r['label'], labels[3])
  bad = ip.VOCClsSource(d.voc_root, ['nope'] + ids[:1], labels[:2])
  with pytest.raises(errors.DataError, match='JPEGImages/nope.jpg'):
    bad[0]  # pylint: disable=pointless-statement
  skip = ip.VOCClsSource(d.voc_root, ['nope'] + ids[:1], labels[:2], on_error='skip')
  assert skip[0] is None and skip.skipped == 1 and skip[1]['id'] == ids[0]
  with pytest.raises(ValueError, match='on_error'):
    ip.VOCClsSource(d.voc_root, ids, labels, on_error='ignore')


def test_epochs_are_permutations_with_drop_last_and_rng_from_index():
  loader = ip.make_loader(RangeSource(10), key_and_draw, global_batch_size=4, seed=3)
  batches = take(iter(loader), 6)                 # 2 whole batches per epoch (10 // 4), 3 epochs
  keys = np.stack([b['key'] for b in batches])
  assert keys.shape == (6, 4)
  epochs = keys.reshape(3, 8)
  for e in epochs:
    assert len(set(e.tolist())) == 8              # no repeats inside an epoch, 2 records left out
  assert len({tuple(e) for e in epochs}) == 3     # reshuffled every epoch
  draws = np.concatenate([b['draw'] for b in batches])
  np.testing.assert_array_equal(draws, [np.random.default_rng((3, k)).random() for k in range(24)])
  other = take(iter(ip.make_loader(RangeSource(10), key_and_draw, global_batch_size=4, seed=4)), 2)
  assert not np.array_equal(np.stack([b['key'] for b in other]), keys[:2])
  ordered = take(iter(ip.make_loader(RangeSource(10), key_and_draw, global_batch_size=4, seed=3,
                                     shuffle=False, num_epochs=1, drop_remainder=False)), 3)
  assert [b['key'].tolist() for b in ordered] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_too_few_records_and_bad_batch(monkeypatch):
  with pytest.raises(errors.DataError, match='fewer than one global batch'):
    ip.make_loader(RangeSource(3), key_and_draw, global_batch_size=4, seed=0)
  monkeypatch.setattr(jax, 'process_count', lambda: 3)
  with pytest.raises(ValueError, match='divisible'):
    ip.make_loader(RangeSource(30), key_and_draw, global_batch_size=4, seed=0)


def test_process_sharding_splits_the_global_batch(monkeypatch):
  whole = take(iter(ip.make_loader(RangeSource(20), key_and_draw, global_batch_size=8, seed=5)), 3)
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  for p in range(2):
    monkeypatch.setattr(jax, 'process_index', lambda p=p: p)
    local = take(iter(ip.make_loader(RangeSource(20), key_and_draw, global_batch_size=8, seed=5)), 3)
    for w, l in zip(whole, local):              # process p holds rows [4 p, 4 p + 4) of the global batch
      np.testing.assert_array_equal(l['key'], w['key'][4 * p:4 * p + 4])
      np.testing.assert_array_equal(l['draw'], w['draw'][4 * p:4 * p + 4])


def test_seam_loader_batches(demo):
  loader, n = ip.seam_train_loader(demo)
  assert n == 16
  b = next(iter(loader))
  assert b['image'].shape == (4, 48, 48, 3) and b['image'].dtype == np.float32
  assert b['label'].shape == (4, 20) and b['label'].dtype == np.float32
  assert set(b) == {'image', 'label'}
  assert np.all(b['label'].sum(1) >= 1)           # every demo image holds an object
  again = next(iter(ip.seam_train_loader(demo)[0]))
  assert_batches_equal([b], [again])
  other = next(iter(ip.seam_train_loader(demo, seed=1)[0]))
  assert not np.array_equal(b['image'], other['image'])


def test_device_augment_loader(demo):
  """device_augment batches hold uint8 canvases and the draws; finished on the device they are the host batches."""
  c = demo.copy_and_resolve_references()
  c.data.device_augment = True
  c.data.jitter = (0.3, 0.3, 0.3, 0.1)
  host = take(iter(ip.seam_train_loader(_host(c))[0]), 2)
  batches = take(iter(ip.seam_train_loader(c)[0]), 2)
  side = c.data.resize_long[1]
  for b, h in zip(batches, host):
    assert set(b) == set(device_augment.KEYS) | {'label'} and 'image' not in b
    assert b['canvas'].shape == (4, side, side, 3) and b['canvas'].dtype == np.uint8
    np.testing.assert_array_equal(b['label'], h['label'])
    np.testing.assert_array_equal(device_augment.batch_images(b, c.data.crop_size), h['image'])


def _host(config):
  c = config.copy_and_resolve_references()
  c.data.device_augment = False
  return c


def test_state_restore_is_exact(demo):
  it = iter(ip.seam_train_loader(demo)[0])
  take(it, 3)
  state = it.get_state()
  expected = take(it, 6)                          # crosses the epoch boundary (4 batches per epoch)
  it2 = iter(ip.seam_train_loader(demo)[0])
  it2.set_state(state)
  assert_batches_equal(take(it2, 6), expected)


def test_orbax_round_trip(demo, tmp_path):
  it = iter(ip.seam_train_loader(demo)[0])
  take(it, 2)
  with ocp.CheckpointManager(tmp_path / 'ckpt') as mngr:
    mngr.save(7, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
  expected = take(it, 3)
  fresh = iter(ip.seam_train_loader(demo)[0])
  with ocp.CheckpointManager(tmp_path / 'ckpt') as mngr:
    assert mngr.latest_step() == 7
    restored = mngr.restore(7, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  assert_batches_equal(take(restored.data, 3), expected)


@pytest.mark.slow
def test_worker_processes_give_the_same_stream_and_resume(demo):
  expected = take(iter(ip.seam_train_loader(demo)[0]), 5)
  demo_w = demo.copy_and_resolve_references()
  demo_w.data.num_workers = 2
  it = iter(ip.seam_train_loader(demo_w)[0])
  assert_batches_equal(take(it, 3), expected[:3])
  state = it.get_state()
  it.close()
  it = iter(ip.seam_train_loader(demo_w)[0])
  it.set_state(state)
  assert_batches_equal(take(it, 2), expected[3:])
  it.close()


def test_missing_labels_and_bad_images(demo, tmp_path):
  c = demo.copy_and_resolve_references()
  labels = voc.load_cls_labels(c.data.cls_labels)
  ids = voc.read_list(os.path.join(c.data.list_dir, 'train.txt'))
  del labels[ids[0]]
  c.data.cls_labels = str(tmp_path / 'labels.npy')
  files.save_npy_dict(c.data.cls_labels, labels)
  with pytest.raises(errors.DataError, match='labels.npy'):
    ip.seam_train_loader(c)
  c.data.on_error = 'skip'
  assert ip.seam_train_loader(c)[1] == 15
  c.data.on_error = 'raise'
  c.data.train_list = str(tmp_path / 'list.txt')
  voc.write_list(c.data.train_list, ids[1:] + ['2099_000001'])   # 16 ids = 4 whole batches: all read in epoch 0
  c.data.cls_labels = str(tmp_path / 'l2.npy')
  files.save_npy_dict(c.data.cls_labels, {**labels, '2099_000001': np.ones(20, np.float32)})
  with pytest.raises(errors.DataError, match='JPEGImages/2099_000001.jpg'):
    take(iter(ip.seam_train_loader(c)[0]), 4)
  c.data.on_error = 'skip'
  batches = take(iter(ip.seam_train_loader(c)[0]), 4)
  assert all(b['image'].shape == (4, 48, 48, 3) for b in batches)   # replaced by the next readable record
  assert not any(np.all(b['label'] == 1, axis=1).any() for b in batches)   # never the bad id's label


def test_inference_views():
  img = np.random.default_rng(0).integers(0, 256, (37, 50, 3), dtype=np.uint8)
  views = ip.inference_views(img, (0.5, 1.0, 1.5), flip=True)
  assert [(v.shape[:2], f, s) for v, f, s in views] == [
      ((18, 25), False, 0.5), ((18, 25), True, 0.5),     # round(18.5) = 18 (Python round, as the original)
      ((37, 50), False, 1.0), ((37, 50), True, 1.0),
      ((56, 75), False, 1.5), ((56, 75), True, 1.5)]     # round(55.5) = 56
  ref = voc.normalize(Image.fromarray(img).resize((75, 56), Image.Resampling.BICUBIC))
  np.testing.assert_array_equal(views[4][0], ref)
  np.testing.assert_array_equal(views[5][0], ref[:, ::-1])
  np.testing.assert_array_equal(views[2][0], voc.normalize(img))
  assert all(v.dtype == np.float32 for v, _, _ in views)
  assert len(ip.inference_views(img, (1.0, 2.0), flip=False)) == 2


def test_iterate_images(demo):
  ids = voc.read_list(os.path.join(demo.data.list_dir, 'val.txt'))
  got = list(ip.iterate_images(demo.data.voc_root, ids, prefetch=2))
  assert [i for i, _ in got] == ids
  for i, im in got:
    np.testing.assert_array_equal(im, files.load_image(ip.image_path(demo.data.voc_root, i)))
  with pytest.raises(errors.DataError, match='JPEGImages/missing.jpg'):
    list(ip.iterate_images(demo.data.voc_root, ids[:1] + ['missing']))
