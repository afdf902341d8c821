"""The benchmark command runs end to end at the tiny size and writes its JSON and Markdown (no timing assertion:
timing goals live in benchmarks/)."""
import json
import os
import subprocess
import sys
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
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


def test_profile_attributes_operations():
  """The profiler's HLO attribution: the forward conv and, with the matmul kernel gradient (conv_wgrad on CPU, by
  its named scope), the kernel gradient are told apart; PyTorch's operators map to the same rows."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from benchmarks import profile
  from seam_jax.models import conv_wgrad
  conv = nn.Conv(4, (3, 3), padding=((1, 1), (1, 1)), conv_general_dilated=conv_wgrad.conv_matmul_wgrad)
  x = jnp.ones((2, 8, 8, 3))
  params = conv.init(jax.random.PRNGKey(0), x)
  loss = lambda p, x: jnp.sum(conv.apply(p, x) ** 2)
  hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile().as_text()
  kinds = set(profile.categories(hlo).values())
  assert {'conv forward', 'conv input gradient', 'conv kernel gradient'} <= kinds
  assert profile.torch_kind('aten::convolution_backward') == 'conv gradients (input + kernel)'
  assert profile.torch_kind('aten::mkldnn_convolution') == 'conv forward'
  assert profile.torch_kind('aten::bmm').startswith('matmul')
  assert profile.torch_kind('aten::relu') == 'elementwise / reductions'


@pytest.mark.slow
def test_profile_command_tiny():
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  proc = subprocess.run([sys.executable, '-m', 'benchmarks.profile', '--kind=cam', '--image_hw=40,56',
                         '--width_div=32', '--batch=2', '--steps=1'], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = {l.split(' | ')[0].strip('| '): l.split(' | ')[1:] for l in proc.stdout.splitlines() if l.startswith('| ')}
  assert float(rows['conv forward'][0]) > 0 and float(rows['conv forward'][2]) > 0   # JAX and PyTorch ms
  assert float(rows['total'][0]) > 0 and float(rows['total'][2]) > 0


@pytest.mark.slow
def test_memory_group_tiny(tmp_path):
  """The memory group alone: XLA's plan with and without remat (remat needs less), PyTorch's peak, step times. The
  first timed call's loss (from the same initial weights: the forward pass is the same program with remat on or
  off, tests/test_remat.py) is the same bits; later ones differ as the recomputed blocks' gradients round."""
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  proc = subprocess.run([sys.executable, '-m', 'benchmarks.run', '--size=tiny', '--only=memory', '--nobf16',
                         f'--out={tmp_path}'], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
  assert proc.returncode == 0, proc.stderr[-3000:]
  (md,) = tmp_path.glob('*-tiny.md')
  res = json.loads(md.with_suffix('.json').read_text())['results']
  for kind, batch in (('seam', 2), ('affinity', 2), ('deeplab', 5)):
    jx, pt = res[f'memory/{kind}/jax'], res[f'memory/{kind}/torch']
    assert jx['batch'] == pt['batch'] == batch and pt['peak_alloc_mb'] > 0
    assert 0 < jx['remat_on']['total_mb'] < jx['remat_off']['total_mb']
    off, on = res[f'memory/{kind}/time/remat_off'], res[f'memory/{kind}/time/remat_on']
    assert off['seconds'] > 0 and on['seconds'] > 0 and on['first_loss'] == off['first_loss']
  assert 'remat_on_no_donation' in res['memory/seam/jax']
  assert 'Memory at the original' in md.read_text()


def test_memory_table_from_results():
  """The memory group's table from a results dict (fast tier: benchmarks.memory and its report without running a
  step): XLA's plans, PyTorch's peak and the ratios come out of the numbers given."""
  from benchmarks import memory
  plan = lambda total: {'argument_mb': 100., 'output_mb': 100., 'temp_mb': total - 200., 'generated_code_mb': 0.,
                        'total_mb': total}
  res = {'memory/seam/jax': {'batch': 2, 'crop': 448, 'remat_off': plan(4000.), 'remat_on': plan(1000.),
                             'remat_off_no_donation': plan(4200.), 'remat_on_no_donation': plan(1100.)},
         'memory/seam/torch': {'peak_alloc_mb': 2000., 'peak_rss_mb': 3000.},
         'memory/seam/time/remat_off': {'seconds': 10., 'cpu_seconds': 20., 'batch': 1, 'peak_rss_mb': 5000.},
         'memory/seam/time/remat_on': {'seconds': 12., 'cpu_seconds': 21., 'batch': 1, 'peak_rss_mb': 3000.}}
  md = memory.markdown(res)
  row = next(l for l in md.splitlines() if l.startswith('| SEAM'))
  cells = [c.strip() for c in row.strip('|').split('|')]
  assert cells[1] == '2 x 448' and cells[3].endswith('**1000**') and cells[2].endswith('**4000**')
  assert cells[4] == '2000 / 3000' and cells[5] == '0.50'          # JAX on / PyTorch
  assert cells[7] == '1.20 / 1.05'                                  # step time and CPU seconds, on / off
  assert '4200 MB without, 4000 MB with' in md
  assert memory.markdown({}) == ''
