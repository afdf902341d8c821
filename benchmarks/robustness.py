"""The robustness benchmark (issue 23): the demo pipeline on random data styles nobody tuned to.

  python -m benchmarks.robustness --draws=0-7 --seeds=0 [--out=benchmarks/results/robustness]
      [--root=work_dirs/robustness] [--config=configs/demo.py] [--override=--config.x=y ...] [--dry_run]

Draw d (seam_jax.data.style_draws) is generated once under <root>/data_<d>/VOC2012 (its style_draws.MARKER records
the draw; a set already there is reused). For each seed s the whole pipeline, SEAM and the plain-CAM baseline
(pipeline.compare_baseline), runs in a subprocess on the CPU in <root>/d<d>_s<s>, its output appended to
<root>/d<d>_s<s>.log. Completed stages are skipped, so the same command again continues where it stopped; a failed
run is reported with the end of its log and the others go on. Then every run's report/summary.json (seam_jax.report)
goes into <out>/robustness.json (every number) and <out>/robustness.md: per-draw and per-class tables, the spread
over seeds, the goals with PASS / FAIL and the machine with each run's pipeline time. See benchmarks/README.md.
"""
import json
import os
import shlex
import subprocess
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import harness
from seam_jax import compare_runs
from seam_jax.common import errors, files
from seam_jax.data import style_draws, voc
from seam_jax.report import RUN_TITLES

flags.DEFINE_string('draws', '0-7', 'style draws (seam_jax.data.style_draws): 0-7 or 0,3,5-6')
flags.DEFINE_string('seeds', '0', 'pipeline seeds (config.seed) per draw: 0-2 or 0,4')
flags.DEFINE_integer('base_seed', 0, 'seed of the style draws')
flags.DEFINE_string('root', os.path.join('work_dirs', 'robustness'), 'data sets, workdirs and logs')
flags.DEFINE_string('config', 'configs/demo.py', 'pipeline config (a demo recipe)')
flags.DEFINE_multi_string('override', [], 'extra pipeline flag, e.g. --override=--config.train.max_steps=100')
flags.DEFINE_bool('dry_run', False, 'generate the data sets and print the commands, run nothing')
flags.DEFINE_integer('num_train', 160, 'train ids of each data set')
flags.DEFINE_integer('num_val', 40, 'val ids (the evaluated list) of each data set')
flags.DEFINE_integer('num_aug', 40, 'aug-only ids of each data set')
flags.DEFINE_list('image_size', ['96', '128'], 'min,max image side of each data set')
flags.DEFINE_integer('tail', 15, 'lines of a failed run\'s log to show')
flags.DEFINE_string('out', os.path.join('benchmarks', 'results', 'robustness'), 'results folder')
FLAGS = flags.FLAGS

EVALS = (('seam', 'cam'), ('seam', 'crf'), ('seam', 'rw'), ('seam', 'seg'), ('baseline', 'cam'), ('baseline', 'rw'))
MIN_CLASS_IOU = 50.
CLASS_GOAL_SHARE = 0.9


def log(msg):
  print(f'[{time.strftime("%H:%M:%S")}] {msg}', flush=True)


def command(config, workdir, voc_root, label_source, seed, overrides=()):
  return [sys.executable, '-m', 'seam_jax', f'--config={config}', f'--config.workdir={workdir}',
          f'--config.data.voc_root={voc_root}', f'--config.data.label_source={label_source}',
          f'--config.seed={seed}', '--config.pipeline.compare_baseline=True', *overrides]


def run_pipeline(cmd, log_path):
  """Run `cmd` on the CPU, its output appended to log_path; returns the exit status."""
  with open(log_path, 'a') as f:
    f.write(f'\n=== {time.strftime("%Y-%m-%d %H:%M:%S")} {shlex.join(cmd)}\n')
    f.flush()
    return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=False,
                          env=dict(os.environ, JAX_PLATFORMS='cpu')).returncode


def log_tail(path, n):
  with open(path, errors='replace') as f:
    return [l.rstrip() for l in f.read().replace('\r', '\n').splitlines() if l.strip()][-n:]


# ------------------------------------------------------------------------------------------------ aggregation
def eval_name(summary, run, key):
  """Name of the evaluation of EVALS key `key` ('crf': the first CRF alpha) in `run` of a summary.json (or of a
  record), or None."""
  names = list((summary or {}).get('runs', {}).get(run, {}))
  return next((n for n in names if n.startswith('crf_')), None) if key == 'crf' else (key if key in names else None)


def scores(summary, run, key):
  name = eval_name(summary, run, key)
  return summary['runs'][run][name] if name else None


def lowest(ev):
  """(class, IoU) of the lowest present class of an evaluation, or None."""
  return min(((c, ev['per_class'][c]) for c in ev['present']), key=lambda t: t[1]) if ev and ev['present'] else None


