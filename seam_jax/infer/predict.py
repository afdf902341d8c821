"""Segment ordinary image files (any folder or list, not only VOC ids) with an exported segmentation model.

Per readable image: the test of seam_jax.infer.seg_inference (config.seg scales, flip, CRF; an image whose longer
side is above seg.max_side is tested downscaled to it, the labels resized back), written as <out>/<name>.png (label
map in the palette of the run's data set, seam_jax.layout.dataset: VOC's by default; the image's size) and
<out>/<name>_overlay.png (the original image and the labels blended over it, side by side); <out>/legend.png names
the colour of every class. A file that cannot be read is reported (one line naming it) and skipped; the others
complete. Inputs: image files, folders (their image files, sorted) and .txt lists (one path per line, relative to
the list's folder). Output names are the file stems, made unique with a counter when two inputs share one (or are
named like the legend). With several
processes (jax.distributed) each segments its share of the inputs (distributed.process_share), writing into the
same folder, and all meet at a barrier.
"""
import os

import numpy as np

from seam_jax import layout
from seam_jax.common import distributed, errors, files, per_image, visual
from seam_jax.data import seg_data
from seam_jax.infer import evaluation, seg_inference

IMAGE_EXTS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')
LEGEND = 'legend'   # <out>/legend.png; an input of that stem is written as legend_1


def collect_inputs(inputs):
  """Image paths of `inputs` (files, folders, .txt lists), in order; a missing input is a DataError naming it."""
  paths = []
  for item in inputs:
    if os.path.isdir(item):
      paths += sorted(os.path.join(item, f) for f in os.listdir(item) if f.lower().endswith(IMAGE_EXTS))
    elif item.endswith('.txt') and os.path.isfile(item):
      with open(item) as f:
        paths += [os.path.join(os.path.dirname(item), l.strip()) for l in f if l.strip()]
    elif os.path.exists(item):
      paths.append(item)
    else:
      raise errors.DataError(f'input not found: {item}')
  if not paths:
    raise errors.DataError(f'no image files in {list(inputs)}')
  return paths


def output_names(paths):
  """A unique output name per path: its stem, then stem_1, stem_2, ... for repeats (and for the stem LEGEND)."""
  seen, names = {LEGEND: 1}, []
  for p in paths:
    stem = os.path.splitext(os.path.basename(p))[0]
    k = seen.get(stem, 0)
    seen[stem] = k + 1
    names.append(stem if k == 0 else f'{stem}_{k}')
  return names


def side_by_side(img, label, rows=256, palette=None):
  """The image and the label colours (`palette` uint8 (256, 3), None = VOC's) blended over it, next to each other
  (uint8 RGB). Blended in strips of `rows` rows: visual.label_overlay's float32 temporaries stay a strip's, not a
  large photo's (issue 21)."""
  h, w = label.shape
  out = np.empty((h, 2 * w, 3), np.uint8)
  out[:, :w] = img
  for r in range(0, h, rows):
    out[r:r + rows, w:] = visual.label_overlay(img[r:r + rows], label[r:r + rows], palette=palette)
  return out


def legend(dataset):
  """The legend picture of a DatasetInfo: background and its classes, each in its palette colour."""
  return visual.legend(evaluation.class_names(dataset), dataset.palette_array())


def _outputs(out_dir, name):
  """The label PNG and the overlay written for the input named `name`."""
  return [os.path.join(out_dir, name + '.png'), os.path.join(out_dir, name + '_overlay.png')]


def run_predict(config, inputs, out_dir=None, weights=None):
  """Segment every image of `inputs` into `out_dir` (default layout.predict_dir) with the weights at `weights`
  (default layout.seg_weights), all of them again on every call (a tool, not a resuming stage). Returns this
  process's {'written': [names], 'failed': [(path, message)]} and its seam_jax.common.per_image stats. Classes,
  names and colours are those of the run's data set (layout.dataset)."""
  out_dir = out_dir or layout.predict_dir(config)
  paths = collect_inputs(inputs)
  items = list(zip(paths, output_names(paths)))  # names from the whole list: unique
  result = {'written': [], 'failed': []}
  dataset = layout.dataset(config)
  palette = dataset.palette_array()
  if distributed.is_main():
    files.save_rgb_png(os.path.join(out_dir, LEGEND + '.png'), legend(dataset))

  def load(item):
    path, name = item
    try:
      return name, path, seg_data.load_image_cv2(path)
    except errors.DataError as e:
      return name, (path, str(e)), None

  def save(name, payload, img, label):
    if img is None:
      result['failed'].append(payload)
      return 0
    label_path, overlay_path = _outputs(out_dir, name)
    dataset.save_mask(label_path, label)
    files.save_rgb_png(overlay_path, side_by_side(img, label, palette=palette))
    result['written'].append(name)
    return 2

  def work(todo, done):
    s = config.seg
    seg_inference.segment(seg_inference.load_engine(config, weights), seg_inference.SegTestOptions.from_config(s),
                          todo, load, save, done, s.threads, s.max_pending)

  stats = per_image.run('predict', items, lambda item: _outputs(out_dir, item[1]), work, force=True)
  return dict(result, **stats)
