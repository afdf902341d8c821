"""End to end on the demo data: SEAM trained from scratch with the real trainer (configs/demo.py, narrower and
shorter) learns, and its CAMs (seam_jax.infer.cam_inference, scored by seam_jax.infer.evaluation) on demo VAL beat
the untrained network's clearly.

The demo set is the generator's plain style of configs/demo.py (4 classes as flat colour discs on grey noise); the
hard style (20 textured classes over clutter) is not learnt from scratch in a test's budget (see
seam_jax.data.demo_data).
"""
import json
import os

import jax
import numpy as np
import pytest

from configs import demo
from seam_jax.data import prepare
from seam_jax.infer import evaluation, cam_inference
from seam_jax.train import seam_task, trainer

pytestmark = pytest.mark.slow   # over ~20 s: `pytest -m "not slow"` leaves it out

STEPS = 300


def make_config(root):
  c = demo.get_config()
  c.workdir = str(root / 'work')
  c.data.voc_root, c.data.list_dir = str(root / 'VOC2012'), str(root / 'lists')
  c.data.cls_labels = str(root / 'lists/cls_labels.npy')
  c.demo.update(num_train=96, num_val=32, num_aug=32, image_size=(96, 128))
  c.data.update(crop_size=96, resize_long=(96, 144))
  c.model.width_div = 8
  c.pretrain.enabled = False  # learning from scratch (calibrated BN): no pretraining export in this test
  # From scratch the demo recipe's lr (0.01, for a pretrained backbone) is too slow: 0.05, as before pretraining.
  c.train.update(max_steps=STEPS, lr=0.05, log_every=50, ckpt_every=10 * STEPS, image_summaries=False,
                 fast_compile=True)
  c.infer.update(list='val', scales=(1.0,))
  c.eval.update(list='val', workers=1)
  return c


def cam_miou(config, variables, name):
  """mIoU over the classes present (best background threshold) of the CAMs of `variables` on demo val."""
  with config.unlocked():
    config.infer.cam_dir = os.path.join(config.workdir, f'cam_{name}')
    config.eval.out_dir = os.path.join(config.workdir, f'eval_{name}')
  cam_inference.run_inference(config, force=True,
                              engine=cam_inference.CamEngine(variables, config.model, config.infer.batch_size))
  return evaluation.evaluate(config)['miou_present']


def label_prior_mlsm(label_path, list_path):
  """Multilabel soft margin of the best constant prediction (the class frequencies): the no-learning level."""
  labels = np.load(label_path, allow_pickle=True).item()
  ids = open(list_path).read().split()
  p = np.clip(np.mean([labels[i] for i in ids], axis=0), 1e-6, 1 - 1e-6)
  return float(np.mean(-(p * np.log(p) + (1 - p) * np.log(1 - p))))


def test_seam_learns_cams_on_demo_data(tmp_path):
  config = make_config(tmp_path)
  prepare.make_demo(config)
  prepare.prepare(config)
  task = seam_task.seam_task(config)
  init_rng = jax.random.split(jax.random.PRNGKey(config.seed))[0]   # the trainer's own initialisation
  untrained = trainer.init_variables(config, task, init_rng)
  trained = trainer.train(config, task)

  logs = [json.loads(l) for l in open(tmp_path / 'work/seam/metrics.jsonl')]
  prior = label_prior_mlsm(config.data.cls_labels, tmp_path / 'lists/train_aug.txt')
  print('mlsm per log step:', [round(l['mlsm'], 3) for l in logs], 'label prior', round(prior, 3))
  assert logs[-1]['step'] == STEPS
  assert logs[-1]['loss'] < 0.75 * logs[0]['loss']
  assert logs[-1]['mlsm'] < 0.9 * prior

  before, after = cam_miou(config, untrained, 'untrained'), cam_miou(config, trained, 'trained')
  print(f'demo val CAM mIoU (present classes): untrained {before:.3f}, trained {after:.3f}')
  assert after > before + 0.1
