"""A small offline data set in the exact PASCAL VOC 2012 layout (SEAM_SPEC section 8), generated from a seed.

Two styles (Style), drawn with seam_jax.data.shapes: the hard set (default) draws each of the 20 classes as a
distinct rotated shape filled with a distinct texture in a class hue (jittered); an image holds 1-4 objects of
15-50% of its shorter side over a cluttered background, later objects occluding earlier ones. The plain set
(plain=True, configs/demo.py) draws a few classes as flat discs, each class in its own hue (plain_colour: spread
evenly over the wheel), 1-2 per image, on grey pixel noise: what the demo's narrow ResNet38 learns in minutes on a
CPU from a backbone pretrained on hues (seam_jax.data.pretrain_data; from scratch some hues stay indistinguishable
from the background). Optional Style fields vary the plain set (colours of its own, the hard set's shapes at random
poses, other backgrounds: seam_jax.data.style_draws); at their defaults the random draws and the output are exactly
those of before the fields existed. In both styles, masks are exactly what is drawn, with 255 on a 2 px band along
every instance boundary as in VOC. Objects left with too few visible pixels are not drawn at all, so the classes of
the XML objects equal the classes of the mask and both label sources (`label_source` 'xml' or 'masks') agree. Every
image depends only on (seed, index, style): the output is byte-identical with or without a process pool.

  python -m seam_jax.data.demo_data --root work_dirs/demo/VOC2012 --seed 0
"""
import functools
import os
import sys
import time
from typing import NamedTuple, Tuple
import xml.etree.ElementTree as ET

from absl import app
from absl import flags
import numpy as np
from PIL import Image

from seam_jax.common import errors, files, pools
from seam_jax.data import voc
from seam_jax.data import shapes as shapes_lib
from seam_jax.data.shapes import SHAPES, hsv_to_rgb, object_frame   # drawn in shapes; public here as before

NUM_OBJECTS_P = (0.3, 0.3, 0.25, 0.15)  # P(1, 2, 3, 4 objects)
MIN_VISIBLE_PX = 30                     # non-void pixels an object needs to be kept ...
MIN_VISIBLE_FRAC = 0.2                  # ... and this fraction of its in-image area
MAX_DRAWS = 1000                        # draws of an image's objects until its primary shows, then a DataError
DIFFICULT_P = 0.1                       # extra objects marked <difficult> at random
SPLITS = ('train', 'val', 'aug')        # aug: "SBD-only" ids, in SegmentationClassAug but in no VOC list
ALL_CLASSES = tuple(range(1, voc.NUM_FG + 1))


class Style(NamedTuple):
  """How hard the set is. classes: the VOC class indices drawn; object_scale: (min, max) object diameter / shorter
  image side; clutter: strength of the background colour noise, lines and class-less shapes (0 = smooth)."""
  classes: Tuple[int, ...] = ALL_CLASSES
  object_scale: Tuple[float, float] = (0.15, 0.5)
  clutter: float = 1.0
  plain: bool = False   # flat discs in each class's plain_colour, 1-2 per image, on grey pixel noise (the demo's)
  # Fraction of the train and aug ids that hold no object (background only, empty label; val ids always hold one).
  # With few classes and an object in every image, "none of the other classes" implies the last one, and a CAM can
  # learn that from the background; images with nothing in them forbid it.
  empty_p: float = 0.0
  # Plain set only: per-class RGB colours and SHAPES indices, in the order of `classes` (() = plain_colour, discs).
  # Shapes are drawn at a random rotation and aspect (0.85-1.15).
  palette: Tuple[Tuple[int, int, int], ...] = ()
  shapes: Tuple[int, ...] = ()
  background: str = ''  # '' or one of shapes.BACKGROUNDS; '' = grey noise at 128 (plain) or clutter (hard)


PLAIN_OBJECTS_P = (0.5, 0.5)


def plain_colour(cls, classes=ALL_CLASSES):
  """The plain set's flat RGB colour of class `cls` among the drawn `classes`: the k-th of them gets hue k / n of the
  colour wheel (n = len(classes)), saturation 0.85, value 0.9. The hues of any subset are spread evenly, as far
  apart as n colours of equal value can be, so every subset of n classes is equally hard (with all 20 classes,
  class c has hue (c - 1) / 20)."""
  return tuple(int(round(v)) for v in hsv_to_rgb(classes.index(cls) / len(classes), .85, .9))


