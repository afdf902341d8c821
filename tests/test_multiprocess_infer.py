"""The inference-type stages over 2 processes (jax.distributed on 127.0.0.1, 4 CPU devices each) against 1 process:
CAM inference, CRF, random walk, segmentation test, predict and evaluation write the same files with the same values
and the same results.json numbers; a restart with some outputs deleted redoes exactly those (one process then has
no work)."""
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from configs import demo
from seam_jax import layout, models
from seam_jax.common import distributed, errors, files, per_image
from seam_jax.data import demo_data, prepare, voc
from seam_jax.models import export

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 900

# Each process: jax.distributed (when several), then the stages in pipeline order through the library, then one
# line `RESULT {json}` with its CAM-inference stats and wall time.
WORKER = r'''
import json, os, sys, time
args = json.loads(sys.argv[1])
from seam_jax.common import distributed
if args['num_processes'] > 1:
  distributed.initialize(args['coordinator'], args['num_processes'], args['process_id'])
from configs import demo
from seam_jax import layout
from seam_jax.infer import cam_inference, crf, evaluation, predict, random_walk, seg_inference
config = demo.get_config()
for key, value in args['overrides'].items():
  *path, leaf = key.split('.')
  node = config
  for p in path:
    node = node[p]
  node[leaf] = tuple(value) if isinstance(value, list) else value
t0 = time.time()
cam_stats = cam_inference.run_inference(config)
cam_seconds = time.time() - t0
crf.run_crf(config)
random_walk.run(config)
seg_stats = seg_inference.run_test(config)
written = predict.run_predict(config, [os.path.join(layout.voc_root(config), 'JPEGImages')])['written']
for name, pred_dir, pred_type in (('cam', layout.cam_dir(config), 'npy'), ('crf', layout.crf_dir(config, 4.0), 'crf'),
                                  ('rw', layout.rw_dir(config), 'png'), ('seg', layout.seg_pred_dir(config), 'png')):
  c = config.copy_and_resolve_references()
  c.eval.pred_dir, c.eval.pred_type, c.eval.out_dir = pred_dir, pred_type, layout.eval_dir(config, name)
  evaluation.evaluate(c)
print('RESULT ' + json.dumps({'cam_seconds': cam_seconds, 'cam_images': cam_stats['images'],
                              'seg_images': seg_stats['images'], 'predicted': len(written)}), flush=True)
'''


