"""Pictures for people: heat maps over images (training summaries, CAM overlays, reports)."""
import numpy as np


def overlay(img_uint8, heat, alpha=0.5):
  """Blend the jet colours of a [0, 1] heat map over a uint8 RGB image: (1 - alpha) * img + alpha * colour."""
  import matplotlib  # pylint: disable=g-import-not-at-top  (only for pictures)
  colour = matplotlib.colormaps['jet'](np.clip(heat, 0., 1.))[..., :3] * 255.
  return (np.asarray(img_uint8) * (1 - alpha) + colour * alpha).astype(np.uint8)
