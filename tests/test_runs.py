"""Runs you can trust, end to end on the tiny recipe over a user's own VOC-layout folder: every stage records what
made its outputs; a changed field reruns exactly the stages that read it and the ones after, saying why; --force
reruns everything afresh (old training set aside); the user's folder is byte-identical after every command; one run
per workdir; `status` tells each stage's state without running anything."""
import hashlib
import json
import os
import subprocess
import sys

import pytest

from configs import demo
from seam_jax import layout, provenance, stages
from seam_jax.common import workdir_lock
from seam_jax.data import demo_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def _tree_digest(folder):
  """sha256 over every file's relative path and bytes (and the folder's file list)."""
  h = hashlib.sha256()
  for d, _, fs in sorted(os.walk(folder)):
    for f in sorted(fs):
      p = os.path.join(d, f)
      h.update(os.path.relpath(p, folder).encode() + b'\0')
      with open(p, 'rb') as fh:
        h.update(fh.read())
  return h.hexdigest()


class Run:
  """The tiny recipe on the user's folder `voc`, in workdir `work`, run as `python -m seam_jax`."""

  def __init__(self, root):
    self.root, self.voc, self.work = root, str(root / 'user_voc'), str(root / 'work')
    self.config = demo.get_config('tiny')
    self.config.workdir, self.config.data.voc_root = self.work, self.voc
    self.env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2',
                    JAX_COMPILATION_CACHE_DIR=str(root / 'xla_cache'))

  def __call__(self, *args, ok=True):
    r = subprocess.run([sys.executable, '-m', 'seam_jax', f'--config={ROOT}/configs/demo.py:tiny',
                        f'--config.workdir={self.work}', f'--config.data.voc_root={self.voc}', *args],
                       cwd=str(self.root), env=self.env, capture_output=True, text=True, timeout=1200)
    if ok:
      assert r.returncode == 0, r.stderr[-3000:]
    return r

  def lines(self, out):
    """{stage: its start or skip line} of a run's output."""
    found = {}
    for l in out.splitlines():
      name, _, rest = l.partition('] ')[2].partition(': ')
      if l.startswith('[') and rest.startswith(('started', 'skipped: ')):
        found[name] = rest
    return found


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp('runs')
  r = Run(root)
  g = r.config.demo
  demo_data.generate(r.voc, num_train=g.num_train, num_val=g.num_val, num_aug=g.num_aug,
                     image_size=tuple(g.image_size), seed=g.seed, workers=1, classes=g.classes, plain=g.plain)
  r.digest = _tree_digest(r.voc)            # the user's data: no demo marker, never to change
  first = r.lines(r().stdout)
  assert 'demo' not in first and all(v.startswith('started') for v in first.values()), first
  assert _tree_digest(r.voc) == r.digest
  return r


def test_a_rerun_skips_every_stage_and_the_run_folder_records_it(run):
  again = run.lines(run().stdout)
  names = stages.select('all', run.config)
  assert list(again) == names and all(v.startswith('skipped: outputs complete') for v in again.values()), again
  with open(os.path.join(run.work, 'config.json')) as f:
    assert json.load(f)['train']['lr'] == run.config.train.lr
  rec = provenance.read_record(run.work, 'rw')
  assert rec['state'] == 'complete' and rec['fields']['rw.beta'] == run.config.rw.beta and rec['outputs']
  assert any('cam' in k for k in rec['inputs'])        # the CAMs it walked, fingerprinted


def test_a_changed_field_reruns_exactly_the_stages_that_read_it(run):
  beta = run.config.rw.beta
  status = dict(l.split(': ', 1) for l in run('status', f'--config.rw.beta={beta // 2}').stdout.splitlines())
  assert status['train'] == 'complete' and status['eval_crf'] == 'complete'
  assert status['rw'] == f'stale (rw.beta {beta} -> {beta // 2})'
  assert status['train_seg'].startswith('stale (after') and status['eval_rw'].startswith('stale (after rw')
  before = provenance.read_record(run.work, 'rw')['outputs']
  out = run.lines(run(f'--config.rw.beta={beta // 2}').stdout)
  later = stages.select('rw..', run.config)
  assert all(out[n].startswith('started') for n in later), out
  assert all(out[n].startswith('skipped') for n in out if n not in later), out
  assert out['rw'] == f'started (rw.beta {beta} -> {beta // 2})'
  assert out['train_seg'].startswith('started (input ') and 'changed' in out['train_seg']
  rec = provenance.read_record(run.work, 'rw')
  assert rec['fields']['rw.beta'] == beta // 2 and rec['outputs'] != before
  assert _tree_digest(run.voc) == run.digest


def test_a_changed_training_field_starts_a_new_training_run(run):
  lr = run.config.train.lr
  out = run.lines(run('train..infer', f'--config.train.lr={lr * 2}').stdout)
  assert out == {'train': f'started (train.lr {lr} -> {lr * 2})',
                 'infer': out['infer']} and out['infer'].startswith('started (input ')
  old = os.path.join(run.work, 'superseded', 'seam.1')
  assert os.path.isdir(os.path.join(old, 'export')) and os.path.isdir(os.path.join(old, 'ckpt'))
  with open(os.path.join(run.work, 'seam', 'metrics.jsonl')) as f:
    steps = [json.loads(l)['step'] for l in f]
  assert steps == sorted(steps) and steps[-1] == run.config.train.max_steps   # a fresh run: one line per log step


def test_force_reruns_every_stage_and_leaves_the_user_data_alone(run):
  out = run.lines(run('--force').stdout)
  assert list(out) == stages.select('all', run.config) and all(v == 'started (--force)' for v in out.values())
  assert {'seam.2', 'pretrain.1', 'affinity.1', 'seg.1'} <= set(os.listdir(os.path.join(run.work, 'superseded')))
  assert _tree_digest(run.voc) == run.digest
  # The demo stage named on the user's folder: one line, nothing written.
  r = run('demo', '--force', ok=False)
  assert r.returncode == 1 and [l for l in r.stderr.splitlines() if l.startswith('error:')] == [
      l for l in r.stderr.splitlines() if 'did not generate' in l] and 'Traceback' not in r.stderr
  assert _tree_digest(run.voc) == run.digest


def test_one_run_per_workdir(run):
  with workdir_lock.hold(run.work):
    r = run('eval_cam', '--force', ok=False)
  errs = [l for l in r.stderr.splitlines() if l.startswith('error:')]
  assert r.returncode == 1 and len(errs) == 1 and f'pid {os.getpid()}' in errs[0] and 'Traceback' not in r.stderr
  assert run.lines(run('eval_cam').stdout)['eval_cam'].startswith('skipped: outputs complete')   # released
  assert os.path.isfile(layout.stage_log(run.config))
