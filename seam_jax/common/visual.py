"""Pictures for people: heat maps and label maps over images (training summaries, CAM overlays, predictions,
reports)."""
import numpy as np

from seam_jax.common import files


def overlay(img_uint8, heat, alpha=0.5):
  """Blend the jet colours of a [0, 1] heat map over a uint8 RGB image: (1 - alpha) * img + alpha * colour."""
  import matplotlib  # pylint: disable=g-import-not-at-top  (only for pictures)
  colour = matplotlib.colormaps['jet'](np.clip(heat, 0., 1.))[..., :3] * 255.
  return (np.asarray(img_uint8) * (1 - alpha) + colour * alpha).astype(np.uint8)


def label_overlay(img_uint8, label, alpha=0.5, palette=None):
  """Blend the colours of a class-index map over a uint8 RGB image; background (0) keeps the image. `palette`:
  uint8 (256, 3) (DatasetInfo.palette_array), None = VOC's."""
  img = np.asarray(img_uint8, np.float32)
  colour = (files.voc_palette() if palette is None else np.asarray(palette))[np.asarray(label)].astype(np.float32)
  out = np.where((np.asarray(label) == 0)[..., None], img, img * (1 - alpha) + colour * alpha)
  return out.astype(np.uint8)


LEGEND_ROW, LEGEND_SWATCH = 20, 14   # pixels


def legend(names, palette):
  """uint8 RGB picture naming the colour of each class: one row per class index k (names[k], swatch palette[k]),
  the swatch's top-left pixel at (k * LEGEND_ROW + 3, 4)."""
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
  width = 2 * LEGEND_SWATCH + 8 * max(len(n) for n in names) + 16
  im = Image.new('RGB', (width, LEGEND_ROW * len(names)), (255, 255, 255))
  draw = ImageDraw.Draw(im)
  for k, name in enumerate(names):
    top = k * LEGEND_ROW + 3
    draw.rectangle((4, top, 4 + LEGEND_SWATCH - 1, top + LEGEND_SWATCH - 1), fill=tuple(int(v) for v in palette[k]),
                   outline=None)
    draw.text((2 * LEGEND_SWATCH, top), name, fill=(0, 0, 0))
  return np.asarray(im)
