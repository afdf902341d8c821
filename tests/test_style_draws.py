"""Tests of the random data styles (seam_jax.data.style_draws), the demo generator's style fields and the robustness
benchmark's aggregation and dry run (benchmarks/robustness.py)."""
import hashlib
import itertools
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import numpy as np
from PIL import Image
import pytest

from benchmarks import robustness
from seam_jax.common import errors
from seam_jax.data import demo_data, shapes, style_draws, voc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(num_train=8, num_val=4, num_aug=0, image_size=(48, 64))


def test_draws_are_deterministic_serialisable_and_keep_their_constraints():
  draws = [style_draws.draw(k) for k in range(50)]
  assert draws[7] == style_draws.draw(7) and draws[7] != style_draws.draw(7, base_seed=1)
  for k, d in enumerate(draws):
    assert json.loads(json.dumps(d)) == d
    c = d['classes']
    n = len(c)
    assert 3 <= n <= 6 and c == sorted(set(c)) and set(c) <= set(range(1, voc.NUM_FG + 1))
    assert d['class_names'] == [voc.CLASSES[i] for i in c] and all(x in d['description'] for x in d['class_names'])
    assert len(set(d['shapes'])) == n and d['shape_names'] == [shapes.SHAPE_NAMES[i] for i in d['shapes']]
    assert d['palette'] == [style_draws.rgb(h) for h in d['hsv']]
    assert all(.45 <= s <= 1 and .35 <= v <= 1 for _, s, v in d['hsv'])
    hsv = dict(zip(c, d['hsv']))
    (a, b), (e, f) = d['equal_hue_pair'], d['shape_only_pair']
    assert hsv[a][:2] == hsv[b][:2] and abs(hsv[a][2] - hsv[b][2]) >= .35
    assert hsv[e] == hsv[f] and e != f
    rgb = dict(zip(c, np.array(d['palette'], float)))
    for i, j in itertools.combinations(c, 2):
      if {i, j} != {e, f}:
        assert np.linalg.norm(rgb[i] - rgb[j]) >= style_draws.MIN_RGB_DISTANCE, (k, i, j)
    assert d['background'] in shapes.BACKGROUNDS and (d['background'] == 'clutter') == (d['clutter'] > 0)
    assert .25 <= d['object_scale'][0] <= .35 and .45 <= d['object_scale'][1] <= .6
    assert d['label_source'] == ('xml', 'masks')[k % 2]
  assert {len(d['classes']) for d in draws} == {3, 4, 5, 6}
  assert {d['background'] for d in draws} == set(shapes.BACKGROUNDS)


def _erode(m, r):
  h, w = m.shape
  p = np.pad(m, r)
  return np.logical_and.reduce([p[dy:dy + h, dx:dx + w] for dy in range(2 * r + 1) for dx in range(2 * r + 1)])


def _first_draw(background):
  return next(d for d in map(style_draws.draw, itertools.count()) if d['background'] == background)


@pytest.mark.parametrize('background', shapes.BACKGROUNDS)
def test_generated_set_draws_the_palette_and_its_labels_agree(tmp_path, background):
  d = _first_draw(background)
  root = str(tmp_path / 'VOC2012')
  s = style_draws.generate(root, d, data_seed=1, **SMALL)
  assert s['num_images'] == 12 and {c for c, k in s['class_hist']['all'].items() if k} <= set(d['class_names'])
  colour = dict(zip(d['classes'], d['palette']))
  ids = sorted(f[:-4] for f in os.listdir(os.path.join(root, 'JPEGImages')))
  seen, bg = set(), []
  for i in ids:
    img = np.asarray(Image.open(os.path.join(root, 'JPEGImages', i + '.jpg')), np.float32)
    m = voc.load_mask(os.path.join(root, 'SegmentationClassAug', i + '.png'))
    names = {o.find('name').text for o in ET.parse(os.path.join(root, 'Annotations', i + '.xml')).iter('object')}
    present = set(np.unique(m).tolist()) - {0, 255}
    assert names == {voc.CLASSES[c] for c in present}, i
    for c in present:   # the interior (2 px in from the void band) is the flat palette colour + noise std 4 + JPEG
      inner = _erode(m == c, 2)
      if inner.sum() >= 10:
        assert np.all(np.abs(img[inner].mean(0) - colour[c]) <= 12), (i, c, img[inner].mean(0), colour[c])
        seen.add(c)
    bg.append(img[_erode(m == 0, 2)])
  assert len(seen) >= 2   # thin shapes (a ring) may have no interior this small
  bg = np.concatenate(bg)
  spread = np.abs(bg - bg.mean(1, keepdims=True)).mean()   # how far pixels are from grey: measured 4.5, 12.9, 12.5
  assert (spread < 8) if background == 'grey' else (spread > 9), spread
  assert style_draws.generate(root, d, data_seed=1, **SMALL) == s                   # its own set: left as it is
  with pytest.raises(errors.DataError, match='another style draw'):
    style_draws.generate(root, style_draws.draw(99), data_seed=1, **SMALL)


