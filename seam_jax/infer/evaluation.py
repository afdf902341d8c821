"""Segmentation evaluation: confusion matrices, IoU, and the CAM background-threshold curve (SEAM_SPEC section 5).

Predictions are `.png` label maps, `.npy` CAM dicts or `.npy` CRF score dicts (seam_jax.infer.score_dicts). A CAM
dict becomes a label map by the original's rule (score_dicts.threshold_label): a zero-filled (K + 1, H, W) tensor,
class c at channel c + 1, channel 0 = the threshold t, prediction = np.argmax (ties -> lowest index, so a tie with t
goes to background). The original re-reads every file
for each of its 60 thresholds; here one pass yields the confusion matrices of all thresholds at once (see
`threshold_confusions`).

Confusion matrices are (K + 1, K + 2) int64 [gt, pred] for the K foreground classes of the run's data set
(seam_jax.data.dataset_info; VOC: K = 20, (21, 22)): rows are gt classes (the ignore label, VOC's void 255,
excluded), the extra last column counts gt pixels predicted as anything outside 0..K (e.g. 255 in a PNG): they
count in T_i but in no P_i, as in the original.
"""
import functools
import json
import os

from absl import logging
import numpy as np
from PIL import Image
from tqdm import tqdm

from seam_jax import layout
from seam_jax.common import distributed, errors, files, pools
from seam_jax.data import voc
from seam_jax.data.dataset_info import DatasetInfo
from seam_jax.infer import score_dicts

NC = voc.NUM_CLASSES   # the default class count (VOC's 21, background included)
EPS = 1e-10


def thresholds(spec):
  """(start, stop, step) -> float64 values start + i * step < stop, rounded to 10 decimals (0.03, not
  0.030000000000000002: the original uses i / 100)."""
  start, stop, step = (float(v) for v in spec)
  if step <= 0 or stop <= start:
    raise ValueError(f'bad eval.thresholds {spec}: need start < stop and step > 0')
  n = int(np.ceil(round((stop - start) / step, 9)))
  return np.array([round(start + i * step, 10) for i in range(n)])


def confusion(gt, pred, nc=NC, ignore=voc.IGNORE):
  """(nc, nc + 1) counts of (gt, pred) over gt != ignore (nc = K + 1 classes); predictions outside 0..nc-1 land in
  the last column."""
  gt = np.asarray(gt).reshape(-1)
  pred = np.asarray(pred).reshape(-1).astype(np.int64)
  keep = gt != ignore
  pred = np.where((pred >= 0) & (pred < nc), pred, nc)[keep]
  return np.bincount(gt[keep].astype(np.int64) * (nc + 1) + pred, minlength=nc * (nc + 1)).reshape(nc, nc + 1)


def threshold_confusions(cam_dict, gt, ts, path='cam dict', nc=NC, ignore=voc.IGNORE):
  """(T, nc, nc + 1) confusion matrices of one CAM dict (nc - 1 foreground classes) for every threshold of
  ascending `ts`, in one pass.

  With m = max over the fg channels and a = their first argmax + 1, the prediction at threshold t is a if
  float32(t) < m, else 0. So a pixel predicts a for the first n = #{t < m} thresholds and 0 after: one bincount of
  (n, gt, a) and cumulative sums over n give every threshold's matrix.
  """
  t = score_dicts.stack(cam_dict, gt.shape, nc - 1, path)
  keep = gt.reshape(-1) != ignore
  g = gt.reshape(-1)[keep].astype(np.int64)
  m = t.max(0).reshape(-1)[keep]
  a = t.argmax(0).reshape(-1)[keep].astype(np.int64) + 1
  ts32 = np.asarray(ts, np.float32)
  n = np.searchsorted(ts32, m, side='left')          # number of thresholds strictly below m
  nt = len(ts32)
  h = np.bincount((n * nc + g) * (nc + 1) + a, minlength=(nt + 1) * nc * (nc + 1)).reshape(nt + 1, nc, nc + 1)
  cum = np.cumsum(h, axis=0)                         # cum[j] = pixels with n <= j: background at threshold j
  conf = cum[-1][None] - cum[:nt]                    # n > j: predicted a
  conf[:, :, 0] += cum[:nt].sum(-1)
  return conf


