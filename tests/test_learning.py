"""End to end: SEAM trained from scratch with the real trainer learns, and its CAMs (seam_jax.infer_cam, scored by
seam_jax.evaluation) beat the untrained network's.

The generated demo set (seam_jax.demo_data: 20 textured classes over cluttered backgrounds) is too hard for a
from-scratch ResNet38 in a test's budget: 1500 steps on it leave the classification loss at the label prior and the
CAMs empty. So this test builds an easy VOC-layout set instead: four colour classes drawn as discs on grey noise.
"""
import json
import os

import jax
import numpy as np
from PIL import Image

from configs import demo
from seam_jax import evaluation, infer_cam, seam_task, trainer, voc

COLOURS = {1: (220, 40, 40), 2: (40, 200, 40), 3: (40, 60, 230), 4: (230, 210, 30)}   # class -> RGB
SIZE = 96
NUM_IMAGES = 64
STEPS = 200


def make_easy_set(root, n, seed=0):
  """VOC layout under root: JPEGImages, SegmentationClass, lists/{train,train_aug}.txt, lists/cls_labels.npy."""
  r = np.random.default_rng(seed)
  for d in ('VOC2012/JPEGImages', 'VOC2012/SegmentationClass', 'lists'):
    os.makedirs(os.path.join(root, d), exist_ok=True)
  yy, xx = np.mgrid[:SIZE, :SIZE]
  labels = {}
  for k in range(n):
    img = r.normal(128, 20, (SIZE, SIZE, 3)).clip(0, 255)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    for c in r.choice(list(COLOURS), size=r.integers(1, 3), replace=False):
      cy, cx = r.integers(20, SIZE - 20, 2)
      disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r.integers(12, 22) ** 2
      img[disc], mask[disc] = COLOURS[c], c
    image_id = f'easy_{k:04d}'
    Image.fromarray(img.astype(np.uint8)).save(f'{root}/VOC2012/JPEGImages/{image_id}.jpg', quality=95)
    voc.save_label_png(f'{root}/VOC2012/SegmentationClass/{image_id}.png', mask)
    labels[image_id] = np.isin(np.arange(1, 21), np.unique(mask)).astype(np.float32)
  for name in ('train', 'train_aug'):
    voc.write_list(f'{root}/lists/{name}.txt', sorted(labels))
  np.save(f'{root}/lists/cls_labels.npy', labels)
  return labels


def make_config(root):
  c = demo.get_config()
  c.workdir = str(root / 'work')
  c.data.voc_root, c.data.list_dir = str(root / 'VOC2012'), str(root / 'lists')
  c.data.cls_labels = str(root / 'lists/cls_labels.npy')
  c.data.crop_size, c.data.resize_long, c.data.jitter = SIZE, (SIZE, SIZE), (0., 0., 0., 0.)
  c.model.width_div = 16
  c.train.update(max_steps=STEPS, lr=0.05, fix_momentum=True, log_every=50, ckpt_every=10 * STEPS,
                 image_summaries=False, fast_compile=True)
  c.infer.update(list='train', scales=(1.0,), force=True)
  c.eval.update(list='train', workers=1)
  return c


def cam_miou(config, variables, name):
  """mIoU over the classes present (best background threshold) of the CAMs of `variables` on the train list."""
  with config.unlocked():
    config.infer.cam_dir = os.path.join(config.workdir, f'cam_{name}')
    config.eval.out_dir = os.path.join(config.workdir, f'eval_{name}')
  infer_cam.run_inference(config, infer_cam.CamEngine(variables, config.model, config.infer.batch_size))
  return evaluation.evaluate(config)['miou_present']


def label_prior_mlsm(labels):
  """Multilabel soft margin of the best constant prediction (the class frequencies): the no-learning level."""
  p = np.clip(np.mean(list(labels.values()), axis=0), 1e-6, 1 - 1e-6)
  return float(np.mean(-(p * np.log(p) + (1 - p) * np.log(1 - p))))


def test_seam_learns_cams(tmp_path):
  labels = make_easy_set(str(tmp_path), NUM_IMAGES)
  config = make_config(tmp_path)
  task = seam_task.seam_task(config)
  init_rng = jax.random.split(jax.random.PRNGKey(config.seed))[0]   # the trainer's own initialisation
  untrained = trainer.init_variables(config, task, init_rng)
  trained = trainer.train(config, task)

  logs = [json.loads(l) for l in open(tmp_path / 'work/seam/metrics.jsonl')]
  assert logs[-1]['step'] == STEPS
  assert logs[-1]['loss'] < 0.75 * logs[0]['loss']
  assert logs[-1]['mlsm'] < label_prior_mlsm(labels)

  before, after = cam_miou(config, untrained, 'untrained'), cam_miou(config, trained, 'trained')
  print(f'CAM mIoU (present classes): untrained {before:.3f}, trained {after:.3f}')
  assert after > before + 0.05
