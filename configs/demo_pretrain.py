"""The demo's backbone pretraining (seam_jax.train.pretrain_task): the `pretrain` section of configs/demo.py.

A labelled synthetic set of random colours, textures and shapes (seam_jax.data.pretrain_data) stands in for
ImageNet; SEAM, AffinityNet and the segmentation net of the demo then start from this
network's backbone (seam_jax.layout.init_weights) with frozen BatchNorm, as the real recipe starts from ImageNet.
"""
from configs import sections


def get_config():
  # Training (the generic trainer's fields): every layer trained, conv1a and b2* too (the ImageNet net was trained
  # whole).
  p = sections.trainer(batch_size=32, epochs=0, max_steps=300, lr=0.02, weight_decay=1e-4, momentum=0.9,
                       frozen_layers=(), log_every=25, ckpt_every=100, keep_checkpoints=2)
  p.enabled = True                  # False: the demo trains from scratch (model.calibrate_bn) as before issue 15
  # The set (seam_jax.data.pretrain_data): one object of random shape, colour and texture filling most of each
  # image, or a background alone; soft colour classes over hue x brightness, texture families; drawn from
  # config.seed.
  # Measured on the README's demo command (one run each): this set, 150 steps: CAM mIoU 69.6, colour accuracy
  # 0.25 and texture at chance; TEXTURE_P 0.25 (the others flat) and 250 steps (configs/demo.py): CAM 66.5,
  # colour 0.48, texture 0.74 (the features are learnt); the earlier hue-bin set centred on the demo's hues: 91.0.
  p.num_images = 4096
  p.image_size = 32
  # Object diameter / image side: the object fills (nearly) the whole image, so the backbone learns local colour
  # features. Small objects teach "the colour somewhere in the image" at every pixel, and the demo's CAMs then
  # light up the background of images of some classes (measured: CAM 0.56 of its maximum on the background).
  p.object_scale = (1.5, 2.0)
  p.bn_momentum = 0.9               # running statistics: EMA of the batch statistics
  p.dropout = False
  return p