def record(result):
  """One run's figures: mIoU (present classes) per EVALS key, lowest classes, pipeline seconds, every evaluation."""
  s = result.get('summary')
  rec = {k: v for k, v in result.items() if k != 'summary'}
  if not s:
    return dict(rec, miou={}, lowest={}, seconds={})
  miou = {f'{r}/{k}': ev['miou_present'] for r, k in EVALS for ev in [scores(s, r, k)] if ev}
  low = {k: list(lowest(scores(s, 'seam', k)) or []) for k in ('rw', 'seg')}
  secs = {r: compare_runs.pipeline_seconds(s, r) for r in s['runs']}
  return dict(rec, miou=miou, crf=eval_name(s, 'seam', 'crf'), lowest=low, seconds=dict(secs, total=sum(secs.values())),
              runs=s['runs'], stages=s['stages'])


def goals(records):
  """[{goal, passed, total, verdict}]: the issue's bars over the runs' records (a run without the figures fails)."""
  def all_classes(r):
    ev = [scores(r, 'seam', k) for k in ('rw', 'seg')]
    return all(e and all(e['per_class'][c] >= MIN_CLASS_IOU for c in e['present']) for e in ev)

  def at_least(r, a, b):
    m = r['miou']
    return a in m and b in m and m[a] >= m[b]

  checks = [(f'every present class >= {MIN_CLASS_IOU:.0f} IoU after the random walk and after the segmentation '
             f'net, in >= {CLASS_GOAL_SHARE:.0%} of the runs', all_classes, CLASS_GOAL_SHARE),
            ('segmentation mIoU >= random-walk mIoU on every run', lambda r: at_least(r, 'seam/seg', 'seam/rw'), 1.),
            ('SEAM >= CAM baseline after the random walk on every run',
             lambda r: at_least(r, 'seam/rw', 'baseline/rw'), 1.),
            ('SEAM >= CAM baseline on the CAMs on every run', lambda r: at_least(r, 'seam/cam', 'baseline/cam'), 1.)]
  out = []
  for text, ok, share in checks:
    passed = sum(bool(ok(r)) for r in records)
    out.append({'goal': text, 'passed': passed, 'total': len(records),
                'verdict': 'PASS' if records and passed >= share * len(records) else 'FAIL'})
  return out


def aggregate(draws, results):
  """robustness.json's content: `draws` {index: style draw}, `results` [{draw, seed, workdir, status, summary}]."""
  records = [record(r) for r in results]
  return {'cpu': harness.cpu_model(), 'cores': os.cpu_count(), 'draws': {str(d): v for d, v in draws.items()},
          'runs': records, 'goals': goals(records)}


# ------------------------------------------------------------------------------------------------ Markdown
def _row(cells):
  return '| ' + ' | '.join(str(c) for c in cells) + ' |'


def _table(head, rows):
  return [_row(head), _row(['---'] * len(head))] + [_row(r) for r in rows]


def _fmt(values):
  """One value as is, several as mean (min-max), none as '-'."""
  if not values:
    return '-'
  mean = f'{sum(values) / len(values):.1f}'
  return mean if len(values) == 1 else f'{mean} ({min(values):.1f}-{max(values):.1f})'


def _title(run, key):
  return f'{RUN_TITLES[run]}: ' + {'cam': 'CAM', 'crf': 'CRF (first alpha)', 'rw': 'random walk',
                                   'seg': 'segmentation'}[key]