def _sample_object(rng, cls, h, w, style):
  """One object of class `cls` (1..20) at a random pose: (in-image boolean mask, full-frame RGB fill)."""
  s = rng.uniform(*style.object_scale) * min(h, w) / 2
  cx, cy = rng.uniform(.15, .85) * w, rng.uniform(.15, .85) * h
  if style.plain:
    k = style.classes.index(cls)
    colour = np.array(style.palette[k] if style.palette else plain_colour(cls, style.classes), np.float32)
    if not style.shapes:
      x, y = object_frame(h, w, cx, cy, 0.)
      return np.hypot(x, y) <= s, np.broadcast_to(colour, (h, w, 3))
    x, y = object_frame(h, w, cx, cy, rng.uniform(0, 2 * np.pi))
    aspect = rng.uniform(.85, 1.15)
    return SHAPES[style.shapes[k]](x / s, y / (s * aspect)), np.broadcast_to(colour, (h, w, 3))
  aspect = rng.uniform(.85, 1.15)
  x, y = object_frame(h, w, cx, cy, rng.uniform(0, 2 * np.pi))
  mask = SHAPES[cls - 1](x / s, y / (s * aspect))
  hue = (cls - 1) / voc.NUM_FG + rng.uniform(-.012, .012)
  sat, val = rng.uniform(.55, .9), rng.uniform(.65, .95)
  a = hsv_to_rgb(hue, sat, val)
  b = hsv_to_rgb(hue, sat, val * .35) if cls % 2 else hsv_to_rgb(hue, sat * .25, min(1., val + .3))
  t = shapes_lib.TEXTURES[cls - 1](x, y, s, rng).astype(np.float32)[..., None]
  return mask, a * (1 - t) + b * t


def _boundary(inst):
  """Pixels whose 8-neighbourhood holds another instance (or background): a 2 px band along every boundary."""
  h, w = inst.shape
  p = np.pad(inst, 1, mode='edge')
  band = np.zeros(inst.shape, bool)
  for dy in range(3):
    for dx in range(3):
      band |= p[dy:dy + h, dx:dx + w] != inst
  return band


def _resolve_occlusion(masks):
  """Paint masks in order; drop objects with too few visible non-void pixels until all kept ones show."""
  keep = list(range(len(masks)))
  while True:
    inst = np.full(masks[0].shape, -1, np.int32)
    for i in keep:
      inst[masks[i]] = i
    band = _boundary(inst)
    interior = np.bincount(inst[~band & (inst >= 0)], minlength=len(masks))
    ok = [i for i in keep if interior[i] >= max(MIN_VISIBLE_PX, MIN_VISIBLE_FRAC * masks[i].sum())]
    if ok == keep:
      return inst, band, keep
    keep = ok


def _background(rng, h, w, style):
  """The image before its objects: style.background, or the style's own default ('': what it always drew)."""
  if style.plain and not style.background:
    return rng.normal(128, 20, (h, w, 3))   # the plain set's default, a fixed level
  return shapes_lib.background(rng, h, w, style.background or 'clutter', style.clutter)


