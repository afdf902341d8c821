"""The pipeline's report: <workdir>/report/summary.json and report.html.

Every figure comes from the run: stage times from the stage records (and <workdir>/stages.json for skipped stages),
scores from each evaluation's results.json (seam_jax.infer.evaluation). summary.json holds every figure exactly as
report.html shows it (IoU in percent and seconds with one decimal, thresholds with two), and every numeric cell of the
HTML names its summary.json key (`data-key`, a '/'-separated path). For a few images a strip shows
image | ground truth | CAM | CRF | random walk | final prediction (and the CAM baseline's CAM and random walk when it
ran), one PNG tile per cell, written atomically. Class names, class count and colours are the run's data set's
(seam_jax.layout.dataset); a set without masks (the CSV format) has no evaluations: the report says so in place of
the mIoU tables.
"""
import datetime
import functools
import html
import json
import os
import shutil

import numpy as np
from PIL import Image

from seam_jax import layout, runner, stages
from seam_jax.common import files, visual
from seam_jax.infer import evaluation, score_dicts

RUN_TITLES = {'seam': 'SEAM', 'baseline': 'CAM baseline'}
TILE_HEIGHT = 96    # every tile is scaled to this height (label maps without interpolation)
NOT_EVALUATED = 'no ground truth: not evaluated'


def pct(x):
  return round(100 * float(x), 1)


def run_configs(config):
  """{'seam': config, 'baseline': its baseline config when compare_baseline}."""
  runs = {'seam': config}
  if config.pipeline.compare_baseline:
    runs['baseline'] = stages.baseline_config(config)
  return runs


def eval_title(name):
  if name.startswith('crf_'):
    return f'CRF, alpha {name[4:]}'
  return {'cam': 'CAM', 'rw': 'random walk', 'seg': 'segmentation'}.get(name, name)


# ------------------------------------------------------------------------------------------------ figures
def scores(res, config):
  """The reported figures of one results.json, rounded as shown."""
  b = stages.brief(res, config)
  out = {'miou': pct(b['miou']), 'miou_present': pct(b['miou_present'])}
  if 'best_threshold' in b:
    out['best_threshold'] = round(b['best_threshold'], 2)
  if 'miou_fixed' in b:
    out.update(fixed_threshold=round(b['fixed_threshold'], 2), miou_fixed=pct(b['miou_fixed']),
               miou_present_fixed=pct(b['miou_present_fixed']))
  out['per_class'] = {c: pct(r['iou']) for c, r in res['per_class'].items()}
  out['present'] = [c for c, r in res['per_class'].items() if r['present']]
  return out


def run_scores(config):
  """{evaluation name: scores} of every evaluation stage whose results.json exists, in pipeline order."""
  out = {}
  for st in stages.STAGES.values():
    for name, *_ in (st.evaluations(config) if st.evaluations else ()):
      path = stages.results_path(config, name)
      if os.path.isfile(path):
        with open(path) as f:
          out[name] = scores(json.load(f), config)
  return out


def stage_rows(config, records, runs_scores):
  """One row per stage record: run, stage, status, seconds now and of the run that made the outputs, and the
  mIoUs of its evaluations."""
  runs, rows = run_configs(config), []
  for rec in records:
    run, name = rec['stage'].split('/') if '/' in rec['stage'] else ('seam', rec['stage'])
    st = stages.STAGES[name]
    evals = [n for n, *_ in st.evaluations(runs[run])] if st.evaluations else []
    rows.append({'run': run, 'stage': name, 'status': rec['status'], 'seconds': round(rec['seconds'], 1),
                 'run_seconds': None if rec['run_seconds'] is None else round(rec['run_seconds'], 1),
                 'scores': {n: {k: runs_scores[run][n][k] for k in ('miou', 'miou_present')}
                            for n in evals if n in runs_scores[run]}})
  return rows


def stage_table(config, records):
  """The console table at the end of a pipeline run: every stage with its time and mIoU (over the K + 1 classes
  of the run and over those present), or a last line saying there was nothing to evaluate against."""
  rows = stage_rows(config, records, {r: run_scores(c) for r, c in run_configs(config).items()})
  evaluated = bool(layout.gt_dir(config))
  miou = f'   mIoU ({layout.num_outputs(config)} classes / present classes)' if evaluated else ''
  lines = [f'{"stage":<22}{"status":<9}{"time":>9}{miou}']
  for r in rows:
    name = r['stage'] if r['run'] == 'seam' else f'{r["run"]}/{r["stage"]}'
    t = runner.fmt_seconds(r['seconds'])
    made = f'(ran in {runner.fmt_seconds(r["run_seconds"])}) ' if r['status'] == 'skipped' and r['run_seconds'] else ''
    miou = ', '.join(f'{n} {s["miou"]:.1f} / {s["miou_present"]:.1f}' for n, s in r['scores'].items())
    lines.append(f'{name:<22}{r["status"]:<9}{t:>9}   {made}{miou}'.rstrip())
  return '\n'.join(lines + ([] if evaluated else [NOT_EVALUATED]))