def markdown(doc):
  runs, draws = doc['runs'], doc['draws']
  out = ['# Robustness over random data styles', '',
         f"mIoU (%) over the classes present (background included) on the evaluated list of each draw's set; "
         f"CPU: {doc['cpu']} ({doc['cores']} cores).", '']

  def row(r):
    low = [f'{r["lowest"][k][0]} {r["lowest"][k][1]:.1f}' if r['lowest'].get(k) else '-' for k in ('rw', 'seg')]
    secs = ' + '.join(f'{v / 60:.1f}' for k, v in r['seconds'].items() if k != 'total') + ' min'
    first = r is next(q for q in runs if q['draw'] == r['draw'])   # the description once per draw
    return ([r['draw'], draws[str(r['draw'])]['description'] if first else '', r['seed']] +
            [_fmt([r['miou'][f'{a}/{b}']] if f'{a}/{b}' in r['miou'] else []) for a, b in EVALS] +
            low + [secs if r['status'] == 'ok' else r['status']])
  out += _table(['draw', 'data', 'seed'] + [_title(*e) for e in EVALS] + [
      'lowest class, random walk', 'lowest class, segmentation', 'pipeline time (SEAM + baseline)'], map(row, runs))
  total = sum(r['seconds'].get('total', 0) for r in runs)
  out += ['', f'Pipeline time (stage times of the runs that made the outputs, compare_runs.pipeline_seconds): '
          f'{total / 60:.1f} min over {len(runs)} runs.', '', '## Per class', '']
  for d, sd in draws.items():
    mine = [r for r in runs if str(r['draw']) == d and r.get('runs')]
    seen = [voc.CLASSES[0]] + sd['class_names'] + sorted(
        {c for r in mine for ev in r['runs'].values() for e in ev.values() for c in e['present']} -
        set(sd['class_names']) - {voc.CLASSES[0]})
    looks = {n: ('#%02x%02x%02x' % tuple(p), s) for n, p, s in zip(sd['class_names'], sd['palette'],
                                                                     sd['shape_names'])}
    seeds = ', '.join(str(r['seed']) for r in mine) or 'none completed'
    out += [f'### Draw {d}: {sd["description"]} (seeds {seeds})', '']
    rows = []
    for c in seen:
      cells = []
      for a, b in EVALS:
        evs = [r['runs'].get(a, {}).get(r['crf'] if b == 'crf' else b) for r in mine]
        cells.append(_fmt([e['per_class'][c] for e in evs if e and c in e['present']]))
      rows.append([c + ('' if c in looks or c == voc.CLASSES[0] else ' (not drawn)'), *looks.get(c, ('-', '-')),
                   *cells])
    out += _table(['class', 'colour', 'shape'] + [_title(*e) for e in EVALS], rows) + ['']
  multi = {d: [r for r in runs if str(r['draw']) == d and r['miou']] for d in draws}
  if any(len(v) > 1 for v in multi.values()):
    out += ['## Spread over seeds', '', 'Mean (min-max) of the mIoU over the seeds of each draw.', '']
    out += _table(['draw', 'runs'] + [_title(*e) for e in EVALS], [
        [d, len(v)] + [_fmt([r['miou'][f'{a}/{b}'] for r in v if f'{a}/{b}' in r['miou']]) for a, b in EVALS]
        for d, v in multi.items()]) + ['']
  out += ['## Goals', '']
  out += [f'- **{g["verdict"]}**: {g["goal"]}: {g["passed"]}/{g["total"]} runs' for g in doc['goals']]
  return '\n'.join(out) + '\n'


# ------------------------------------------------------------------------------------------------ command
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}: pass pipeline flags as --override=--config.x=y')
  try:
    draw_ids, seeds = style_draws.parse_range(FLAGS.draws), style_draws.parse_range(FLAGS.seeds)
    draws = {d: style_draws.draw(d, FLAGS.base_seed) for d in draw_ids}
    for d, sd in draws.items():
      t0 = time.time()
      style_draws.generate(os.path.join(FLAGS.root, f'data_{d}', 'VOC2012'), sd, FLAGS.num_train, FLAGS.num_val,
                           FLAGS.num_aug, [int(v) for v in FLAGS.image_size], data_seed=d)
      log(f'draw {d}: {sd["description"]} ({time.time() - t0:.1f} s)')
  except errors.DataError as e:
    sys.exit(f'error: {e}')
  results = []
  for d, sd in draws.items():
    for s in seeds:
      workdir = os.path.join(FLAGS.root, f'd{d}_s{s}')
      cmd = command(FLAGS.config, workdir, os.path.join(FLAGS.root, f'data_{d}', 'VOC2012'), sd['label_source'], s,
                    FLAGS.override)
      if FLAGS.dry_run:
        print(shlex.join(cmd), flush=True)
        continue
      log(f'draw {d} seed {s}: running, log {workdir}.log')
      t0 = time.time()
      rc = run_pipeline(cmd, workdir + '.log')
      res = {'draw': d, 'seed': s, 'workdir': workdir, 'status': 'ok' if rc == 0 else f'failed (exit {rc})'}
      if rc == 0:
        try:
          res['summary'] = compare_runs.load_run(workdir)[0]
        except errors.DataError as e:
          res['status'] = f'no report ({e})'
      m = ', '.join(f'{k} {v:.1f}' for k, v in record(res)['miou'].items() if k.endswith(('rw', 'seg')))
      log(f'draw {d} seed {s}: {res["status"]} after {(time.time() - t0) / 60:.1f} min' + (f'; {m}' if m else ''))
      if rc:
        print('\n'.join('    ' + l for l in log_tail(workdir + '.log', FLAGS.tail)), flush=True)
      results.append(res)
  if FLAGS.dry_run:
    return
  doc = dict(aggregate(draws, results), command='python -m benchmarks.robustness ' + shlex.join(sys.argv[1:]),
             config=FLAGS.config, overrides=FLAGS.override, base_seed=FLAGS.base_seed,
             data_sizes={k: FLAGS[k].value for k in ('num_train', 'num_val', 'num_aug', 'image_size')})
  md, out = markdown(doc), FLAGS.out
  files.atomic_write_text(os.path.join(out, 'robustness.json'), json.dumps(doc, indent=1))
  files.atomic_write_text(os.path.join(out, 'robustness.md'), md)
  print(md)
  log(f'wrote {out}/robustness.json and robustness.md')


if __name__ == '__main__':
  app.run(main)
