"""Several pipeline runs side by side, as Markdown: the README's demo tables are this module's output, never typed.

  python -m seam_jax.compare_runs work_dirs/demo_s0 work_dirs/demo_s1 work_dirs/demo_s2 [--out=table.md]

Reads each run's <workdir>/report/summary.json (seam_jax.report) and the demo stage's record in <workdir>/stages.json
(seed, classes drawn). Writes, per run: the demo seed and classes, the pipeline's time (each stage's time when its
outputs were made, summed) and the mIoU over present classes of every evaluation, SEAM and, when it ran, the
plain-CAM baseline; then the mean and range (min-max) over the runs, and the lowest per-class IoU of each evaluation
over the runs (the demo's bar: every class >= 50 after the random walk and after the segmentation net), the
classes named and ordered as in each run's data set.
"""
import json
import os
import sys

from absl import app, flags

from seam_jax.common import errors, files
from seam_jax.report import RUN_TITLES, eval_title

FLAGS = flags.FLAGS   # --out: defined when run as a command (importers define their own flags)


def load_run(workdir):
  """(summary.json of the run, its demo stage summary or {}); a missing report is a DataError naming it."""
  path = os.path.join(workdir, 'report', 'summary.json')
  if not os.path.isfile(path):
    raise errors.DataError(f'{path} does not exist: run the pipeline there first')
  with open(path) as f:
    summary = json.load(f)
  records = os.path.join(workdir, 'stages.json')
  demo = {}
  if os.path.isfile(records):
    with open(records) as f:
      demo = json.load(f).get('demo', {}).get('summary', {})
  return summary, demo


def describe(demo):
  if not demo:
    return '(not the demo set)'
  classes = [c for c, n in demo.get('class_hist', {}).get('all', {}).items() if n]
  return f"seed {demo.get('seed')}, {', '.join(classes)}"


def pipeline_seconds(summary, run):
  return sum(r['run_seconds'] or r['seconds'] for r in summary['stages'] if r['run'] == run)


def class_order(summaries):
  """The class names of the runs in their data sets' order (summary.json 'classes'; a summary without it: the order
  of its per-class tables), each once."""
  names = []
  for s in summaries:
    names += s.get('classes') or [c for r in s['runs'].values() for sc in r.values() for c in sc['per_class']]
  return list(dict.fromkeys(names))


def _row(cells):
  return '| ' + ' | '.join(str(c) for c in cells) + ' |'


def _spread(values):
  return f'{sum(values) / len(values):.1f} ({min(values):.1f}-{max(values):.1f})' if values else '-'


def markdown(workdirs):
  loaded = [load_run(w) for w in workdirs]
  runs = [r for r in RUN_TITLES if any(r in s['runs'] for s, _ in loaded)]
  evals = list(dict.fromkeys(n for s, _ in loaded for r in runs for n in s['runs'].get(r, {})))
  cols = [(r, n) for r in runs for n in evals if any(n in s['runs'].get(r, {}) for s, _ in loaded)]
  fixed = lambda n: any('miou_present_fixed' in s['runs'][r].get(n, {}) for s, _ in loaded for r in s['runs'])
  mcols = [(r, n, k) for r, n in cols for k in ('miou_present',) + (('miou_present_fixed',) if fixed(n) else ())]
  head = ['run', 'data', 'pipeline time'] + [
      f'{RUN_TITLES[r]}: {eval_title(n)}' + (', fixed threshold' if k.endswith('fixed') else '') for r, n, k in mcols]
  out = ['mIoU (%) over the classes present, on each evaluation\'s list; CAMs at their best background threshold '
         '(chosen on the ground truth) and at the fixed infer.bg_threshold.', '', _row(head), _row(['---'] * len(head))]
  values = {c: [] for c in mcols}
  for w, (s, demo) in zip(workdirs, loaded):
    cells = [os.path.basename(os.path.normpath(w)), describe(demo),
             ' + '.join(f'{pipeline_seconds(s, r) / 60:.1f} min' for r in runs if r in s['runs'])]
    for r, n, k in mcols:
      v = s['runs'].get(r, {}).get(n, {}).get(k)
      cells.append('-' if v is None else f'{v:.1f}')
      if v is not None:
        values[(r, n, k)].append(v)
    out.append(_row(cells))
  out.append(_row(['mean (range)', f'{len(loaded)} runs', ''] + [_spread(values[c]) for c in mcols]))
  out += ['', 'Lowest IoU (%) of each class over the runs where it is present (n: in how many runs):', '',
          _row(['class', 'n'] + [f'{RUN_TITLES[r]}: {eval_title(n)}' for r, n in cols]),
          _row(['---'] * (len(cols) + 2))]
  present = [c for c in class_order(s for s, _ in loaded)
             if any(c in sc['present'] for s, _ in loaded for r in s['runs'].values() for sc in r.values())]
  for c in present:
    cells = [c, sum(any(c in sc['present'] for r in s['runs'].values() for sc in r.values()) for s, _ in loaded)]
    for r, n in cols:
      got = [s['runs'][r][n]['per_class'][c] for s, _ in loaded
             if n in s['runs'].get(r, {}) and c in s['runs'][r][n]['present']]
      cells.append(f'{min(got):.1f}' if got else '-')
    out.append(_row(cells))
  return '\n'.join(out) + '\n'


def main(argv):
  try:
    md = markdown(argv[1:])
  except errors.DataError as e:
    sys.exit(f'error: {e}')
  if FLAGS.out:
    files.atomic_write_text(FLAGS.out, md)
  else:
    print(md, end='')


if __name__ == '__main__':
  flags.DEFINE_string('out', '', 'write the Markdown here (default: print it)')
  app.run(main)