def render(seed, index, primary, image_size, style=Style()):
  """Image `index` of the set: (RGB uint8 HxWx3, mask uint8 HxW, objects [(class, bbox, truncated, difficult)]).

  `primary` (1..20) is drawn last, so always visible; 0-3 more objects of random `style.classes` go below it.
  `primary` 0: the background alone, no object.
  bbox = 1-based inclusive (xmin, ymin, xmax, ymax) of the visible pixels, as in VOC.
  """
  rng = np.random.default_rng([seed, index])
  h, w = (int(v) for v in rng.integers(image_size[0], image_size[1] + 1, 2))
  img = _background(rng, h, w, style)
  if primary == 0:
    return np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8), np.zeros((h, w), np.uint8), []
  n_p = PLAIN_OBJECTS_P if style.plain else NUM_OBJECTS_P
  for _ in range(MAX_DRAWS):
    n = rng.choice(len(n_p), p=n_p) + 1
    drawn = [int(style.classes[k]) for k in rng.integers(0, len(style.classes), n - 1)] + [primary]
    objs = [_sample_object(rng, c, h, w, style) for c in drawn]
    inst, band, keep = _resolve_occlusion([m for m, _ in objs])
    if keep and keep[-1] == n - 1:
      break
  else:
    raise errors.DataError(f'demo data: {voc.CLASSES[primary]} never shows {MIN_VISIBLE_PX} visible pixels in image '
                           f'{index} ({MAX_DRAWS} draws): use a larger object_scale or image_size')
  lut = np.zeros(n + 1, np.uint8)
  objects = []
  for i in keep:
    vis = inst == i
    img[vis] = objs[i][1][vis]
    lut[i + 1] = drawn[i]
    ys, xs = np.nonzero(vis)
    bbox = (int(xs.min()) + 1, int(ys.min()) + 1, int(xs.max()) + 1, int(ys.max()) + 1)
    truncated = bbox[0] == 1 or bbox[1] == 1 or bbox[2] == w or bbox[3] == h
    difficult = bool(rng.random() < DIFFICULT_P or vis.sum() < .4 * objs[i][0].sum())
    objects.append((drawn[i], bbox, truncated, difficult))
  mask = lut[inst + 1]
  mask[band] = voc.IGNORE
  img = np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)
  return img, mask, objects


def annotation_xml(image_id, size_hw, objects, segmented):
  """VOC-style Annotations/<id>.xml text for `objects` as returned by render()."""
  root = ET.Element('annotation')
  for tag, text in (('folder', 'VOC2012'), ('filename', image_id + '.jpg')):
    ET.SubElement(root, tag).text = text
  ET.SubElement(ET.SubElement(root, 'source'), 'database').text = 'seam_jax synthetic demo'
  size = ET.SubElement(root, 'size')
  for tag, v in zip(('width', 'height', 'depth'), (size_hw[1], size_hw[0], 3)):
    ET.SubElement(size, tag).text = str(v)
  ET.SubElement(root, 'segmented').text = str(int(segmented))
  for cls, bbox, truncated, difficult in objects:
    obj = ET.SubElement(root, 'object')
    for tag, text in (('name', voc.CLASSES[cls]), ('pose', 'Unspecified'), ('truncated', str(int(truncated))),
                      ('difficult', str(int(difficult)))):
      ET.SubElement(obj, tag).text = text
    box = ET.SubElement(obj, 'bndbox')
    for tag, v in zip(('xmin', 'ymin', 'xmax', 'ymax'), bbox):
      ET.SubElement(box, tag).text = str(v)
  ET.indent(root, '\t')
  return ET.tostring(root, encoding='unicode') + '\n'


def _make_one(root, seed, image_size, style, item):
  """Render and write every file of one id; returns its record for the summary."""
  index, image_id, split, primary = item
  img, mask, objects = render(seed, index, primary, image_size, style)
  files.atomic_write(os.path.join(root, 'JPEGImages', image_id + '.jpg'),  # pylint: disable=protected-access
              lambda f: Image.fromarray(img).save(f, format='JPEG', quality=95))
  if split != 'aug':
    files.save_label_png(os.path.join(root, 'SegmentationClass', image_id + '.png'), mask)
  files.save_label_png(os.path.join(root, 'SegmentationClassAug', image_id + '.png'), mask)
  files.atomic_write_text(os.path.join(root, 'Annotations', image_id + '.xml'),
                        annotation_xml(image_id, mask.shape, objects, split != 'aug'))
  return {'id': image_id, 'split': split, 'classes': sorted({o[0] for o in objects}),
          'objects': len(objects), 'difficult': sum(o[3] for o in objects)}


