"""MS-COCO 2014 recipe: SEAM on train2014 (82,081 images, 80 classes + background), evaluated on val2014 (40,137).

    python -m seam_jax --config=configs/coco14.py --config.data.image_dir=/data/coco/train2014 ...

Inputs: COCO's own `instances_train2014.json` / `instances_val2014.json` (data.format 'coco', seam_jax.data.coco):
image-level labels are the categories of an image's non-crowd annotations; the val masks for evaluation are
rasterised from polygons and RLE into <workdir>/gt, crowd regions as 255 (ignored); the 80 category ids map to
indices 1..80 in id order (1 person ... 90 toothbrush), as published COCO WSSS code numbers them. Images without
annotations are kept, background only (prepare logs how many). Not run on the real files here: no COCO file can be
downloaded on the machines this was written on; the same reader runs on a generated COCO-format set in the tests.

Where each value comes from:
- The original's VOC recipe (configs/voc12.py, ../shared/SEAM_SPEC.md), unchanged: the network (ResNet38 from the
  ImageNet weights in model.init_weights), SEAM's losses and their weights, crop 448, random long side 448-768, the
  colour jitter, lr 0.01, weight decay 5e-4, the QUIRK momentum, batch 8, CAM scales and flip, CRF powers 4 / 24,
  AffinityNet's radius, crop and schedule, the random walk (beta 8, logt 6, alpha 6), the segmentation retrain's
  schedule (batch 10, 20000 steps, lr 0.001) and multi-scale test.
- COCO practice of SEAM-style pipelines (IRN, its follow-ups): train SEAM and AffinityNet on train2014 (there is no
  SBD-like extra set: train_aug = train), report mIoU on val2014, and train for fewer epochs than VOC's 8 because the
  set is 7.8x larger. The published epoch counts vary between papers; we could not check one for SEAM itself (its
  release has no COCO recipe), so the values below are our choice.
- Our choices (marked `# choice`): 3 epochs of SEAM and AffinityNet training (30,780 steps at batch 8: 2.9x VOC's
  10,582), AffinityNet and the random walk on train (what the retrain learns from), CAMs of train + val, data.aff_canvas
  640 (COCO images are at most 640 px a side), and the evaluation threshold curve over 0..0.6 as for VOC.
Every value can be overridden on the command line; the paths below expect COCO's own folder layout under data/coco.
"""
from configs import voc12


def get_config():
  c = voc12.get_config()
  c.workdir = 'work_dirs/coco14'
  c.data.format = 'coco'
  c.data.train_annotations = 'data/coco/annotations/instances_train2014.json'
  c.data.val_annotations = 'data/coco/annotations/instances_val2014.json'
  c.data.image_dir = 'data/coco/train2014'
  c.data.val_image_dir = 'data/coco/val2014'
  c.data.voc_root = ''              # unused by the coco format
  c.data.train_list = 'train'       # train2014 (COCO has no extra SBD-like set)
  c.data.aff_canvas = 640           # choice: COCO images are at most 640 px a side

  c.train.epochs = 3                # choice (module doc)
  c.infer.list = 'trainval'         # train feeds AffinityNet and the random walk, val is scored
  c.eval.list = 'val'
  c.aff.train_list = 'train'
  c.aff.epochs = 3                  # choice
  c.rw.list = 'train'
  c.seg.train_list = 'train'
  c.seg.test_list = 'val'
  return c