# ------------------------------------------------------------------------------------------------ strips
def _label(dataset, path, img):
  del img
  return dataset.palette_array()[files.load_index_png(path)], 'label'


def _cam(dataset, path, img):
  cams = score_dicts.read(path, img.shape[:2], score_dicts.CAM, dataset.num_classes)
  heat = np.max(np.stack(list(cams.values())), 0) if cams else np.zeros(img.shape[:2], np.float32)
  return visual.overlay(img, heat), 'image'


def _crf(dataset, path, img):
  k, hw = dataset.num_classes, img.shape[:2]
  label = score_dicts.scores_label(score_dicts.read(path, hw, score_dicts.SCORES, k), hw, k)
  return dataset.palette_array()[label], 'label'


def strip_groups(config):
  """[(key, title, list name, [(column key, title, run config, path(config, id), render(path, uint8 image))])]: the
  pseudo labels on the evaluation list (+ the CAM baseline's), and the segmentation net's final prediction on its
  test list (the ground truth beside the image when the set has masks). render -> (RGB, 'image' | 'label'), label
  maps in the data set's colours."""
  runs, dataset = run_configs(config), layout.dataset(config)
  _label_, _cam_, _crf_ = (functools.partial(f, dataset) for f in (_label, _cam, _crf))
  first = [('image', 'image', config, layout.image_path, lambda path, img: (img, 'image'))]
  if layout.gt_dir(config):
    first.append(('truth', 'ground truth', config, lambda c, i: os.path.join(layout.gt_dir(c), i + '.png'), _label_))
  cols = first + [('cam', 'CAM (max over classes)', config, layout.cam_path, _cam_)]
  cols += [(f'crf_{float(a)}', f'CRF, alpha {float(a)}', config, lambda c, i, a=a: layout.crf_path(c, a, i), _crf_)
           for a in config.infer.crf_alphas]
  cols.append(('rw', 'random walk', config, layout.rw_path, _label_))
  if 'baseline' in runs:
    cols += [('baseline_cam', 'CAM baseline: CAM', runs['baseline'], layout.cam_path, _cam_),
             ('baseline_rw', 'CAM baseline: random walk', runs['baseline'], layout.rw_path, _label_)]
  groups = [('pseudo', 'Pseudo labels', config.eval.list, cols)]
  if 'seg' in config:
    groups.append(('seg', 'Final prediction of the segmentation net', config.seg.test_list,
                   first + [('seg', 'final prediction', config, layout.seg_pred_path, _label_)]))
  return groups


def _fit(rgb, kind):
  im = Image.fromarray(np.asarray(rgb, np.uint8))
  size = (max(1, round(im.width * TILE_HEIGHT / im.height)), TILE_HEIGHT)
  return np.asarray(im.resize(size, Image.NEAREST if kind == 'label' else Image.BILINEAR))


