"""The whole tiny pipeline (python -m seam_jax, every stage from demo to eval_seg) as 2 processes x 2 CPU devices
against 1 process x 4: both complete, demo and prepare run once (process 0; byte-identical data, lists and labels),
and both runs leave the same files with the same records (fields and inputs). Per-stage numerics are compared where
they can be bounded: tests/test_multiprocess_train.py (every training step against the float32 reordering bound)
and tests/test_multiprocess_infer.py (CAMs, CRF, random walk, segmentation test, predict, evaluation: the same
values from the same weights)."""
import hashlib
import json
import os
import sys

import pytest

import jax

from configs import demo
from seam_jax.common import distributed
from seam_jax.models import convert

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow
# Files whose bytes name the run (logs, timings, TensorBoard events), not results, and orbax's own files inside
# checkpoints and exports (named by content hashes, laid out per writing process); exports are compared as trees.
VOLATILE = ('stages.json', '.lock', 'config.json', 'metrics.jsonl', os.sep + 'tb' + os.sep, 'report' + os.sep,
            os.sep + 'ckpt' + os.sep, os.sep + 'variables' + os.sep)
EXPORTS = {'pretrain': 'deeplab', 'seam': 'seam', 'affinity': 'affinity', 'seg': 'deeplab'}


def run(workdir, num_processes):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={4 // num_processes}')
  flags = [f'--config={ROOT}/configs/demo.py:tiny', f'--config.workdir={workdir}']

  def command(p, coordinator):
    group = [f'--coordinator_address={coordinator}', f'--num_processes={num_processes}', f'--process_id={p}']
    return [sys.executable, '-m', 'seam_jax'] + flags + (group if num_processes > 1 else [])
  outs = distributed.launch_local(command, num_processes, env=env, cwd=ROOT, timeout_s=1800)
  for rc, out in outs:
    assert rc == 0, out[-3000:]
  return [out for _, out in outs]


def tree(workdir):
  """{relative path: sha1} of every file but the volatile ones."""
  out = {}
  for d, _, fs in os.walk(workdir):
    for f in fs:
      rel = os.path.relpath(os.path.join(d, f), workdir)
      if not any(v in os.sep + rel for v in VOLATILE):
        with open(os.path.join(d, f), 'rb') as fh:
          out[rel] = hashlib.sha1(fh.read()).hexdigest()
  return out


def test_two_processes_run_the_pipeline_like_one(tmp_path):
  one, two = str(tmp_path / 'one'), str(tmp_path / 'two')
  run(one, 1)
  logs = run(two, 2)
  for log in logs:     # every process walks every stage; demo and prepare did their work in process 0 alone
    assert '] demo: started' in log and '] eval_seg: done in' in log
  a, b = tree(one), tree(two)
  assert set(a) == set(b), sorted(set(a) ^ set(b))[:10]
  deterministic = [p for p in a if p.startswith(('VOC2012' + os.sep, 'lists' + os.sep))]
  assert deterministic and all(a[p] == b[p] for p in deterministic)
  model = demo.get_config('tiny').model
  for task, kind in EXPORTS.items():   # the same networks (values: see the module doc)
    # num_classes None: each export's own head (the pretraining head has its own channel count)
    va, vb = (convert.load_variables(os.path.join(w, task, 'export'), kind, model, num_classes=None)
              for w in (one, two))
    assert jax.tree.structure(va) == jax.tree.structure(vb)
    assert all(jax.tree.leaves(jax.tree.map(lambda x, y: x.shape == y.shape, va, vb))), task
  for rec in (p for p in a if p.startswith('records' + os.sep)):
    ra, rb = (json.load(open(os.path.join(w, rec))) for w in (one, two))
    assert ra['state'] == rb['state'] == 'complete' and ra['fields'] == rb['fields'], rec
    assert sorted(ra['inputs']) == sorted(k.replace(two, one) for k in rb['inputs']), rec
