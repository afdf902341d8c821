"""Random data styles nobody tuned to, for the robustness benchmark (benchmarks/robustness.py).

Draw k (of a base seed) is a plain demo set (seam_jax.data.demo_data) of 3-6 random VOC classes, each a distinct
shape of seam_jax.data.shapes in a random colour (hue uniform, saturation 0.45-1, value 0.35-1), over grey pixel
noise, smooth colour noise or clutter, objects 25-35% to 45-60% of the shorter side. Two hard pairs are in every
draw: two classes of one hue and saturation whose values differ by >= 0.35 (told apart by brightness and shape),
and two classes of exactly one colour (told apart by shape alone); every other pair of colours is >= 60 apart in
RGB. A draw is a JSON-serialisable dict that depends only on (base_seed, draw index).

  python -m seam_jax.data.style_draws --draws=0-7      # print the draws
"""
import json
import os

from absl import app, flags
import numpy as np

from seam_jax.common import errors, files
from seam_jax.data import demo_data, shapes, voc

STREAM = 2                   # generator key (base_seed, index, STREAM): never a demo set's or the pretraining's
NUM_CLASSES = (3, 6)         # inclusive
SATURATION = (0.45, 1.0)     # >= 0.45: no class colour is close to grey
VALUE = (0.35, 1.0)
VALUE_GAP = 0.35             # the equal-hue pair's values differ by at least this
MIN_RGB_DISTANCE = 60.       # between the colours of any two classes but the shape-only pair
CLUTTER = (0.4, 0.8)
OBJECT_SCALE = ((0.25, 0.35), (0.45, 0.6))   # ranges of the (min, max) object diameter / shorter side
LABEL_SOURCES = ('xml', 'masks')             # alternating with the draw index
EMPTY_P = 0.15               # train / aug ids without an object, as configs/demo.py
MARKER = 'style_draw.json'   # written last into a generated set: its draw, sizes and summary
LAYOUT = ('Annotations', 'ImageSets', 'JPEGImages', 'SegmentationClass', 'SegmentationClassAug', MARKER)
BACKGROUND_TEXT = {'grey': 'grey pixel noise', 'smooth': 'smooth colour noise', 'clutter': 'clutter'}


def rgb(hsv):
  return [int(round(float(c))) for c in shapes.hsv_to_rgb(*hsv)]


def _colours(rng, n, equal, same):
  """HSV of n classes: equal = (darker, brighter) share hue and saturation with values >= VALUE_GAP apart, same[1]
  copies same[0]; redrawn until every other pair is >= MIN_RGB_DISTANCE apart in RGB."""
  while True:
    hsv = [[rng.random(), rng.uniform(*SATURATION), rng.uniform(*VALUE)] for _ in range(n)]
    low = rng.uniform(VALUE[0], VALUE[1] - VALUE_GAP)
    hsv[equal[0]][2] = low
    hsv[equal[1]] = [hsv[equal[0]][0], hsv[equal[0]][1], rng.uniform(low + VALUE_GAP, VALUE[1])]
    hsv[same[1]] = list(hsv[same[0]])
    col = np.array([rgb(c) for c in hsv], np.float64)
    if all(np.linalg.norm(col[i] - col[j]) >= MIN_RGB_DISTANCE
           for i in range(n) for j in range(i + 1, n) if {i, j} != set(same)):
      return hsv


def describe(d):
  names = dict(zip(d['classes'], d['class_names']))
  (a, b), (c, e) = d['shape_only_pair'], d['equal_hue_pair']
  v = {k: h[2] for k, h in zip(d['classes'], d['hsv'])}
  bg = BACKGROUND_TEXT[d['background']] + (f" {d['clutter']:.2f}" if d['background'] == 'clutter' else '')
  return (f"{len(d['classes'])} classes ({', '.join(d['class_names'])}) on {bg}, labels from {d['label_source']}; "
          f"{names[a]}/{names[b]} one colour, {names[c]}/{names[e]} one hue (values {v[c]:.2f}/{v[e]:.2f})")