def scores(conf):
  """IoU_i = TP/(T+P-TP+1e-10) of an (nc, nc + 1) confusion matrix; mIoU over all nc classes (QUIRK: absent
  classes count 0) and over present ones; FP_i/union and FN_i/union as the original."""
  conf = np.asarray(conf, np.float64)
  nc = len(conf)
  tp = np.diag(conf[:, :nc])
  t = conf.sum(1)
  p = conf[:, :nc].sum(0)
  union = t + p - tp + EPS
  iou = tp / union
  present = (t + p) > 0
  return {'iou': iou, 'miou': float(iou.mean()),
          'miou_present': float(iou[present].mean()) if present.any() else 0.,
          'present': present, 'fp': (p - tp) / union, 'fn': (t - tp) / union}


def _file_confusion(item, pred_type, ts, dataset):
  """Confusion(s) of one id: (T, K + 1, K + 2) for npy CAM dicts, (1, K + 1, K + 2) for crf score dicts and png
  labels (K: the DatasetInfo's classes; its mask values checked)."""
  pred_path, gt_path = item
  gt = files.load_index_png(gt_path, dataset.mask_values())
  k, cm = dataset.num_classes, dict(nc=dataset.num_classes + 1, ignore=dataset.ignore_label)
  if pred_type in ('npy', 'crf'):
    d = score_dicts.read(pred_path, gt.shape, score_dicts.SCORES if pred_type == 'crf' else score_dicts.CAM, k)
    if pred_type == 'crf':
      return confusion(gt, score_dicts.scores_label(d, gt.shape, k), **cm)[None]
    return threshold_confusions(d, gt, ts, pred_path, **cm)
  if not os.path.isfile(pred_path):
    raise errors.DataError(f'prediction not found: {pred_path}')
  try:
    with Image.open(pred_path) as im:
      pred = np.asarray(im)
  except Exception as e:  # noqa: BLE001
    raise errors.DataError(f'cannot decode prediction {pred_path}: {e}') from None
  if pred.shape != gt.shape:
    raise errors.DataError(f'{pred_path} has shape {pred.shape}, ground truth {gt_path} is {gt.shape}')
  return confusion(gt, pred, **cm)[None]


def _chunk_confusion(items, pred_type, ts, dataset):
  return sum(_file_confusion(it, pred_type, ts, dataset) for it in items), len(items)


def accumulate(pred_dir, gt_dir, ids, pred_type='npy', ts=(1.,), workers=0, chunk=8, dataset=DatasetInfo.VOC):
  """Summed confusion matrices over `ids` for the K classes of `dataset` (a DatasetInfo: classes, ignore label):
  (len(ts), K + 1, K + 2) for 'npy' (CAM dicts at every threshold), (1, K + 1, K + 2) for 'crf' (argmax of
  {0: bg, c + 1: fg} score dicts, as written by seam_jax.infer.crf) and 'png' (label images).

  Files are read in a process pool (spawn: no fork of a parent holding JAX threads); workers 0 = all cores,
  1 = in-process. With several processes each reads its share of the ids and the integer matrices are summed
  exactly across processes (every process returns the total). A missing prediction raises DataError naming the
  file before any work starts (checked over all ids, so every process raises it).
  """
  if pred_type not in ('npy', 'crf', 'png'):
    raise ValueError(f'eval.pred_type must be npy, crf or png, got {pred_type!r}')
  if not ids:
    raise errors.DataError('the evaluation list is empty')
  ext = 'png' if pred_type == 'png' else 'npy'
  items = [(os.path.join(pred_dir, f'{i}.{ext}'), os.path.join(gt_dir, f'{i}.png')) for i in ids]
  missing = [p for p, _ in items if not os.path.isfile(p)]
  if missing:
    raise errors.DataError(f'{len(missing)} predictions missing, e.g. {missing[0]}')
  items = distributed.process_share(items)
  ts = np.asarray(ts, np.float64)
  nc = dataset.num_classes + 1
  total = np.zeros((len(ts) if pred_type == 'npy' else 1, nc, nc + 1), np.int64)
  chunks = [items[k:k + chunk] for k in range(0, len(items), chunk)]
  fn = functools.partial(_chunk_confusion, pred_type=pred_type, ts=ts, dataset=dataset)
  with tqdm(total=len(items), desc=f'eval {pred_type}', leave=False) as bar:
    for conf, n in pools.pool_imap(fn, chunks, workers):
      total += conf
      bar.update(n)
  return distributed.sum_over_processes(total, 'confusion')


def class_names(dataset):
  """The names of the mask values 0..K: 'background', then the data set's classes."""
  return (voc.CLASSES[0],) + tuple(dataset.classes)