def strip_ids(config, list_name, last_column, n):
  """n ids spread evenly over a list (those whose last column's output exists, when there are any)."""
  ids = stages.ids_or_none(config, list_name) or []
  _, _, cfg, path, _ = last_column
  ids = [i for i in ids if os.path.isfile(path(cfg, i))] or ids
  return [ids[k * len(ids) // n] for k in range(min(n, len(ids)))]


def write_strips(config, out_dir):
  """Tiles of report.html's image strips under out_dir/tiles; returns [{'title', 'list', 'columns': [titles],
  'rows': [{'id', 'tiles': [relative path or None]}]}] of the groups with at least one output beside the image."""
  out = []
  for group, title, list_name, cols in strip_groups(config):
    rows = []
    for image_id in strip_ids(config, list_name, cols[-1], int(config.pipeline.report_images)):
      img = files.load_image(layout.image_path(config, image_id))
      tiles = []
      for key, _, cfg, path, render in cols:
        rel = os.path.join('tiles', f'{group}_{image_id}_{key}.png') if os.path.isfile(path(cfg, image_id)) else None
        if rel:
          files.save_rgb_png(os.path.join(out_dir, rel), _fit(*render(path(cfg, image_id), img)))
        tiles.append(rel)
      rows.append({'id': image_id, 'tiles': tiles})
    keep = [k for k in range(len(cols)) if any(r['tiles'][k] for r in rows)]
    if any(cols[k][0] not in ('image', 'truth') for k in keep):   # more than the image and its ground truth
      out.append({'title': title, 'list': list_name, 'columns': [cols[k][1] for k in keep],
                  'rows': [{'id': r['id'], 'tiles': [r['tiles'][k] for k in keep]} for r in rows]})
  return out


# ------------------------------------------------------------------------------------------------ report
def collect(config, records, out_dir):
  """summary.json's content (tiles and curve PNGs are written into out_dir on the way): with the data set's class
  names (mask values 0..K), their colours and whether it has ground truth."""
  runs = {r: run_scores(c) for r, c in run_configs(config).items()}
  dataset = layout.dataset(config)
  classes = list(evaluation.class_names(dataset))
  pal = dataset.palette_array()
  curves = {}
  for run, cfg in run_configs(config).items():
    src = os.path.join(layout.eval_dir(cfg, 'cam'), 'miou_curve.png')
    if os.path.isfile(src):
      curves[run] = f'curve_{run}.png'
      with open(src, 'rb') as f:
        files.atomic_write(os.path.join(out_dir, curves[run]), lambda g, f=f: shutil.copyfileobj(f, g))
  return {'workdir': os.path.abspath(config.workdir), 'generated': datetime.datetime.now().isoformat(' ', 'seconds'),
          'dataset': dataset.name, 'classes': classes, 'colours': [pal[k].tolist() for k in range(len(classes))],
          'ground_truth': bool(layout.gt_dir(config)), 'bg_threshold': float(config.infer.bg_threshold),
          'stages': stage_rows(config, records, runs), 'runs': runs, 'curves': curves,
          'strips': write_strips(config, out_dir)}


def write(config, records):
  """Write <workdir>/report/{summary.json, report.html} (+ PNGs); returns the path of report.html."""
  out_dir = layout.report_dir(config)
  summary = collect(config, records, out_dir)
  files.atomic_write_text(os.path.join(out_dir, 'summary.json'), json.dumps(summary, indent=1))
  path = os.path.join(out_dir, 'report.html')
  files.atomic_write_text(path, render(summary))
  return path


def _num(key, value):
  if value is None:
    return '<td class="na">&ndash;</td>'
  return f'<td class="num" data-key="{html.escape(key)}">{value}</td>'


def _table(head, rows):
  th = ''.join(f'<th>{h}</th>' for h in head)
  return f'<table><tr>{th}</tr>' + ''.join(f'<tr>{r}</tr>' for r in rows) + '</table>'


def _stage_section(s):
  """Every stage: run, status, times and (with ground truth) the mIoUs of its evaluations."""
  rows = []
  for k, r in enumerate(s['stages']):
    pre = f'stages/{k}'
    cells = (f'<td>{RUN_TITLES[r["run"]]}</td><td>{r["stage"]}</td><td class="{r["status"]}">{r["status"]}</td>'
             + _num(f'{pre}/seconds', r['seconds']) + _num(f'{pre}/run_seconds', r['run_seconds']))
    if not s['ground_truth']:
      rows.append(cells)
      continue
    evals = list(r['scores'].items()) or [(None, None)]
    for name, sc in evals:
      rows.append(cells + (f'<td>{eval_title(name)}</td>' + _num(f'{pre}/scores/{name}/miou', sc['miou'])
                           + _num(f'{pre}/scores/{name}/miou_present', sc['miou_present'])
                           if name else '<td></td><td></td><td></td>'))
      cells = '<td></td>' * 5
  head = ['run', 'stage', 'status', 'time of this run (s)', 'outputs made in (s)']
  if s['ground_truth']:
    head += ['evaluation', f'mIoU, {len(s["classes"])} classes (%)', 'mIoU, present classes (%)']
  return '<h2>Stages</h2>' + _table(head, rows)


def _results_section(s):
  runs = [r for r in RUN_TITLES if r in s['runs']]
  names = list(dict.fromkeys(n for r in runs for n in s['runs'][r]))
  rows = []
  for name in names:
    has = lambda k, name=name: any(k in s['runs'][r].get(name, {}) for r in runs)
    variants = [(', best background threshold' if has('best_threshold') else '', 'best_threshold', 'miou',
                 'miou_present')]
    if has('miou_fixed'):
      variants.append((', fixed background threshold', 'fixed_threshold', 'miou_fixed', 'miou_present_fixed'))
    for label, thr, m21, mp in variants:
      cells = f'<td>{eval_title(name)}{label}</td>'
      for r in runs:
        sc, pre = s['runs'][r].get(name, {}), f'runs/{r}/{name}'
        cells += ''.join(_num(f'{pre}/{k}', sc.get(k)) for k in (thr, m21, mp))
      rows.append(cells)
  miou = (f'mIoU, {len(s["classes"])} classes (%)', 'mIoU, present classes (%)')
  head = ['prediction'] + [f'{RUN_TITLES[r]}: {h}' for r in runs for h in ('threshold',) + miou]
  title = 'SEAM against the plain-CAM baseline' if len(runs) > 1 else 'Results'
  return f'<h2>{title}</h2>' + _table(head, rows)


def _class_section(s):
  cols = [(r, n) for r in RUN_TITLES if r in s['runs'] for n in s['runs'][r]]
  shown = [c for c in s['classes'] if any(c in s['runs'][r][n]['present'] for r, n in cols)]
  rows = []
  for c in shown:
    cells = f'<td>{c}</td>'
    for r, n in cols:
      cell = _num(f'runs/{r}/{n}/per_class/{c}', s['runs'][r][n]['per_class'][c])
      cells += cell if c in s['runs'][r][n]['present'] else cell.replace('class="num"', 'class="num absent"')
    rows.append(cells)
  head = ['class'] + [f'{RUN_TITLES[r]}: {eval_title(n)}' for r, n in cols]
  note = ('<p class="note">IoU (%) at each prediction\'s best background threshold for CAMs. Classes absent from '
          'the ground truth and from every prediction are left out (they count 0 in the '
          f'{len(s["classes"])}-class mIoU, as in the original); grey: absent from that prediction and its ground '
          'truth.</p>')
  return '<h2>IoU per class</h2>' + note + _table(head, rows)


def _figures_section(s):
  curves = ''.join(f'<figure><img src="{html.escape(p)}"><figcaption>{RUN_TITLES[r]}: CAM mIoU against the '
                   f'background threshold</figcaption></figure>' for r, p in s['curves'].items())
  present = {c for r in s['runs'].values() for sc in r.values() for c in sc['present']}
  legend = ''.join(f'<span class="sw" style="background:rgb{tuple(s["colours"][k])}"></span>{html.escape(c)} '
                   for k, c in enumerate(s['classes']) if c in present or not s['ground_truth'])
  out = (('<h2>Background-threshold curves</h2>' + curves if curves else '')
         + '<h2>Examples</h2><p class="legend">' + legend + '</p>')
  for st in s['strips']:
    rows = [f'<td>{html.escape(r["id"])}</td>' + ''.join(
        f'<td><img src="{html.escape(t)}"></td>' if t else '<td class="na">missing</td>' for t in r['tiles'])
            for r in st['rows']]
    out += f'<h3>{html.escape(st["title"])} ({html.escape(st["list"])} list)</h3>' + _table(['id'] + st['columns'],
                                                                                           rows)
  return out


STYLE = """body{font-family:sans-serif;margin:24px;color:#222;max-width:1180px}
table{border-collapse:collapse;margin:8px 0 20px}th,td{border:1px solid #ccc;padding:3px 8px;font-size:13px}
th{background:#f0f0f0;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums}
td.absent{color:#aaa}td.na{color:#aaa;text-align:center}td.skipped{color:#777}td.ran{color:#070}
figure{display:inline-block;margin:0 16px 0 0}figure img{width:540px}figcaption{font-size:12px;color:#555}
.sw{display:inline-block;width:12px;height:12px;border:1px solid #888;margin:0 4px 0 10px;vertical-align:middle}
.note,.legend{font-size:13px;color:#444}td img{display:block}"""


def render(s):
  """report.html of a summary (collect)."""
  n = len(s['classes'])
  if s['ground_truth']:
    scoring = (f'mIoU as the original: over all {n} classes (absent ones count 0), and over the classes present. '
               'Fixed background threshold: infer.bg_threshold.')
    results = _results_section(s) + _class_section(s)
  else:
    scoring, results = f'Stages and pseudo labels only, {NOT_EVALUATED} (the data set has no masks).', ''
  return (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>SEAM pipeline report</title>'
          f'<style>{STYLE}</style></head><body><h1>SEAM pipeline report</h1>'
          f'<p class="note">{html.escape(s["workdir"])}, written {html.escape(s["generated"])}; data set '
          f'{html.escape(s["dataset"])}, {n} classes (background included). {scoring}</p>'
          + _stage_section(s) + results + _figures_section(s) + '</body></html>')