def draw(draw_index, base_seed=0):
  """Style draw `draw_index` of `base_seed`: the classes (VOC indices, ascending) with their HSV and RGB colours and
  SHAPES indices, the two hard pairs (class indices), background, clutter, object_scale, label_source, description."""
  rng = np.random.default_rng([int(base_seed), int(draw_index), STREAM])
  n = int(rng.integers(NUM_CLASSES[0], NUM_CLASSES[1] + 1))
  classes = sorted(int(c) + 1 for c in rng.choice(voc.NUM_FG, n, replace=False))
  slots = [int(k) for k in rng.permutation(n)]
  equal = slots[:2]
  same = [equal[int(rng.integers(2))], slots[2]] if n == 3 else slots[2:4]
  shape_ids = [int(k) for k in rng.choice(len(shapes.SHAPES), n, replace=False)]
  background = shapes.BACKGROUNDS[int(rng.integers(len(shapes.BACKGROUNDS)))]
  clutter = float(rng.uniform(*CLUTTER))
  object_scale = [float(rng.uniform(*r)) for r in OBJECT_SCALE]
  hsv = [[float(x) for x in c] for c in _colours(rng, n, equal, same)]
  d = {'draw_index': int(draw_index), 'base_seed': int(base_seed), 'classes': classes,
       'class_names': [voc.CLASSES[c] for c in classes], 'hsv': hsv, 'palette': [rgb(c) for c in hsv],
       'shapes': shape_ids, 'shape_names': [shapes.SHAPE_NAMES[k] for k in shape_ids],
       'equal_hue_pair': [classes[k] for k in equal], 'shape_only_pair': [classes[k] for k in same],
       'background': background, 'clutter': clutter if background == 'clutter' else 0.,
       'object_scale': object_scale, 'label_source': LABEL_SOURCES[int(draw_index) % len(LABEL_SOURCES)]}
  d['description'] = describe(d)
  return d


def _read_marker(root):
  path = os.path.join(root, MARKER)
  return files.read_json(path, 'style draw marker') if os.path.isfile(path) else None


def generate(root, style_draw, num_train=160, num_val=40, num_aug=40, image_size=(96, 128), data_seed=0, workers=0):
  """Write the VOC-layout set of `style_draw` under `root` (demo_data.generate, plain) and return its summary; a
  root that already holds this very set (MARKER: same draw, sizes and seed) is left as it is. A root holding
  anything else (another draw, other files or images) is a DataError before anything is written."""
  record = {'style_draw': style_draw, 'num_train': int(num_train), 'num_val': int(num_val), 'num_aug': int(num_aug),
            'image_size': [int(v) for v in image_size], 'data_seed': int(data_seed)}
  old = _read_marker(root)
  if old is not None:
    if {k: old.get(k) for k in record} == json.loads(json.dumps(record)):
      return old['summary']
    raise errors.DataError(f'{root} holds another style draw ({old["style_draw"].get("description")}, '
                           f'{old.get("num_train")} train ids): use another folder')
  other = sorted(set(os.listdir(root)) - set(LAYOUT)) if os.path.isdir(root) else []
  if other:
    raise errors.DataError(f'{root} holds files that are no generated set (e.g. {other[0]}): use an empty folder')
  summary = demo_data.generate(
      root, num_train, num_val, num_aug, image_size, data_seed, workers, classes=style_draw['classes'],
      object_scale=style_draw['object_scale'], clutter=style_draw['clutter'] or 1.0, plain=True, empty_p=EMPTY_P,
      palette=style_draw['palette'], shapes=style_draw['shapes'], background=style_draw['background'])
  files.atomic_write_text(os.path.join(root, MARKER), json.dumps(dict(record, summary=summary), indent=1))
  return summary


def parse_range(text):
  """'0-7' or '0,3,5-6' -> [0, 1, ...] (sorted, each once); a malformed list is a DataError."""
  out = set()
  try:
    for part in filter(None, (p.strip() for p in str(text).split(','))):
      lo, _, hi = part.partition('-')
      out.update(range(int(lo), int(hi or lo) + 1))
  except ValueError as e:
    raise errors.DataError(f'expected indices like 0-7 or 0,3,5-6, got {text!r}') from e
  if not out:
    raise errors.DataError(f'expected indices like 0-7 or 0,3,5-6, got {text!r}')
  return sorted(out)


def main(argv):
  del argv
  for k in parse_range(flags.FLAGS.draws):
    d = draw(k, flags.FLAGS.base_seed)
    print(f'{k}: {d["description"]}' if not flags.FLAGS.json else json.dumps(d))


if __name__ == '__main__':
  flags.DEFINE_string('draws', '0-7', 'draw indices: 0-7 or 0,3,5-6')
  flags.DEFINE_integer('base_seed', 0, 'seed of the draws')
  flags.DEFINE_bool('json', False, 'print each draw as a JSON line')
  app.run(main)
