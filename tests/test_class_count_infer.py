"""Issue 22 for inference, evaluation and reporting: a data set of K = 7 classes (dataset.json in the list folder)
reaches every stage function: CAM dicts of 7 channels, CRF over 8 labels, the random walk over 8 channels, IoUs over
8 classes named as the data set names them, the report and compare_runs tables, predict's palette and legend; an
evaluation without ground truth is refused and the report says it was not evaluated."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from configs import demo
from seam_jax import compare_runs, layout, report
from seam_jax.common import errors, files, visual
from seam_jax.data import voc
from seam_jax.data.dataset_info import DatasetInfo
from seam_jax.infer import cam_inference, crf, evaluation, predict, random_walk, score_dicts
from seam_jax.models import build, export

NAMES = ('apple', 'kiwi', 'fig', 'lime', 'plum', 'pear', 'date')
K = len(NAMES)
PALETTE = [[0, 0, 0]] + [[30 * k, 255 - 30 * k, 7 * k] for k in range(1, K + 1)]
TOY = DatasetInfo('toy', NAMES, ignore_label=100, palette=PALETTE)
HW = (24, 32)
IDS = ('img_a', 'img_b')

# Hand-made mask and prediction (ignore label 100). Pixels scored (gt, pred): (0,0) (0,1) (7,7) (7,7) (1,1) (1,1)
# (7,0) (3,3) (3,8) (0,0); 8 lies outside 0..7 (the 'other' column). T = (3, 2, 0, 2, 0, 0, 0, 3), P = (3, 3, 0, 1, 0,
# 0, 0, 2), TP = (2, 2, 0, 1, 0, 0, 0, 2): IoU = TP / (T + P - TP) = 2/4, 2/3, 1/2, 2/3 for classes 0, 1, 3, 7.
GT = np.array([[0, 0, 7, 7], [1, 1, 7, 100], [100, 3, 3, 0]], np.uint8)
PRED = np.array([[0, 1, 7, 7], [1, 1, 0, 5], [2, 3, 8, 0]], np.uint8)
IOU = {'background': 2 / 4, 'apple': 2 / 3, 'fig': 1 / 2, 'date': 2 / 3}


def toy_config(tmp, **eval_fields):
  """A VOC-layout run of the toy set in `tmp`: images of IDS, dataset.json, lists, 7-wide labels (class 6 in both
  images)."""
  c = demo.get_config()
  c.workdir = str(tmp)
  c.data.voc_root, c.data.list_dir = os.path.join(tmp, 'VOC'), os.path.join(tmp, 'lists')
  os.makedirs(c.data.list_dir, exist_ok=True)
  TOY.write(c.data.list_dir)
  rng = np.random.default_rng(0)
  for i in IDS:
    files.save_rgb_png(os.path.join(c.data.voc_root, 'JPEGImages', i + '.jpg'),
                       (rng.random(HW + (3,)) * 255).astype(np.uint8))
  for name in ('train', 'val'):
    voc.write_list(os.path.join(c.data.list_dir, name + '.txt'), IDS)
  files.save_npy_dict(layout.cls_labels(c), {i: np.eye(K, dtype=np.float32)[[0, 6]].sum(0) for i in IDS})
  c.infer.update(list='train', scales=(1.0,), flip=False, bucket=32, batch_size=8, threads=1, crf_workers=1)
  c.eval.update(workers=1, list='val', **eval_fields)
  c.pipeline.report_images = 1
  return c


def random_variables(kind, num_classes):
  """Random weights of a width_div 32 network with `num_classes` outputs, from shapes (no compiled init): He-normal
  kernels, BatchNorm statistics near identity."""
  mc = demo.get_config().model
  mc.width_div = 32
  shapes = jax.eval_shape(build(kind, mc, num_classes=num_classes).init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  rng = np.random.default_rng(1)

  def draw(path, s):
    if path[-1].key == 'kernel':
      return rng.normal(0, np.sqrt(2 / np.prod(s.shape[:-1])), s.shape).astype(np.float32)
    if path[-1].key in ('scale', 'var'):
      return rng.uniform(0.8, 1.2, s.shape).astype(np.float32)
    return rng.normal(0, 0.1, s.shape).astype(np.float32)
  return mc, jax.tree_util.tree_map_with_path(draw, shapes)


def test_evaluation_of_seven_classes_by_hand(tmp_path, capsys):
  c = toy_config(tmp_path, gt_dir=str(tmp_path / 'gt'))
  for i in IDS:
    TOY.save_mask(str(tmp_path / 'gt' / f'{i}.png'), GT)
    TOY.save_mask(str(tmp_path / 'pred' / f'{i}.png'), PRED)
  res = evaluation.evaluate(c, str(tmp_path / 'pred'), 'png', out_dir=str(tmp_path / 'eval'))
  assert list(res['per_class']) == ['background', *NAMES]
  assert {n: r['iou'] for n, r in res['per_class'].items() if r['present']} == pytest.approx(IOU)
  assert res['miou'] == pytest.approx(sum(IOU.values()) / (K + 1))      # 7/24: absent classes count 0
  assert res['miou_present'] == pytest.approx(sum(IOU.values()) / 4)
  assert np.shape(res['confusion']) == (K + 1, K + 2) and res['confusion'][3][K + 1] == 2   # (3, 8) twice
  assert res['confusion_layout'] == '[gt 0..7][pred 0..7, other]'
  assert json.load(open(tmp_path / 'eval' / 'results.json'))['per_class'].keys() == res['per_class'].keys()
  assert f'{100 * 7 / 24:.2f} (8 classes)' in capsys.readouterr().out
  TOY.save_mask(str(tmp_path / 'gt' / 'img_b.png'), np.full((3, 4), 9, np.uint8))   # VOC's, not the toy's
  with pytest.raises(errors.DataError, match='img_b.png'):
    evaluation.evaluate(c, str(tmp_path / 'pred'), 'png', out_dir=str(tmp_path / 'eval'))


def test_cam_threshold_curve_over_seven_classes():
  gt = np.array([[0, 7], [3, 100]], np.uint8)
  cams = {6: np.array([[0.1, 0.9], [0., 0.5]], np.float32), 2: np.array([[0., 0.], [0.6, 0.]], np.float32)}
  conf = evaluation.threshold_confusions(cams, gt, [0.2, 0.7], nc=K + 1, ignore=100)
  assert conf.shape == (2, K + 1, K + 2)
  for t, c in zip([0.2, 0.7], conf):
    want = evaluation.confusion(gt, score_dicts.threshold_label(cams, gt.shape, t, K), K + 1, 100)
    np.testing.assert_array_equal(c, want)


def test_no_ground_truth_is_refused(tmp_path):
  c = toy_config(tmp_path)
  c.data.format = 'csv'
  with pytest.raises(errors.DataError, match='no ground truth.*csv'):
    evaluation.evaluate(c, str(tmp_path / 'pred'), 'png')


def test_score_dicts_of_seven_classes(tmp_path):
  cam = {0: np.full(HW, 0.2, np.float32), 6: np.full(HW, 0.7, np.float32)}
  score_dicts.write(str(tmp_path / 'c.npy'), cam, HW, score_dicts.CAM, K)
  back = score_dicts.read(str(tmp_path / 'c.npy'), HW, score_dicts.CAM, K)
  assert sorted(back) == [0, 6] and all(np.array_equal(back[k], cam[k]) for k in cam)
  assert score_dicts.stack(back, HW, K).shape == (K,) + HW
  assert score_dicts.dense_power_stack(back, HW, 2., K).shape == (K + 1,) + HW
  assert np.unique(score_dicts.threshold_label(back, HW, 0.5, K)).tolist() == [K]
  scores = {0: cam[0], K: cam[6]}
  score_dicts.write(str(tmp_path / 's.npy'), scores, HW, score_dicts.SCORES, K)
  assert np.unique(score_dicts.scores_label(score_dicts.read(str(tmp_path / 's.npy'), HW, score_dicts.SCORES, K),
                                            HW, K)).tolist() == [K]
  with pytest.raises(errors.DataError, match='keys 0..6'):
    score_dicts.write(str(tmp_path / 'bad.npy'), {K: cam[0]}, HW, score_dicts.CAM, K)


def test_cam_inference_writes_seven_channel_dicts(tmp_path):
  """run_inference on the toy set, with the SEAM export of an 8-output head: dicts of the label classes 0 and 6,
  label PNGs in the toy palette."""
  c = toy_config(tmp_path)
  c.infer.label_dir = str(tmp_path / 'cam_png')
  mc, variables = random_variables('seam', K + 1)
  c.model.width_div, c.model.fast_compile = mc.width_div, True
  c.infer.checkpoint = str(tmp_path / 'seam_export')
  export.save_export(c.infer.checkpoint, variables, 'seam', c.model)
  stats = cam_inference.run_inference(c)
  assert stats['images'] == len(IDS)
  for i in IDS:
    cams = score_dicts.read(layout.cam_path(c, i), HW, score_dicts.CAM, K)
    assert sorted(cams) == [0, 6]
    with Image.open(layout.cam_label_path(c, i)) as im:
      assert np.array_equal(np.reshape(im.getpalette()[:3 * (K + 1)], (K + 1, 3)), PALETTE)
      assert set(np.unique(np.asarray(im)).tolist()) <= {0, 1, K}


def test_crf_over_eight_labels(tmp_path):
  img = (np.random.default_rng(2).random(HW + (3,)) * 255).astype(np.uint8)
  probs = np.random.default_rng(3).dirichlet(np.ones(K + 1), HW).transpose(2, 0, 1).astype(np.float32)
  out = crf.crf_inference(img, probs, 2, labels=K + 1)
  assert out.shape == (K + 1,) + HW
  np.testing.assert_allclose(out.sum(0), 1, rtol=1e-4)
  # The stage: the toy's CAM dicts in, {0, 1, 7} score dicts out; a key of the VOC range but not of the toy's refused.
  c = toy_config(tmp_path)
  c.infer.crf_alphas, c.infer.crf_iters = (4.0,), 2
  for i in IDS:
    score_dicts.write(layout.cam_path(c, i), {0: probs[1], 6: probs[2]}, HW, score_dicts.CAM, K)
  crf.run_crf(c)
  assert sorted(score_dicts.read(layout.crf_path(c, 4.0, IDS[0]), HW, score_dicts.SCORES, K)) == [0, 1, K]
  files.save_npy_dict(layout.cam_path(c, IDS[1]), {9: probs[1]})
  with pytest.raises(errors.DataError, match=IDS[1]):
    crf.run_crf(c, force=True)


def test_random_walk_over_eight_channels(tmp_path):
  """The host walk of a 7-class CAM dict: (8, dh, dw), the first 8 channels of the same walk over VOC's 21 (absent
  classes stay zero); saved as a 7-class score dict and a label PNG in the toy palette."""
  h, w = 64, 80
  cam = {2: np.linspace(0, 1, h * w, dtype=np.float32).reshape(h, w), 6: np.full((h, w), 0.3, np.float32)}
  cams = random_walk.pooled_cams(cam, h, w, 4., K)
  assert cams.shape == (K + 1, h // 8, w // 8)
  radius = random_walk.walk_radius(h, w, 5)
  assert radius >= 2   # pairs to walk over
  aff = np.random.default_rng(4).random(random_walk.pair_indices(h // 8, w // 8, radius)[1].size)
  rw = random_walk.random_walk_numpy(aff, cams, radius, 8., 3)
  rw20 = random_walk.random_walk_numpy(aff, random_walk.pooled_cams(cam, h, w, 4.), radius, 8., 3)
  assert rw.shape == (K + 1, h // 8, w // 8)
  np.testing.assert_allclose(rw, rw20[:K + 1], rtol=1e-12)
  label, scores = random_walk.labels_numpy(rw, (h, w))
  assert scores.shape == (K + 1, h, w) and set(np.unique(label).tolist()) <= {0, 3, K}
  cam_path = str(tmp_path / 'cam.npy')
  score_dicts.write(cam_path, cam, (h, w), score_dicts.CAM, K)
  paths = (str(tmp_path / 'rw.png'), str(tmp_path / 'rw.npy'))
  result = ('x', ((h, w), cam_path, paths), [(aff, None)])
  assert random_walk._host_walk(result, {'alpha': 4., 'beta': 8., 'logt': 3}, 5, TOY) == 2
  assert sorted(score_dicts.read(paths[1], (h, w), score_dicts.SCORES, K)) == [0, 3, K]
  with Image.open(paths[0]) as im:
    assert np.array_equal(np.asarray(im), label) and im.getpalette()[3 * K:3 * K + 3] == PALETTE[K]


def write_run_outputs(c, evaluated):
  """rw PNGs of the toy run (+ with `evaluated` the rw evaluation's results.json)."""
  for i in IDS:
    TOY.save_mask(layout.rw_path(c, i), np.pad(PRED, ((0, HW[0] - 3), (0, HW[1] - 4))) % (K + 1))
  if evaluated:
    for i in IDS:
      TOY.save_mask(os.path.join(c.eval.gt_dir, f'{i}.png'), np.pad(GT, ((0, HW[0] - 3), (0, HW[1] - 4))))
    evaluation.evaluate(c, layout.rw_dir(c), 'png', out_dir=layout.eval_dir(c, 'rw'))
  return [{'stage': 'eval_rw', 'status': 'ran' if evaluated else 'skipped', 'seconds': 1.5, 'run_seconds': None}]


def test_report_and_compare_runs_name_the_seven_classes(tmp_path):
  c = toy_config(tmp_path, gt_dir=str(tmp_path / 'gt'))
  records = write_run_outputs(c, True)
  assert 'mIoU (8 classes / present classes)' in report.stage_table(c, records)
  page = open(report.write(c, records)).read()
  summary = json.load(open(os.path.join(layout.report_dir(c), 'summary.json')))
  assert summary['classes'] == ['background', *NAMES] and summary['colours'] == PALETTE
  assert summary['runs']['seam']['rw']['present'] == list(IOU)
  assert 'mIoU, 8 classes (%)' in page and all(f'<td>{n}</td>' in page for n in IOU)
  assert f'rgb{tuple(PALETTE[K])}' in page
  strip = summary['strips'][0]
  tile = files.load_image(os.path.join(layout.report_dir(c), strip['rows'][0]['tiles'][-1]))
  assert {tuple(p) for p in tile.reshape(-1, 3)} <= {tuple(PALETTE[k]) for k in range(K + 1)}
  md = compare_runs.markdown([c.workdir])
  lowest = [l.split('|')[1].strip() for l in md.split('Lowest IoU')[1].splitlines() if l.startswith('| ')]
  assert lowest[2:] == list(IOU)   # after the header rows, in the data set's order


def test_report_without_ground_truth(tmp_path):
  """A CSV-format run: no results, the report written without mIoU tables, saying it was not evaluated."""
  c = toy_config(tmp_path)
  c.data.format = 'csv'
  files.atomic_write_text(os.path.join(c.data.list_dir, 'image_paths.tsv'),
                          ''.join(f'{i}\t{os.path.join(c.data.voc_root, "JPEGImages", i + ".jpg")}\n' for i in IDS))
  records = write_run_outputs(c, False)
  table = report.stage_table(c, records)
  assert table.splitlines()[-1] == report.NOT_EVALUATED and 'mIoU' not in table
  page = open(report.write(c, records)).read()
  summary = json.load(open(os.path.join(layout.report_dir(c), 'summary.json')))
  assert summary['ground_truth'] is False and summary['runs'] == {'seam': {}}
  assert report.NOT_EVALUATED in page and 'mIoU' not in page and 'ground truth</th>' not in page
  assert summary['strips'][0]['columns'] == ['image', 'random walk']


def test_predict_uses_the_data_set_names_and_palette(tmp_path):
  """run_predict with a DeepLab export of 8 outputs: label PNGs and overlays in the toy colours, legend.png naming
  background and the 7 classes; an input named like the legend keeps its own output."""
  c = toy_config(tmp_path)
  mc, variables = random_variables('deeplab', K + 1)
  c.model.width_div, c.model.fast_compile = mc.width_div, True
  c.seg.update(scales=(1.0,), flip=False, crf=False, bucket=32, test_batch_size=8, threads=1)
  weights = str(tmp_path / 'seg_export')
  export.save_export(weights, variables, 'deeplab', c.model)
  img_path = os.path.join(c.data.voc_root, 'JPEGImages', IDS[0] + '.jpg')
  legend_input = str(tmp_path / 'legend.png')
  files.save_rgb_png(legend_input, files.load_image(img_path))
  out = str(tmp_path / 'out')
  result = predict.run_predict(c, [img_path, legend_input], out, weights)
  assert sorted(result['written']) == [IDS[0], 'legend_1'] and not result['failed']
  with Image.open(os.path.join(out, IDS[0] + '.png')) as im:
    label = np.asarray(im)
    assert np.array_equal(np.reshape(im.getpalette()[:3 * (K + 1)], (K + 1, 3)), PALETTE) and label.max() <= K
  overlay = files.load_image(os.path.join(out, IDS[0] + '_overlay.png'))
  img = files.load_image(img_path)
  np.testing.assert_array_equal(overlay, predict.side_by_side(img, label, palette=TOY.palette_array()))
  legend = files.load_image(os.path.join(out, 'legend.png'))
  assert legend.shape[0] == (K + 1) * visual.LEGEND_ROW
  np.testing.assert_array_equal(legend, predict.legend(TOY))
  for k in range(K + 1):   # each row's swatch in the class colour
    assert legend[k * visual.LEGEND_ROW + 5, 6].tolist() == PALETTE[k]
  assert legend[:, 2 * visual.LEGEND_SWATCH:].min() < 128   # the names are drawn
  assert evaluation.class_names(TOY) == ('background', *NAMES)

