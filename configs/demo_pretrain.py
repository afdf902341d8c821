"""The demo's backbone pretraining (seam_jax.train.pretrain_task): the `pretrain` section of configs/demo.py.

A densely labelled synthetic set of random shapes, colours and textures (seam_jax.data.pretrain_data) stands in for
ImageNet; SEAM, AffinityNet and the segmentation net of the demo then start from this
network's backbone (seam_jax.layout.init_weights) with frozen BatchNorm, as the real recipe starts from ImageNet.
"""
from configs import sections


def get_config():
  # Training (the generic trainer's fields): every layer trained, conv1a and b2* too (the ImageNet net was trained
  # whole). lr 0.004 (the head's 10x: 0.04): measured at 200 steps, objectness 0.91 accuracy against 0.83 (all
  # background) with lr 0.02, and the colour term 0.71 against 1.05.
  p = sections.trainer(batch_size=32, epochs=0, max_steps=300, lr=0.004, weight_decay=1e-4, momentum=0.9,
                       frozen_layers=(), log_every=25, ckpt_every=100, keep_checkpoints=2)
  p.enabled = True                  # False: the demo trains from scratch (model.calibrate_bn) as before issue 15
  # The set (seam_jax.data.pretrain_data): random shapes, colours and textures over random backgrounds, every
  # stride-8 cell labelled (colour, objectness, shape family, texture family), drawn from config.seed.
  p.num_images = 4096
  p.image_size = 48                 # a multiple of 8 (6 x 6 labelled cells)
  p.bn_momentum = 0.9               # running statistics: EMA of the batch statistics
  p.dropout = False
  return p
