"""seam_jax.compare_runs: several runs' report summaries -> the README's Markdown tables (means, ranges, minima)."""
import json
import os

import pytest

from seam_jax import compare_runs
from seam_jax.common import errors
from seam_jax.data import voc


def fake_run(workdir, seed, classes, cam, rw, seconds, baseline_rw=None):
  """A workdir with report/summary.json and stages.json shaped as seam_jax.report / seam_jax.stages write them."""
  def ev(miou_present, per_class, fixed=None):
    out = {'miou': 0., 'miou_present': miou_present, 'present': ['background'] + list(per_class),
           'per_class': {c: {'background': 80., **per_class}.get(c, 0.) for c in voc.CLASSES}}
    if fixed is not None:
      out['miou_present_fixed'] = fixed
    return out
  runs = {'seam': {'cam': ev(cam, dict(zip(classes, (60., 40.))), fixed=cam - 10),
                   'rw': ev(rw, dict(zip(classes, (70., 55.))))}}
  stage_rows = [{'run': 'seam', 'stage': 'train', 'seconds': 0., 'run_seconds': seconds}]
  if baseline_rw is not None:
    runs['baseline'] = {'rw': ev(baseline_rw, dict(zip(classes, (30., 20.))))}
    stage_rows.append({'run': 'baseline', 'stage': 'train', 'seconds': 30., 'run_seconds': None})
  os.makedirs(os.path.join(workdir, 'report'))
  with open(os.path.join(workdir, 'report', 'summary.json'), 'w') as f:
    json.dump({'runs': runs, 'stages': stage_rows}, f)
  with open(os.path.join(workdir, 'stages.json'), 'w') as f:
    json.dump({'demo': {'summary': {'seed': seed, 'class_hist': {'all': {c: 5 for c in classes}}}}}, f)
  return str(workdir)


def test_table_means_ranges_and_lowest_class(tmp_path):
  a = fake_run(tmp_path / 'a', 0, ['cat', 'dog'], cam=50., rw=60., seconds=120., baseline_rw=40.)
  b = fake_run(tmp_path / 'b', 1, ['cat', 'bus'], cam=54., rw=66., seconds=180.)
  md = compare_runs.markdown([a, b])
  rows = [[c.strip() for c in l.strip('|').split('|')] for l in md.splitlines() if l.startswith('| ')]
  head = rows[0]
  for col, want_a, want_b, want_mean in (('SEAM: CAM', '50.0', '54.0', '52.0 (50.0-54.0)'),
                                         ('SEAM: CAM, fixed threshold', '40.0', '44.0', '42.0 (40.0-44.0)'),
                                         ('SEAM: random walk', '60.0', '66.0', '63.0 (60.0-66.0)'),
                                         ('CAM baseline: random walk', '40.0', '-', '40.0 (40.0-40.0)')):
    k = head.index(col)
    assert [rows[2][k], rows[3][k], rows[4][k]] == [want_a, want_b, want_mean], col
  assert 'seed 0, cat, dog' in rows[2][1] and rows[2][2] == '2.0 min + 0.5 min' and rows[3][2] == '3.0 min'
  lowest = {r[0]: r for r in rows if r[0] in ('cat', 'dog', 'bus', 'background')}
  k = rows[5].index('SEAM: random walk')
  assert lowest['cat'][1] == '2' and lowest['cat'][k] == '70.0'      # cat is the first class in both runs
  assert lowest['dog'][1] == '1' and lowest['dog'][k] == '55.0' and lowest['bus'][k] == '55.0'
  assert list(lowest) == ['background', 'bus', 'cat', 'dog']          # VOC order


def test_missing_report_names_the_file(tmp_path):
  with pytest.raises(errors.DataError, match='summary.json'):
    compare_runs.markdown([str(tmp_path)])