def plan(seed, num_train, num_val, num_aug, classes=ALL_CLASSES, empty_p=0.0):
  """[(index, id, split, primary class)] in index order; primary classes cycle through shuffled `classes` per split;
  round(empty_p * n) of the n train (and of the aug) ids, drawn at random, get primary 0 (no object)."""
  n = num_train + num_val + num_aug
  ids = [f'{2007 + k % 6}_{k:06d}' for k in range(n)]
  rng = np.random.default_rng(seed)
  order = rng.permutation(n)
  split_of = np.repeat(np.arange(3), (num_train, num_val, num_aug))[np.argsort(order)]
  primary = np.zeros(n, int)
  for s in range(3):
    members = sorted(np.flatnonzero(split_of == s), key=ids.__getitem__)
    cycle = [c for _ in range(-(-len(members) // len(classes))) for c in rng.permutation(classes)]
    primary[members] = cycle[:len(members)]
  if empty_p:
    empty_rng = np.random.default_rng([seed, len(SPLITS)])   # a stream of its own: empty_p 0 keeps the plan above
    for s in (0, 2):
      members = np.flatnonzero(split_of == s)
      primary[empty_rng.choice(members, int(round(empty_p * len(members))), replace=False)] = 0
  return [(k, ids[k], SPLITS[split_of[k]], int(primary[k])) for k in range(n)]


def _check_args(num_train, num_val, num_aug, image_size, style):
  for key, v, lo in (('num_train', num_train, 1), ('num_val', num_val, 1), ('num_aug', num_aug, 0)):
    if int(v) != v or v < lo:
      raise errors.DataError(f'demo data: {key} must be an integer >= {lo}, got {v!r}')
  if len(image_size) != 2 or not 32 <= image_size[0] <= image_size[1]:
    raise errors.DataError(f'demo data: image_size must be (min, max) with 32 <= min <= max, got {image_size!r}')
  c = style.classes
  if not c or len(set(c)) != len(c) or not set(c) <= set(ALL_CLASSES):
    raise errors.DataError(f'demo data: classes must be distinct class indices in 1..{voc.NUM_FG}, got {c!r}')
  if not 0 < style.object_scale[0] <= style.object_scale[1] <= 1:
    raise errors.DataError('demo data: object_scale must be (min, max) with 0 < min <= max <= 1, got '
                           f'{style.object_scale!r}')
  if not 0 <= style.clutter <= 1:
    raise errors.DataError(f'demo data: clutter must be in [0, 1], got {style.clutter!r}')
  if not 0 <= style.empty_p < 1:
    raise errors.DataError(f'demo data: empty_p must be in [0, 1), got {style.empty_p!r}')
  for key, v, ok, what in (
      ('palette', style.palette, lambda p: len(p) == 3 and all(0 <= x <= 255 for x in p), 'RGB triples in 0..255'),
      ('shapes', style.shapes, lambda k: 0 <= k < len(SHAPES), f'SHAPES indices in 0..{len(SHAPES) - 1}')):
    if v and not style.plain:
      raise errors.DataError(f'demo data: {key} is for the plain set only (plain=True)')
    if v and (len(v) != len(c) or not all(ok(x) for x in v)):
      raise errors.DataError(f'demo data: {key} must hold {len(c)} {what}, one per class, got {v!r}')
  if style.background not in ('',) + shapes_lib.BACKGROUNDS:
    raise errors.DataError(f'demo data: background must be one of {shapes_lib.BACKGROUNDS} or \'\', got '
                           f'{style.background!r}')


def _check_root(root, ids):
  """Refuse a root that holds images other than `ids` (a real VOC folder, or a bigger demo set)."""
  jpg_dir = os.path.join(root, 'JPEGImages')
  stale = sorted(set(os.listdir(jpg_dir)) - {i + '.jpg' for i in ids}) if os.path.isdir(jpg_dir) else []
  if stale:
    raise errors.DataError(f'demo data: {jpg_dir} already holds other images (e.g. {stale[0]}); use an empty --root')


def generate(root, num_train=160, num_val=40, num_aug=40, image_size=(96, 128), seed=0, workers=0,
             classes=ALL_CLASSES, object_scale=(0.15, 0.5), clutter=1.0, plain=False, empty_p=0.0, palette=(),
             shapes=(), background=''):
  """Write the demo set under `root` (VOC2012 layout) and return a summary (counts, per-split class histograms).

  Class histogram = number of images containing each class (from the masks, equal to the XML names).
  """
  image_size = tuple(int(v) for v in image_size)
  try:
    style = Style(tuple(int(c) for c in classes), tuple(float(v) for v in object_scale), float(clutter), bool(plain),
                  float(empty_p), tuple(tuple(int(x) for x in p) for p in palette), tuple(int(k) for k in shapes),
                  str(background))
  except (TypeError, ValueError) as e:
    raise errors.DataError(f'demo data: malformed style field ({e})') from e
  _check_args(num_train, num_val, num_aug, image_size, style)
  items = plan(seed, num_train, num_val, num_aug, style.classes, style.empty_p)
  _check_root(root, [it[1] for it in items])
  make = functools.partial(_make_one, root, seed, image_size, style)
  records = list(pools.pool_imap(make, items, max(int(workers), 1), chunksize=8, desc='demo data'))
  seg_dir = os.path.join(root, 'ImageSets', 'Segmentation')
  lists = {s: sorted(r['id'] for r in records if r['split'] == s) for s in SPLITS}
  voc.write_list(os.path.join(seg_dir, 'train.txt'), lists['train'])
  voc.write_list(os.path.join(seg_dir, 'val.txt'), lists['val'])
  voc.write_list(os.path.join(seg_dir, 'trainval.txt'), sorted(lists['train'] + lists['val']))
  hist = {s: dict.fromkeys(voc.CLASSES[1:], 0) for s in SPLITS + ('all',)}
  for r in records:
    for c in r['classes']:
      hist[r['split']][voc.CLASSES[c]] += 1
      hist['all'][voc.CLASSES[c]] += 1
  return {'root': root, 'seed': seed, 'num_images': len(records),
          'num_train': len(lists['train']), 'num_val': len(lists['val']), 'num_aug': len(lists['aug']),
          'num_objects': sum(r['objects'] for r in records),
          'num_difficult': sum(r['difficult'] for r in records), 'class_hist': hist}


def main(argv):
  del argv
  f = flags.FLAGS
  t0 = time.time()
  try:
    s = generate(f.root, f.num_train, f.num_val, f.num_aug, [int(v) for v in f.image_size], f.seed, f.workers,
                 [int(v) for v in f.classes], [float(v) for v in f.object_scale], f.clutter, f.plain, f.empty_p)
  except errors.DataError as e:
    sys.exit(str(e))
  print(f"wrote {s['num_images']} images ({s['num_train']} train, {s['num_val']} val, {s['num_aug']} aug-only), "
        f"{s['num_objects']} objects ({s['num_difficult']} difficult) under {f.root} in {time.time() - t0:.1f} s")
  print('images per class:', ' '.join(f'{k}={v}' for k, v in s['class_hist']['all'].items()))


if __name__ == '__main__':
  flags.DEFINE_string('root', None, 'output folder (the VOC2012 folder of the demo set)')
  flags.DEFINE_integer('seed', 0, 'generator seed')
  flags.DEFINE_integer('num_train', 160, 'ids in ImageSets/Segmentation/train.txt')
  flags.DEFINE_integer('num_val', 40, 'ids in ImageSets/Segmentation/val.txt')
  flags.DEFINE_integer('num_aug', 40, 'extra "SBD-only" ids (SegmentationClassAug, no VOC list)')
  flags.DEFINE_list('image_size', ['96', '128'], 'min,max of each image side')
  flags.DEFINE_list('classes', [str(c) for c in ALL_CLASSES], 'VOC class indices (1..20) the set draws from')
  flags.DEFINE_list('object_scale', ['0.15', '0.5'], 'min,max object diameter / shorter image side')
  flags.DEFINE_float('clutter', 1.0, 'background clutter strength in [0, 1] (hard set)')
  flags.DEFINE_bool('plain', False, 'the plain set: flat colour discs on grey noise (configs/demo.py)')
  flags.DEFINE_float('empty_p', 0.0, 'fraction of the train and aug ids without any object')
  flags.DEFINE_integer('workers', 0, 'process pool size (0: in-process); the output is the same')
  flags.mark_flag_as_required('root')
  app.run(main)
