"""One prepared accelerator run (issue 24): everything a short GPU loan should measure, in one command.

  bash benchmarks/accelerator.sh OUT [WHEELS]          # on the GPU machine: install, then the line below
  python -m benchmarks.accelerator --out=OUT [--size=full|tiny] [--train_steps=20]

It runs, each part in its own process and each failure recorded rather than fatal:
  1. the benchmark table at `--size` (benchmarks.run: SEAM, AffinityNet and segmentation train steps in float32 and
     bfloat16 against PyTorch on the same device, CAM inference, random walk; XLA's memory analysis when the memory
     group exists), results under OUT/bench/;
  2. a short SEAM training on generated data through the pipeline's own stages (`python -m seam_jax
     demo,prepare,train` with the size's network, crop and the recipe's batch), its wall time, first-step (compile)
     time and images per second from metrics.jsonl;
and writes OUT/accelerator.json (every number, the machine, jax and device versions) and OUT/accelerator.md (the
tables). `--size=tiny` runs the same on CPU in about a minute (tests/test_benchmarks.py).
"""
import json
import os
import subprocess
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import harness
from seam_jax.common import files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
flags.DEFINE_string('out', None, 'output folder', required=True)
flags.DEFINE_enum('size', 'full', ['tiny', 'full'], 'benchmark size (harness.SIZES)')
flags.DEFINE_list('groups', ['train', 'cam', 'rw'], 'benchmarks.run groups of part 1')
flags.DEFINE_integer('train_steps', 20, 'steps of the SEAM training of part 2')
flags.DEFINE_integer('timeout_s', 420, 'limit of each part (the whole call must fit a short loan)')
FLAGS = flags.FLAGS

# The training run of part 2, per size: the demo recipe's data generator and stages at the size's network and crop.
TRAIN_OVERRIDES = {
    'tiny': ['--config.model.width_div=32', '--config.data.crop_size=32', '--config.data.resize_long=(32,48)',
             '--config.demo.image_size=(40,56)', '--config.demo.num_train=8', '--config.demo.num_val=2',
             '--config.demo.num_aug=0', '--config.train.batch_size=2'],
    'full': ['--config.model.width_div=1', '--config.data.crop_size=448', '--config.data.resize_long=(448,768)',
             '--config.demo.image_size=(375,500)', '--config.demo.num_train=64', '--config.demo.num_val=4',
             '--config.demo.num_aug=0', '--config.train.batch_size=8', '--config.model.fast_compile=False',
             '--config.train.fast_compile=False'],
}


def _run(cmd, timeout_s, env=None):
  """(returncode or 'timeout', seconds, last lines of the output)."""
  t0 = time.time()
  try:
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    return p.returncode, time.time() - t0, (p.stdout + p.stderr)[-2000:]
  except subprocess.TimeoutExpired as e:
    return 'timeout', time.time() - t0, str(e.stdout or '')[-2000:]


def bench_part(out, size, groups, timeout_s):
  rc, dt, tail = _run([sys.executable, '-m', 'benchmarks.run', f'--size={size}', f'--only={",".join(groups)}',
                       f'--out={out}/bench', f'--root={out}/bench_data'], timeout_s)
  results = {}
  for name in os.listdir(f'{out}/bench') if os.path.isdir(f'{out}/bench') else []:
    if name.endswith('.json'):
      with open(os.path.join(out, 'bench', name)) as f:
        results = json.load(f)['results']
  return {'returncode': rc, 'seconds': dt, 'results': results, 'log_tail': tail if rc != 0 else ''}


def train_part(out, size, steps, timeout_s):
  work = os.path.join(out, 'train_run')
  cmd = [sys.executable, '-m', 'seam_jax', 'demo,prepare,train', f'--config={ROOT}/configs/demo.py',
         f'--config.workdir={work}', '--config.pretrain.enabled=False', '--config.model.calibrate_bn=True',
         f'--config.train.max_steps={steps}', '--config.train.log_every=5', f'--config.train.ckpt_every={steps}',
         '--config.train.image_summaries=False', '--noreport', *TRAIN_OVERRIDES[size]]
  rc, dt, tail = _run(cmd, timeout_s)
  out_ = {'returncode': rc, 'seconds': dt, 'steps': steps, 'command': ' '.join(cmd[1:]),
          'log_tail': tail if rc != 0 else ''}
  metrics = os.path.join(work, 'seam', 'metrics.jsonl')
  if os.path.isfile(metrics):
    with open(metrics) as f:
      rows = [json.loads(l) for l in f if l.strip()]
    out_.update(final_loss=rows[-1].get('loss'), img_per_s=max(r.get('img_per_s', 0.) for r in rows))
  first = [l for l in tail.splitlines() if 'first step (compile included)' in l]
  if first:
    out_['first_step_s'] = float(first[-1].split('took ')[1].split(' s')[0])
  return out_


def markdown(doc):
  m, t = doc['machine'], doc['train']
  lines = [f'# Accelerator run ({doc["size"]})', '',
           f'{m.get("jax_devices", "?")}; jax {m.get("jax", "?")} ({m.get("jax_backend")}); {m.get("cpu")} '
           f'({m.get("cores")} cores); {doc["seconds"]:.0f} s in all.', '',
           '| train step | JAX float32 s | JAX bfloat16 s | PyTorch s | PyTorch / JAX f32 |', '|---|---|---|---|---|']
  res = doc['bench']['results']
  for kind in ('seam', 'affinity', 'deeplab'):
    j32, j16, pt = (res.get(f'train/{kind}/{k}', {}) for k in ('jax/float32', 'jax/bfloat16', 'torch'))
    ratio = pt['seconds'] / j32['seconds'] if 'seconds' in pt and 'seconds' in j32 else None
    cell = lambda r: f'{r["seconds"]:.4f}' if 'seconds' in r else r.get('error', '-')
    lines.append(f'| {kind} | {cell(j32)} | {cell(j16)} | {cell(pt)} | '
                 f'{"-" if ratio is None else f"{ratio:.2f}x"} |')
  lines += ['', f'SEAM training, {t["steps"]} steps on generated data: return code {t["returncode"]}, '
            f'{t["seconds"]:.0f} s wall, first step {t.get("first_step_s", "-")} s, '
            f'{t.get("img_per_s", "-")} img/s, final loss {t.get("final_loss", "-")}.']
  return '\n'.join(lines) + '\n'


def main(argv):
  del argv
  t0 = time.time()
  os.makedirs(FLAGS.out, exist_ok=True)
  m = harness.run_isolated(harness.machine)
  doc = {'size': FLAGS.size, 'machine': m,
         'bench': bench_part(FLAGS.out, FLAGS.size, FLAGS.groups, FLAGS.timeout_s),
         'train': train_part(FLAGS.out, FLAGS.size, FLAGS.train_steps, FLAGS.timeout_s)}
  doc['seconds'] = time.time() - t0
  files.atomic_write_text(os.path.join(FLAGS.out, 'accelerator.json'), json.dumps(doc, indent=1, default=str))
  files.atomic_write_text(os.path.join(FLAGS.out, 'accelerator.md'), markdown(doc))
  print(markdown(doc))


if __name__ == '__main__':
  app.run(main)
