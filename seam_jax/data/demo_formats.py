"""The generated demo set (seam_jax.data.demo_data: its images and masks, nothing drawn again) also in COCO format
and as images + a label CSV, with 7 classes instead of 20: for the tests of seam_jax.data.coco and csv_labels and
the end-to-end runs on those formats.

  <root>/VOC2012/                          the VOC-layout set of the 7 classes (demo_data.generate)
  <root>/coco/instances_{train,val}.json   non-crowd regions as compressed RLE (round trip exact)
  <root>/coco/polygons_{train,val}.json    the same regions as polygons (cv2.findContours, exact up to the boundary)
  <root>/csv/{train,val}.csv               image-level labels, names separated by ';'

Both formats name the images of <root>/VOC2012/JPEGImages as `<id>.jpg`; train = VOC train + aug ids, val = VOC
val. Categories carry COCO's own ids for these names (person 1, car 3, aeroplane 5, train 7, bird 16, cat 17, dog 18)
and are listed in the JSON in reverse, so the readers' order (by id) renumbers VOC's. Every non-background class
region of a mask becomes one annotation per connected component; the mask's void band (255, along every object
boundary) becomes one crowd annotation per image (uncompressed RLE, as COCO stores crowds; labelled with the image's
first class present, which crowd labels do not count), so the readers' masks equal the VOC masks mapped by
class_lut().

  python -c "from seam_jax.data import demo_formats; demo_formats.generate('work_dirs/formats', num_train=1000)"
"""
import csv
import io
import json
import os

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from seam_jax.common import files
from seam_jax.data import demo_data, voc

# VOC class index -> COCO category id, for the 7 demo classes.
CATEGORY_IDS = {1: 5, 3: 16, 7: 3, 8: 17, 12: 18, 15: 1, 19: 7}
VOC_CLASSES = tuple(sorted(CATEGORY_IDS))
CLASSES = tuple(voc.CLASSES[c] for c in sorted(CATEGORY_IDS, key=CATEGORY_IDS.get))   # reader order: by category id
SPLITS = {'train': ('train', 'aug'), 'val': ('val',)}


def class_lut():
  """uint8[256]: VOC mask value -> mask value of the converted set (class index by category id + 1; 0, 255 kept)."""
  lut = np.arange(256, dtype=np.uint8)
  for c in VOC_CLASSES:
    lut[c] = CLASSES.index(voc.CLASSES[c]) + 1
  return lut


def uncompressed_rle(binary):
  """COCO's uncompressed RLE {'size', 'counts': [zeros, ones, ...]} of a boolean HW mask (column-major)."""
  flat = np.asarray(binary, bool).ravel(order='F')
  runs = np.diff(np.r_[0, np.flatnonzero(np.diff(flat)) + 1, flat.size]).tolist()
  return {'size': list(binary.shape), 'counts': ([0] if flat[0] else []) + runs}


