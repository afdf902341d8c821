"""Evaluation: hand-computed confusion matrices and IoU, the one-pass threshold curve against a brute-force
re-implementation of the original per-threshold loop, files, outputs and the entry point."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import voc12
from seam_jax.common import errors, files
from seam_jax.data import voc
from seam_jax.infer import evaluation, score_dicts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_confusion_and_scores_by_hand():
  gt = np.array([[0, 0, 1, 1],
                 [0, 255, 1, 2],
                 [255, 255, 2, 2]], np.uint8)
  pred = np.array([[0, 1, 1, 1],
                   [0, 3, 2, 2],
                   [5, 7, 2, 255]], np.uint8)
  conf = evaluation.confusion(gt, pred)
  want = np.zeros((21, 22), np.int64)
  want[0, 0], want[0, 1] = 2, 1          # gt 0: two right, one as 1
  want[1, 1], want[1, 2] = 2, 1          # gt 1: two right, one as 2
  want[2, 2], want[2, 21] = 2, 1         # gt 2: two right, one predicted 255 (no class)
  np.testing.assert_array_equal(conf, want)  # void gt pixels ignored, whatever was predicted there
  s = evaluation.scores(conf)
  # T = (3, 3, 3), P = (2, 3, 3), TP = (2, 2, 2): IoU = TP / (T + P - TP)
  np.testing.assert_allclose(s['iou'][:3], [2 / 3, 2 / 4, 2 / 4], rtol=1e-9)
  assert np.all(s['iou'][3:] == 0) and not s['present'][3:].any()  # classes 3..20 absent from gt and prediction
  assert s['miou'] == pytest.approx((2 / 3 + 0.5 + 0.5) / 21)      # QUIRK: averaged over all 21 classes
  assert s['miou_present'] == pytest.approx((2 / 3 + 0.5 + 0.5) / 3)
  np.testing.assert_allclose(s['fp'][:3], [0 / 3, 1 / 4, 1 / 4])  # (P - TP) / union
  np.testing.assert_allclose(s['fn'][:3], [1 / 3, 1 / 4, 1 / 4])  # (T - TP) / union


def test_thresholds_are_the_originals_i_over_100():
  ts = evaluation.thresholds((0.0, 0.6, 0.01))
  assert len(ts) == 60 and ts.tolist() == [i / 100.0 for i in range(60)]


def brute_force(cam_dict, gt, t):
  """The original's loop body for one threshold: zero-filled (21, H, W), channel 0 = t, argmax, then per-class
  counts P, T, TP over gt < 255."""
  tensor = np.zeros((21,) + gt.shape, np.float32)
  for k, v in cam_dict.items():
    tensor[k + 1] = v
  tensor[0] = t
  pred = np.argmax(tensor, axis=0).astype(np.uint8)
  cal = gt < 255
  mask = (pred == gt) * cal
  p = [np.sum((pred == i) * cal) for i in range(21)]
  tt = [np.sum((gt == i) * cal) for i in range(21)]
  tp = [np.sum((gt == i) * mask) for i in range(21)]
  return np.array(p), np.array(tt), np.array(tp)


def random_case(rng, h=23, w=31, classes=(2, 7, 14)):
  gt = rng.choice(np.r_[0, np.array(classes) + 1, 255, 19], size=(h, w)).astype(np.uint8)
  cams = {c: rng.uniform(-0.05, 1, (h, w)).astype(np.float32) for c in classes}
  q = rng.integers(0, 60, (h, w)) / 100.0                            # exact ties with the thresholds...
  cams[classes[0]][::3] = q[::3].astype(np.float32)
  cams[classes[1]][:, ::4] = cams[classes[0]][:, ::4]                  # ... and between classes
  return cams, gt


def check_against_brute_force(conf, cases, ts):
  for j, t in enumerate(ts):
    p, tt, tp = (sum(x) for x in zip(*(brute_force(c, g, t) for c, g in cases)))
    np.testing.assert_array_equal(conf[j, :, :21].sum(0), p)
    np.testing.assert_array_equal(conf[j].sum(1), tt)
    np.testing.assert_array_equal(np.diag(conf[j, :, :21]), tp)


def test_threshold_confusions_match_brute_force():
  rng = np.random.default_rng(0)
  ts = evaluation.thresholds((0.0, 0.6, 0.01))
  cases = [random_case(rng) for _ in range(3)] + [({}, random_case(rng)[1])]  # an image with no CAM at all
  conf = sum(evaluation.threshold_confusions(c, g, ts) for c, g in cases)
  check_against_brute_force(conf, cases, ts)


def test_tie_with_the_threshold_goes_to_background():
  gt = np.zeros((1, 3), np.uint8)
  cams = {4: np.array([[0.3, 0.31, 0.29]], np.float32)}
  conf = evaluation.threshold_confusions(cams, gt, [0.3])[0]
  assert conf[0, 0] == 2 and conf[0, 5] == 1  # 0.3 == t -> background; only 0.31 beats it


def write_case(tmp_path, rng, n=5):
  pred, gt_dir = tmp_path / 'cam', tmp_path / 'gt'
  pred.mkdir()
  gt_dir.mkdir()
  ids, cases = [f'img{k}' for k in range(n)], []
  for i in ids:
    cams, gt = random_case(rng, *rng.integers(15, 30, 2))
    files.save_npy_dict(str(pred / f'{i}.npy'), cams)
    files.save_label_png(str(gt_dir / f'{i}.png'), gt)
    cases.append((cams, gt))
  return ids, cases, str(pred), str(gt_dir)


def test_accumulate_in_a_process_pool_matches_brute_force(tmp_path):
  rng = np.random.default_rng(1)
  ids, cases, pred, gt = write_case(tmp_path, rng)
  ts = evaluation.thresholds((0.0, 0.6, 0.01))
  conf = evaluation.accumulate(pred, gt, ids, 'npy', ts, workers=2, chunk=2)
  check_against_brute_force(conf, cases, ts)
  np.testing.assert_array_equal(conf, evaluation.accumulate(pred, gt, ids, 'npy', ts, workers=1))


def test_missing_or_mismatched_prediction_names_the_file(tmp_path):
  rng = np.random.default_rng(2)
  ids, _, pred, gt = write_case(tmp_path, rng, 2)
  with pytest.raises(errors.DataError, match='nothere.npy'):
    evaluation.accumulate(pred, gt, ids + ['nothere'], 'npy', [0.1], workers=1)
  files.save_npy_dict(os.path.join(pred, 'img0.npy'), {3: np.zeros((4, 4), np.float32)})
  with pytest.raises(errors.DataError, match='img0.npy'):
    evaluation.accumulate(pred, gt, ids, 'npy', [0.1], workers=1)


def make_config(tmp_path, ids, pred, gt, pred_type='npy'):
  c = voc12.get_config()
  list_dir = tmp_path / 'lists'
  list_dir.mkdir(exist_ok=True)
  voc.write_list(str(list_dir / 'train.txt'), ids)
  c.data.list_dir = str(list_dir)
  c.eval.list, c.eval.pred_dir, c.eval.gt_dir, c.eval.pred_type = 'train', pred, gt, pred_type
  c.eval.out_dir = str(tmp_path / 'eval')
  c.eval.workers = 1
  return c


def test_evaluate_writes_results_and_curve(tmp_path, capsys):
  rng = np.random.default_rng(3)
  ids, cases, pred, gt = write_case(tmp_path, rng, 3)
  res = evaluation.evaluate(make_config(tmp_path, ids, pred, gt))
  with open(tmp_path / 'eval' / 'results.json') as f:
    saved = json.load(f)
  assert saved['miou'] == pytest.approx(res['miou']) and len(saved['miou_curve']) == 60
  best = int(np.argmax(saved['miou_curve']))
  assert saved['best_threshold'] == best / 100 and saved['miou'] == max(saved['miou_curve'])
  conf = sum(evaluation.threshold_confusions(c, g, [best / 100]) for c, g in cases)[0]
  assert saved['confusion'] == conf.tolist()
  assert saved['per_class']['aeroplane']['present'] is False and not saved['per_class']['background']['iou'] == 0
  assert os.path.getsize(tmp_path / 'eval' / 'miou_curve.png') > 1000
  assert 'mIoU at threshold' in capsys.readouterr().out


def test_png_predictions(tmp_path):
  rng = np.random.default_rng(4)
  gt_dir, pred_dir = tmp_path / 'gt', tmp_path / 'pred'
  gts = [rng.choice([0, 1, 15, 255], (12, 9)).astype(np.uint8) for _ in range(2)]
  preds = [rng.choice([0, 1, 15, 20], (12, 9)).astype(np.uint8) for _ in range(2)]
  for k, (g, p) in enumerate(zip(gts, preds)):
    files.save_label_png(str(gt_dir / f'{k}.png'), g)
    files.save_label_png(str(pred_dir / f'{k}.png'), p)
  res = evaluation.evaluate(make_config(tmp_path, ['0', '1'], str(pred_dir), str(gt_dir), 'png'))
  want = evaluation.scores(sum(evaluation.confusion(g, p) for g, p in zip(gts, preds)))
  assert res['miou'] == pytest.approx(want['miou']) and 'miou_curve' not in res


def run_entry(*args):
  return subprocess.run([sys.executable, 'evaluate.py', *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=900, env=dict(os.environ, PYTHONPATH=ROOT))


@pytest.mark.slow
def test_entry_point(tmp_path):
  rng = np.random.default_rng(5)
  ids, _, pred, gt = write_case(tmp_path, rng, 2)
  voc.write_list(str(tmp_path / 'ids.txt'), ids)
  common = [f'--config.eval.pred_dir={pred}', f'--config.eval.gt_dir={gt}', f'--config.eval.out_dir={tmp_path}/ev',
            '--config.eval.workers=1', f'--config.workdir={tmp_path}/work']
  ok = run_entry(f'--config.eval.list={tmp_path}/ids.txt', *common)
  assert ok.returncode == 0, ok.stderr
  # evaluate.py with eval.pred_dir runs the eval_custom stage: results in <eval.out_dir>/custom/
  assert 'mIoU at threshold' in ok.stdout and os.path.isfile(tmp_path / 'ev' / 'custom' / 'results.json')
  again = run_entry(f'--config.eval.list={tmp_path}/ids.txt', *common)
  assert '] eval_custom: skipped: outputs complete' in again.stdout
  voc.write_list(str(tmp_path / 'more.txt'), ids + ['ghost'])
  bad = run_entry(f'--config.eval.list={tmp_path}/more.txt', *common)
  assert bad.returncode != 0 and 'ghost.npy' in bad.stderr and 'Traceback' not in bad.stderr


def test_crf_score_dicts_argmax_over_labels(tmp_path):
  """pred_type 'crf': the label of a {0: bg, c + 1: score} dict (seam_jax.infer.crf output) is its highest-scoring
  key."""
  gt = np.array([[0, 0, 3], [15, 15, 255]], np.uint8)
  bg = np.array([[.9, .2, .1], [.1, .3, .5]], np.float32)
  s3 = np.array([[.1, .5, .8], [.2, .2, .1]], np.float32)
  s15 = np.array([[.0, .5, .1], [.7, .6, .4]], np.float32)   # tie at (0, 1) with 3: the earlier key wins
  want = np.array([[0, 3, 3], [15, 15, 0]], np.uint8)
  d = {0: bg, 3: s3, 15: s15}
  np.testing.assert_array_equal(score_dicts.scores_label(d, gt.shape), want)
  pred, gtd = tmp_path / 'crf', tmp_path / 'gt'
  pred.mkdir()
  gtd.mkdir()
  files.save_npy_dict(str(pred / 'a.npy'), d)
  files.save_label_png(str(gtd / 'a.png'), gt)
  res = evaluation.evaluate(make_config(tmp_path, ['a'], str(pred), str(gtd), 'crf'))
  np.testing.assert_array_equal(res['confusion'], evaluation.confusion(gt, want))
  with pytest.raises(errors.DataError, match='keys'):
    score_dicts.scores_label({21: bg}, gt.shape)
  with pytest.raises(errors.DataError, match='shape'):
    score_dicts.scores_label({0: bg[:1]}, gt.shape)