def test_style_fields_are_checked(tmp_path):
  kw = dict(SMALL, plain=True, classes=(3, 7))
  for bad, match in ((dict(palette=((1, 2, 3),)), 'palette'), (dict(palette=((1, 2, 300), (0, 0, 0))), 'palette'),
                     (dict(shapes=(0, 20)), 'shapes'), (dict(background='stripes'), 'background'),
                     (dict(shapes=(0, 1), plain=False), 'plain set only')):
    with pytest.raises(errors.DataError, match=match):
      demo_data.generate(str(tmp_path / 'x'), **dict(kw, **bad))
  os.makedirs(tmp_path / 'y' / 'mine')
  with pytest.raises(errors.DataError, match='no generated set'):
    style_draws.generate(str(tmp_path / 'y'), style_draws.draw(0), **SMALL)


# sha1 of render(seed, index, primary, (48, 64), style): img, mask and repr(objects), computed with the code from
# before the style fields (palette, shapes, background) were added: the default sets must stay byte-identical.
PLAIN = demo_data.Style(classes=(1, 6, 8, 15), object_scale=(0.3, 0.5), plain=True, empty_p=0.15)
DIGESTS = [(PLAIN, 0, 0, 1, '13d2f3e2bb84b324c06c4fc92707507822eec4aa'),
           (PLAIN, 0, 1, 0, 'a64366dacfda11d9100fb4f95407d6d604659a60'),
           (PLAIN, 3, 5, 15, 'db1976292cc66963ada258632d298b584bafd30e'),
           (demo_data.Style(), 0, 2, 7, '544c548ec0b5ba5c5c74ce61abc3c292b21c3b78'),
           (demo_data.Style(), 1, 3, 0, 'e40a538803e13e5ff894e64068d1d5b08c726a27'),
           (demo_data.Style(), 5, 9, 20, '0818425f7b85870707e952f22343d4da8bbb2e68')]


@pytest.mark.parametrize('style,seed,index,primary,want', DIGESTS)
def test_default_plain_and_hard_sets_are_unchanged(style, seed, index, primary, want):
  img, mask, objects = demo_data.render(seed, index, primary, (48, 64), style)
  assert hashlib.sha1(img.tobytes() + mask.tobytes() + repr(objects).encode()).hexdigest() == want


