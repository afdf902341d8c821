"""Pictures for people: heat maps and label maps over images (training summaries, CAM overlays, predictions,
reports)."""
import numpy as np

from seam_jax.common import files


def overlay(img_uint8, heat, alpha=0.5):
  """Blend the jet colours of a [0, 1] heat map over a uint8 RGB image: (1 - alpha) * img + alpha * colour."""
  import matplotlib  # pylint: disable=g-import-not-at-top  (only for pictures)
  colour = matplotlib.colormaps['jet'](np.clip(heat, 0., 1.))[..., :3] * 255.
  return (np.asarray(img_uint8) * (1 - alpha) + colour * alpha).astype(np.uint8)


def label_overlay(img_uint8, label, alpha=0.5):
  """Blend the VOC palette colours of a class-index map over a uint8 RGB image; background (0) keeps the image."""
  img = np.asarray(img_uint8, np.float32)
  colour = files.voc_palette()[np.asarray(label)].astype(np.float32)
  out = np.where((np.asarray(label) == 0)[..., None], img, img * (1 - alpha) + colour * alpha)
  return out.astype(np.uint8)