def random_variables(model, seed):
  """Random weights from shapes (no compiled init): He-normal kernels, BatchNorm statistics near identity."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  rng = np.random.default_rng(seed)

  def draw(path, s):
    if path[-1].key == 'kernel':
      return rng.normal(0, np.sqrt(2 / np.prod(s.shape[:-1])), s.shape).astype(np.float32)
    return rng.uniform(0.8, 1.2, s.shape).astype(np.float32) if path[-1].key in ('scale', 'var') else \
        rng.normal(0, 0.1, s.shape).astype(np.float32)
  return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  """A tiny demo set with its lists, and random SEAM / AffinityNet / DeepLab exports: the config overrides every
  run shares."""
  tmp = tmp_path_factory.mktemp('mp')
  config = demo.get_config()
  config.workdir = str(tmp)
  config.model.width_div = 32
  demo_data.generate(layout.voc_root(config), num_train=8, num_val=1, num_aug=0, image_size=(44, 60), seed=0,
                     workers=1, classes=config.demo.classes, plain=True)
  prepare.prepare(config, workers=1)
  for kind, seed in (('seam', 0), ('affinity', 1), ('deeplab', 2)):
    export.save_export(str(tmp / f'{kind}_export'), random_variables(models.build(kind, config.model), seed), kind,
                       config.model)
  return tmp, {'data.voc_root': layout.voc_root(config), 'data.list_dir': layout.list_dir(config),
               'model.width_div': 32, 'infer.checkpoint': str(tmp / 'seam_export'),
               'rw.checkpoint': str(tmp / 'affinity_export'), 'infer.scales': [1.0], 'infer.batch_size': 4,
               'infer.threads': 1, 'infer.crf_workers': 1, 'eval.workers': 1, 'rw.workers': 1, 'rw.batch_size': 4,
               'rw.save_scores': True, 'infer.list': 'train', 'rw.list': 'train', 'eval.list': 'train',
               'infer.crf_alphas': [4.0, 24.0],
               'seg.checkpoint': str(tmp / 'deeplab_export'), 'seg.test_list': 'train',
               'seg.scales': [1.0], 'seg.test_batch_size': 4, 'seg.threads': 1}


def run_processes(overrides, num_processes):
  """Launch the worker in `num_processes` processes; returns their RESULT dicts (process order)."""
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=4')
  runs = distributed.launch_local(lambda p, coordinator: [sys.executable, '-c', WORKER, json.dumps(
      {'coordinator': coordinator, 'num_processes': num_processes, 'process_id': p, 'overrides': overrides})],
                                  num_processes, env, ROOT, TIMEOUT_S)
  for code, out in runs:
    assert code == 0, out[-3000:]
  return [json.loads(next(l for l in out.splitlines() if l.startswith('RESULT '))[7:]) for _, out in runs]


def outputs(workdir):
  """Relative paths of every file a run wrote under its workdir."""
  return sorted(os.path.relpath(os.path.join(d, f), workdir) for d, _, fs in os.walk(workdir) for f in fs)


# Tolerance of the CAM and CRF values. Every network row is computed bitwise alike in both runs: one view per
# device per step (infer.batch_size = 4 = the devices of each process), so each device runs the same compiled
# program (one per padded shape) on the same input, whatever else is in the batch; the random walk's AffinityNet
# rows likewise. Only the host's float32 post-processing could add terms in another order (BLAS blocking of the
# merge's interpolation products): a CAM value sums at most 2 views x 4 x 4 interpolation taps, and reordering a
# K-term float32 sum moves it by at most K * u * sum|terms| (u = 2^-24) <= 32 u of the class range; the per-class
# normalisation (s - min) / (max - min) at most doubles that: 64 u on values in [0, 1]. The CRF maps are a
# deterministic function of the image and these CAMs and are held to the same bound.
TOL = 64 * 2.0 ** -24


def assert_same_outputs(one, two, names):
  for rel in names:
    a, b = os.path.join(one, rel), os.path.join(two, rel)
    if rel.endswith('.npy'):
      da, db = files.load_npy_dict(a), files.load_npy_dict(b)
      assert list(da) == list(db), rel
      for k in da:
        np.testing.assert_allclose(db[k], da[k], rtol=0, atol=TOL, err_msg=f'{rel} key {k}')
    elif rel.endswith('.png'):   # random walk, seg test and predict labels (and overlays)
      np.testing.assert_array_equal(np.asarray(Image.open(b)), np.asarray(Image.open(a)), err_msg=rel)
    elif rel.endswith('results.json'):
      ra, rb = (json.load(open(p)) for p in (a, b))
      for k in ('pred_dir', 'gt_dir'):  # the paths of the two runs
        ra.pop(k), rb.pop(k)
      assert ra == rb, rel


@pytest.mark.slow
def test_two_processes_equal_one(data):
  tmp, overrides = data
  one, two = str(tmp / 'one'), str(tmp / 'two')
  t = time.time()
  [single] = run_processes(dict(overrides, workdir=one), 1)
  wall_one = time.time() - t
  t = time.time()
  pair = run_processes(dict(overrides, workdir=two), 2)
  wall_two = time.time() - t
  names = outputs(one)
  assert outputs(two) == names
  ids = voc.read_list(os.path.join(overrides['data.list_dir'], 'train.txt'))
  images = sorted(os.path.splitext(f)[0] for f in os.listdir(os.path.join(overrides['data.voc_root'], 'JPEGImages')))
  expected = ({f'{d}/{i}.npy' for d in ('cam', 'crf_4.0', 'crf_24.0', 'rw') for i in ids} |
              {f'{d}/{i}.png' for d in ('rw', 'seg_pred') for i in ids} |
              {f'predict/{i}{s}.png' for i in images for s in ('', '_overlay')} | {'predict/legend.png'})
  assert expected <= set(names) and all(n in expected or n.startswith('eval/') for n in names)
  assert {f'eval/{k}/results.json' for k in ('cam', 'crf', 'rw', 'seg')} <= set(names)
  for key, n in (('cam_images', len(ids)), ('seg_images', len(ids)), ('predicted', len(images))):  # disjoint shares
    assert single[key] == n and sorted(r[key] for r in pair) == [n // 2, n - n // 2], key
  assert_same_outputs(one, two, names)
  print(f'\nCAM inference (incl. compilation), 8 images, 4 CPU devices per process: 1 process '
        f'{single["cam_seconds"]:.1f} s; 2 processes {max(r["cam_seconds"] for r in pair):.1f} s '
        f'(slowest process); whole worker runs {wall_one:.1f} s vs {wall_two:.1f} s')

  # Restart with outputs of process 0's share deleted: only those are redone; process 1 has no work.
  share0 = ids[0::2][:2]
  removed = [f'cam/{share0[0]}.npy', f'crf_24.0/{share0[1]}.npy', f'rw/{share0[1]}.png', f'seg_pred/{share0[0]}.png']
  before = {n: os.path.getmtime(os.path.join(two, n)) for n in names if n not in removed}
  for n in removed:
    os.remove(os.path.join(two, n))
  again = run_processes(dict(overrides, workdir=two), 2)
  assert [r['cam_images'] for r in again] == [1, 0] and [r['seg_images'] for r in again] == [1, 0]
  assert outputs(two) == names
  changed = {n for n, m in before.items() if os.path.getmtime(os.path.join(two, n)) != m}
  # predict.py is a tool, not a stage: it rewrites its outputs on every call
  assert changed <= {n for n in names if n.startswith(('eval/', 'predict/'))} | {f'rw/{share0[1]}.npy'}
  assert_same_outputs(one, two, names)


def test_process_share_splits_every_id_once(monkeypatch):
  ids = [f'id{k}' for k in range(11)]
  assert distributed.process_count() == 1 and distributed.is_main()   # no jax.distributed in this process
  assert distributed.process_share(ids) == ids
  distributed.barrier('nothing to wait for')
  x = np.arange(6, dtype=np.int64).reshape(2, 3)
  assert distributed.sum_over_processes(x) is x
  for n in (2, 3, 4):
    monkeypatch.setattr(distributed, 'process_count', lambda n=n: n)
    shares = []
    for p in range(n):
      monkeypatch.setattr(distributed, 'process_index', lambda p=p: p)
      shares.append(distributed.process_share(ids))
    assert sorted(i for s in shares for i in s) == sorted(ids) and all(shares)


def test_driver_resumes_forces_and_checks_inputs(tmp_path, monkeypatch):
  """per_image.run on a counting stage: a killed run (simulated: some outputs deleted) redoes exactly those items,
  the others keep their files; force redoes all; a missing input of any item to do, whichever process owns it,
  fails every process before any work; each process does its share and reaches the barrier."""
  items = [f'id{k}' for k in range(6)]
  outputs = lambda i: [str(tmp_path / f'{i}.a'), str(tmp_path / f'{i}.b')]
  calls, barriers = [], []
  monkeypatch.setattr(distributed, 'barrier', barriers.append)

  def work(todo, done):
    for i in todo:
      calls.append(i)
      for p in outputs(i):
        files.atomic_write_text(p, i)
      done(2)
    return {'extra': 7}

  def run(**kwargs):
    calls.clear()
    return per_image.run('count', items, outputs, work, **kwargs)

  stats = run()
  assert calls == items and stats['extra'] == 7 and stats['img_per_s'] > 0
  assert (stats['images'], stats['skipped'], stats['files_written']) == (6, 0, 12)
  for p in (outputs('id1')[0], outputs('id4')[1]):
    os.remove(p)
  kept = {p: os.stat(p).st_mtime_ns for i in items if i not in ('id1', 'id4') for p in outputs(i)}
  stats = run()
  assert calls == ['id1', 'id4'] and (stats['images'], stats['skipped'], stats['files_written']) == (2, 4, 4)
  assert {p: os.stat(p).st_mtime_ns for p in kept} == kept
  assert run()['images'] == 0 and calls == []
  assert run(force=True)['images'] == 6 and calls == items
  assert barriers == ['count'] * 4

  # Process 1 of 2: its share only; id0's missing input (process 0's item) stops it too, but only while id0 is to do.
  monkeypatch.setattr(distributed, 'process_count', lambda: 2)
  monkeypatch.setattr(distributed, 'process_index', lambda: 1)
  inputs = lambda i: [str(tmp_path / f'{i}.jpg')]
  for i in items[1:]:
    files.atomic_write_text(inputs(i)[0], i)
  assert run(force=False, inputs=inputs)['skipped'] == 3 and calls == []
  with pytest.raises(errors.DataError, match='count: 1 input files missing, e.g. .*id0.jpg'):
    run(force=True, inputs=inputs)
  os.remove(outputs('id0')[0])
  with pytest.raises(errors.DataError, match='id0.jpg'):
    run(inputs=inputs)
  files.atomic_write_text(inputs('id0')[0], 'id0')
  assert run(force=True, inputs=inputs)['images'] == 3 and calls == ['id1', 'id3', 'id5']
  with pytest.raises(RuntimeError, match='1 of its 3'):   # a work function that loses images is a bug
    per_image.run('count', items, outputs, lambda todo, done: done(), force=True)