def fake_summary(classes, rw_iou, seg_iou, seam_cam=70., base_cam=60., base_rw=65.):
  """A summary.json as seam_jax.report writes it: runs.<run>.<evaluation> {miou, miou_present, per_class, present}
  and stage rows; `classes` {name: IoU after the CAM}, rw_iou / seg_iou {name: IoU}."""
  def ev(miou_present, per_class):
    return {'miou': miou_present / 2, 'miou_present': miou_present, 'present': ['background'] + list(per_class),
            'per_class': {c: {'background': 90., **per_class}.get(c, 0.) for c in voc.CLASSES}}
  mean = lambda d: (90. + sum(d.values())) / (len(d) + 1)
  runs = {'seam': {'cam': ev(seam_cam, classes), 'crf_1.0': ev(seam_cam + 1, classes), 'crf_4.0': ev(1., classes),
                   'rw': ev(mean(rw_iou), rw_iou), 'seg': ev(mean(seg_iou), seg_iou)},
          'baseline': {'cam': ev(base_cam, classes), 'rw': ev(base_rw, classes)}}
  stages = [{'run': r, 'stage': 'train', 'status': 'done', 'seconds': 60., 'run_seconds': 60., 'scores': {}}
            for r in runs] + [{'run': 'seam', 'stage': 'rw', 'status': 'skipped', 'seconds': 0., 'run_seconds': 30.,
                               'scores': {}}]
  return {'classes': list(voc.CLASSES), 'stages': stages, 'runs': runs}


def test_aggregation_goal_verdicts():
  d = style_draws.draw(0)
  a, b = d['class_names'][:2]
  good = fake_summary({a: 70., b: 60.}, {a: 80., b: 70.}, {a: 85., b: 75.})
  bad = fake_summary({a: 70., b: 60.}, {a: 80., b: 40.}, {a: 85., b: 75.}, base_rw=99.)
  res = lambda s, seed: {'draw': 0, 'seed': seed, 'workdir': f'w{seed}', 'status': 'ok', 'summary': s}
  verdicts = lambda doc: [g['verdict'] for g in doc['goals']]
  assert verdicts(robustness.aggregate({0: d}, [res(good, 0)])) == ['PASS'] * 4
  doc = robustness.aggregate({0: d}, [res(good, 0), res(bad, 1)])
  assert verdicts(doc) == ['FAIL', 'PASS', 'FAIL', 'PASS']
  assert [g['passed'] for g in doc['goals']] == [1, 2, 1, 2] and doc['goals'][0]['total'] == 2
  r = doc['runs'][1]
  assert r['lowest']['rw'] == [b, 40.] and r['crf'] == 'crf_1.0' and r['seconds'] == {'seam': 90., 'baseline': 60.,
                                                                                        'total': 150.}
  assert r['miou']['seam/crf'] == 71. and r['miou']['baseline/rw'] == 99.
  md = robustness.markdown(json.loads(json.dumps(doc)))
  assert '**FAIL**' in md and '**PASS**' in md and f'{b} 40.0' in md and '## Spread over seeds' in md
  assert f"#{'%02x%02x%02x' % tuple(d['palette'][1])}" in md and d['shape_names'][1] in md
  failed = robustness.aggregate({0: d}, [res(good, 0), {'draw': 0, 'seed': 1, 'workdir': 'w1', 'status': 'failed'}])
  assert verdicts(failed) == ['FAIL'] * 4 and 'failed' in robustness.markdown(failed)


def test_dry_run_generates_the_set_and_prints_the_commands(tmp_path):
  root = str(tmp_path / 'rb')
  cmd = [sys.executable, '-m', 'benchmarks.robustness', '--draws=1', '--seeds=0,2', f'--root={root}', '--dry_run',
         '--num_train=4', '--num_val=2', '--num_aug=0', '--image_size=48,64', '--override=--config.train.max_steps=2']
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
  assert out.returncode == 0, out.stderr[-2000:]
  lines = [l for l in out.stdout.splitlines() if ' -m seam_jax ' in l]
  assert len(lines) == 2
  for seed, line in zip((0, 2), lines):
    for part in (f'--config.workdir={root}/d1_s{seed}', f'--config.data.voc_root={root}/data_1/VOC2012',
                 '--config.data.label_source=masks', f'--config.seed={seed}', '--config.pipeline.compare_baseline=True',
                 '--config.train.max_steps=2', '--config=configs/demo.py'):
      assert part in line.split(), part
  with open(os.path.join(root, 'data_1', 'VOC2012', style_draws.MARKER)) as f:
    assert json.load(f)['style_draw'] == style_draws.draw(1)
  assert sorted(os.listdir(root)) == ['data_1']   # nothing run
