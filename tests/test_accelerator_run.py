"""The prepared accelerator run (benchmarks/accelerator.py, issue 24) end to end at the tiny size on CPU: both parts
run and the JSON and Markdown it writes hold their numbers (no timing assertion)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def test_accelerator_run_tiny(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}   # one CPU device, as on a one-GPU machine
  proc = subprocess.run([sys.executable, '-m', 'benchmarks.accelerator', f'--out={tmp_path}', '--size=tiny',
                         '--groups=train', '--train_steps=2'], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=1800)
  assert proc.returncode == 0, proc.stderr[-3000:]
  doc = json.loads((tmp_path / 'accelerator.json').read_text())
  assert doc['bench']['returncode'] == 0 and doc['train']['returncode'] == 0, doc
  for kind in ('seam', 'affinity', 'deeplab'):
    for impl in ('jax/float32', 'jax/bfloat16', 'torch'):
      assert doc['bench']['results'][f'train/{kind}/{impl}']['seconds'] > 0
  assert doc['train']['img_per_s'] > 0 and doc['train']['first_step_s'] > 0
  assert doc['machine']['jax_backend'] == 'cpu'
  md = (tmp_path / 'accelerator.md').read_text()
  assert '| seam |' in md and 'SEAM training, 2 steps' in md