def _polygons(component):
  """COCO polygons of one connected region: its outer contour through the boundary pixels' centres (+0.5); a region
  too thin for 3 contour points becomes its box."""
  contours, _ = cv2.findContours(component.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
  out = []
  for c in contours:
    xy = c.reshape(-1, 2).astype(np.float64)
    if len(xy) < 3:
      (x0, y0), (x1, y1) = xy.min(0), xy.max(0) + 1
      xy = np.array([(x0, y0), (x1, y0), (x1, y1), (x0, y1)]) - .5
    out.append((xy + .5).ravel().tolist())
  return out


def annotations(mask, polygons=False):
  """[(VOC class, iscrowd, segmentation, area in px)] of one VOC mask: one per connected class region (RLE or
  polygons) and the void band as one crowd."""
  out = []
  for c in (int(v) for v in np.unique(mask) if int(v) in CATEGORY_IDS):
    n, comp = cv2.connectedComponents((mask == c).astype(np.uint8), connectivity=8)
    for k in range(1, n):
      region = comp == k
      if polygons:
        seg = _polygons(region)
      else:
        rle = mask_utils.encode(np.asfortranarray(region.astype(np.uint8)))
        seg = {'size': list(mask.shape), 'counts': rle['counts'].decode('ascii')}
      out.append((c, 0, seg, int(region.sum())))
  if (mask == voc.IGNORE).any() and out:
    out.append((out[0][0], 1, uncompressed_rle(mask == voc.IGNORE), int((mask == voc.IGNORE).sum())))
  return out


def coco_json(voc_root, ids, polygons=False):
  """The instances dict of `ids` of the VOC-layout set at voc_root."""
  images, anns = [], []
  for n, image_id in enumerate(ids):
    mask = voc.load_mask(os.path.join(voc_root, 'SegmentationClassAug', image_id + '.png'))
    images.append({'id': n + 1, 'file_name': image_id + '.jpg', 'height': mask.shape[0], 'width': mask.shape[1]})
    for c, crowd, seg, area in annotations(mask, polygons):
      anns.append({'id': len(anns) + 1, 'image_id': n + 1, 'category_id': CATEGORY_IDS[c], 'iscrowd': crowd,
                   'area': area, 'segmentation': seg})
  cats = [{'id': CATEGORY_IDS[c], 'name': voc.CLASSES[c], 'supercategory': 'demo'}
          for c in sorted(VOC_CLASSES, key=CATEGORY_IDS.get, reverse=True)]
  return {'info': {'description': 'seam_jax demo set'}, 'images': images, 'annotations': anns, 'categories': cats}


def label_csv(voc_root, ids):
  """The label CSV text of `ids`: `image,labels` rows with the classes of each mask joined by ';'."""
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator='\n')
  w.writerow(['image', 'labels'])
  for image_id in ids:
    mask = voc.load_mask(os.path.join(voc_root, 'SegmentationClassAug', image_id + '.png'))
    names = [voc.CLASSES[c] for c in np.unique(mask).tolist() if c in CATEGORY_IDS]
    w.writerow([image_id + '.jpg', ';'.join(names)])
  return buf.getvalue()


def split_ids(voc_root):
  """{'train': VOC train + aug ids, 'val': VOC val ids} of a generated demo set (sorted)."""
  listed = {s: voc.read_list(os.path.join(voc_root, 'ImageSets', 'Segmentation', s + '.txt'))
            for s in ('train', 'val')}
  every = sorted(os.path.splitext(f)[0] for f in os.listdir(os.path.join(voc_root, 'JPEGImages')))
  listed['aug'] = sorted(set(every) - set(listed['train']) - set(listed['val']))
  return {split: sorted(i for s in parts for i in listed[s]) for split, parts in SPLITS.items()}


def paths(root):
  """Where generate() writes: image_dir, and per split the RLE JSON, the polygon JSON and the CSV."""
  out = {'voc_root': os.path.join(root, 'VOC2012'), 'image_dir': os.path.join(root, 'VOC2012', 'JPEGImages')}
  for split in SPLITS:
    out[f'{split}_json'] = os.path.join(root, 'coco', f'instances_{split}.json')
    out[f'{split}_polygons'] = os.path.join(root, 'coco', f'polygons_{split}.json')
    out[f'{split}_csv'] = os.path.join(root, 'csv', f'{split}.csv')
  return out


def generate(root, num_train=16, num_val=8, num_aug=4, image_size=(64, 96), seed=0, workers=0, plain=True,
             empty_p=0.1):
  """Generate the 7-class demo set at <root>/VOC2012 and write it in both formats; returns paths(root). The plain
  style (discs) keeps class regions free of background holes, which COCO polygons cannot express."""
  p = paths(root)
  demo_data.generate(p['voc_root'], num_train, num_val, num_aug, image_size, seed, workers, classes=VOC_CLASSES,
                     plain=plain, empty_p=empty_p)
  for split, ids in split_ids(p['voc_root']).items():
    for key, polygons in ((f'{split}_json', False), (f'{split}_polygons', True)):
      files.atomic_write_text(p[key], json.dumps(coco_json(p['voc_root'], ids, polygons)))
    files.atomic_write_text(p[f'{split}_csv'], label_csv(p['voc_root'], ids))
  return p