def summarize(confs, ts, names=voc.CLASSES):
  """results.json content: the mIoU curve, the best threshold and its per-class table (`names`: of classes 0..K)
  and confusion matrix."""
  all_scores = [scores(c) for c in confs]
  best = int(np.argmax([s['miou'] for s in all_scores]))
  s = all_scores[best]
  table = {name: {'iou': float(s['iou'][i]), 'fp': float(s['fp'][i]), 'fn': float(s['fn'][i]),
                  'present': bool(s['present'][i])} for i, name in enumerate(names)}
  k = len(names) - 1
  out = {'miou': s['miou'], 'miou_present': s['miou_present'], 'per_class': table,
         'confusion': confs[best].tolist(), 'confusion_layout': f'[gt 0..{k}][pred 0..{k}, other]'}
  if ts is not None:
    out.update(thresholds=[float(t) for t in ts], miou_curve=[a['miou'] for a in all_scores],
               miou_present_curve=[a['miou_present'] for a in all_scores], best_threshold=float(ts[best]))
  return out


def format_table(res):
  """The console table of a results.json: per class IoU, FP/U, FN/U, then the mIoUs."""
  lines = [f'{"class":<14}{"IoU":>8}{"FP/U":>8}{"FN/U":>8}']
  for name, r in res['per_class'].items():
    lines.append(f'{name:<14}{100 * r["iou"]:8.2f}{r["fp"]:8.3f}{r["fn"]:8.3f}' + ('' if r['present'] else '  absent'))
  thr = f' at threshold {res["best_threshold"]:.2f}' if 'best_threshold' in res else ''
  lines.append(f'mIoU{thr}: {100 * res["miou"]:.2f} ({len(res["per_class"])} classes), '
               f'{100 * res["miou_present"]:.2f} (present classes)')
  return '\n'.join(lines)


def plot_curve(res, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.plot(res['thresholds'], [100 * v for v in res['miou_curve']], label=f'mIoU ({len(res["per_class"])} classes)')
  ax.plot(res['thresholds'], [100 * v for v in res['miou_present_curve']], '--', label='mIoU (present classes)')
  ax.axvline(res['best_threshold'], color='gray', lw=0.8)
  ax.set_xlabel('background threshold')
  ax.set_ylabel('mIoU (%)')
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  with files.atomic_path(path, '.png') as tmp:
    fig.savefig(tmp, dpi=100)
  plt.close(fig)


def evaluate(config, pred_dir=None, pred_type=None, list_name=None, out_dir=None):
  """Evaluate the predictions in `pred_dir` of `pred_type` on the list `list_name` (defaults: eval.pred_dir ('' =
  infer.cam_dir), eval.pred_type, eval.list); write results.json (+ curve PNG) into `out_dir` (default
  layout.eval_dir) for the run's class set (layout.dataset). With several processes all share the reading, process 0
  writes, and all return the same results. A data set without masks (layout.gt_dir '': the CSV format) is a
  DataError."""
  e = config.eval
  gt_dir = layout.gt_dir(config)
  if not gt_dir:
    raise errors.DataError(f'no ground truth: data.format {config.data.format!r} has no masks to evaluate against '
                           '(set eval.gt_dir to a folder of masks)')
  dataset = layout.dataset(config)
  pred_dir, pred_type = pred_dir or layout.eval_pred_dir(config), pred_type or e.pred_type
  ids = layout.read_ids(config, list_name or e.list)
  out_dir = out_dir or layout.eval_dir(config)
  ts = thresholds(e.thresholds) if pred_type == 'npy' else None
  confs = accumulate(pred_dir, gt_dir, ids, pred_type, ts if ts is not None else (1.,), e.workers, dataset=dataset)
  res = summarize(confs, ts, class_names(dataset))
  res.update(pred_dir=pred_dir, gt_dir=gt_dir, pred_type=pred_type, num_images=len(ids))
  if distributed.is_main():
    files.atomic_write_text(os.path.join(out_dir, 'results.json'), json.dumps(res, indent=1))
    if ts is not None:
      plot_curve(res, os.path.join(out_dir, 'miou_curve.png'))
    print(format_table(res))
    logging.info('evaluated %d images of %s: mIoU %.2f; results in %s', len(ids), pred_dir, 100 * res['miou'],
                 out_dir)
  distributed.barrier('evaluation')
  return res
