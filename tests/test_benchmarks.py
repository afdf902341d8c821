"""The benchmark command runs end to end at the tiny size and writes its JSON and Markdown (no timing assertion:
timing goals live in benchmarks/)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_benchmark_command_tiny(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}   # one CPU device, as a user's run
  proc = subprocess.run([sys.executable, '-m', 'benchmarks.run', '--size=tiny', f'--out={tmp_path}',
                         f'--root={tmp_path / "data"}'], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=3000)
  assert proc.returncode == 0, proc.stderr[-3000:]
  (md,) = tmp_path.glob('*-tiny.md')
  doc = json.loads(md.with_suffix('.json').read_text())
  res = doc['results']
  failed = {k: v['error'] for k, v in res.items() if isinstance(v, dict) and 'error' in v}
  assert not failed
  for kind in ('seam', 'affinity', 'deeplab'):
    for impl in ('jax/float32', 'jax/bfloat16', 'torch'):
      row = res[f'train/{kind}/{impl}']
      assert row['seconds'] > 0 and row['peak_rss_mb'] > 0 and row['batch'] == 2
    jax32 = res[f'train/{kind}/jax/float32']
    assert jax32['flops'] > 0 and jax32['compile_s'] > 0
    assert jax32['parity_rel'] < 1e-4     # the same function in both frameworks (float32 summation order)
  assert res['cam/difference']['max_abs'] < 1e-4
  assert set(res['rw']['agreement']) == {'numpy_dense', 'numpy_sparse', 'jax_sparse', 'jax_dense', 'torch_dense'}
  assert res['crf']['img_per_s_1'] > 0 and res['throughput']['real_img_per_s'] > 0
  assert res['loader/device/1']['img_per_s_per_core'] > 0 and res['loader/device_half']['seconds_per_image'] > 0
  text = md.read_text()
  for name in ('SEAM train step', 'AffinityNet train step', 'segmentation train step', 'CAM inference',
               'Random walk', 'Dense CRF', 'input pipeline', 'real loader'):
    assert name in text
