"""The demo's backbone pretraining stage: its synthetic classification set (seam_jax.data.pretrain_data), its task
(seam_jax.train.pretrain_task) and the hand-over of its export to SEAM through layout.init_weights."""
import colorsys

import flax
import jax
import numpy as np
import pytest

from configs import demo
from seam_jax import layout, stages
from seam_jax.common import errors
from seam_jax.data import pretrain_data, voc
from seam_jax.train import pretrain_task, seam_task, trainer


def test_set_is_a_function_of_seed_and_index_and_labels_are_hue_bins():
  a, b = pretrain_data.PretrainSource(40, 48, 12, 0), pretrain_data.PretrainSource(40, 48, 12, 1)
  centred = pretrain_data.PretrainSource(40, 48, 12, 0, centred_bins=True)
  labels = []
  for k in range(40):
    img, mask, hue = pretrain_data.render(0, k, 48)
    again, _, _ = pretrain_data.render(0, k, 48)
    assert np.array_equal(img, again) and not np.array_equal(img, pretrain_data.render(1, k, 48)[0])
    assert 30 <= mask.sum() < .7 * 48 * 48      # a visible object, background around it
    # The object is flat-filled with a colour of hue `hue` (uint8 rounding moves the hue by < 1/255 of a turn
    # per channel step, over a chroma of at least 0.3 * 0.35 * 255 = 27 levels: < 1 / (6 * 27) of a turn).
    r, g, bb = img[mask][0] / 255.
    assert (img[mask] == img[mask][0]).all()
    d = abs(colorsys.rgb_to_hsv(r, g, bb)[0] - hue)
    assert min(d, 1 - d) < 1 / (6 * 26)
    assert int(a[k]['label']) == int(hue * 12) and a[k]['image'].dtype == np.float32
    assert int(centred[k]['label']) == int(hue * 12 + .5) % 12
    np.testing.assert_array_equal(a[k]['image'], voc.normalize(img))
    labels.append(int(a[k]['label']))
  assert len(set(labels)) >= 8                    # the classes are spread over the wheel
  assert any(int(a[k]['label']) != int(b[k]['label']) for k in range(40))
  assert any(int(a[k]['label']) != int(centred[k]['label']) for k in range(40))
  # Edge bins [k, k + 1) / 12; centred bins [k - 1/2, k + 1/2) / 12: the demo's hue 1/2 is a bin centre there.
  assert [pretrain_data.hue_label(h, 12) for h in (.49, .5, .53, .99)] == [5, 6, 6, 11]
  assert [pretrain_data.hue_label(h, 12, centred=True) for h in (.49, .5, .53, .99)] == [6, 6, 6, 0]


def test_object_scale_fills_the_image():
  """object_scale (1.5, 2) (the demo's): the object covers most of the image, for most shapes (a disk of diameter
  >= 1.5 sides centred in the middle half covers the whole square; the thin shapes, ring, cross or frame, less),
  and always some of it."""
  src = pretrain_data.PretrainSource(40, 32, 12, 0, (1.5, 2.0))
  cover = [pretrain_data.render(0, k, 32, src.object_scale)[1].mean() for k in range(40)]
  assert np.median(cover) > .55 and min(cover) > .05 and max(cover) > .95
  assert np.median([pretrain_data.render(0, k, 32)[1].mean() for k in range(40)]) < .4   # the default: small


def test_grey_class():
  """grey_class: about 1 / (num_classes + 1) of the images are grey noise alone (every channel alike up to the pixel
  noise), labelled num_classes; the others are the images of the set without it."""
  plain, grey = (pretrain_data.PretrainSource(120, 32, 5, 0, (1.5, 2.0), g) for g in (False, True))
  assert (plain.num_labels, grey.num_labels) == (5, 6)
  labels = [int(grey[k]['label']) for k in range(120)]
  assert 8 <= labels.count(5) <= 35 and set(labels) == set(range(6))     # binomial(120, 1/6): mean 20, sd 4.1
  for k in range(120):
    if labels[k] == 5:
      img = pretrain_data.render_grey(0, k, 32).astype(float)
      assert np.abs(img.mean(axis=(0, 1)) - img.mean()).max() < 10        # no hue: channel means alike
    else:
      np.testing.assert_array_equal(grey[k]['image'], plain[k]['image'])
  with pytest.raises(errors.DataError, match='num_classes'):
    pretrain_data.PretrainSource(8, 32, 21, 0, grey_class=True)


@pytest.mark.parametrize('kw, match', [(dict(num_classes=22), 'num_classes'), (dict(num_classes=1), 'num_classes'),
                                       (dict(size=16), 'image_size'), (dict(object_scale=(0.5, 0.2)), 'object_scale'),
                                       (dict(object_scale=(0., 1.)), 'object_scale')])
def test_bad_set_parameters(kw, match):
  args = dict(num_images=8, size=48, num_classes=12, seed=0)
  with pytest.raises(errors.DataError, match=match):
    pretrain_data.PretrainSource(**{**args, **kw})


def make_config(tmp_path):
  c = demo.get_config('tiny')
  c.workdir = str(tmp_path)
  c.pretrain.update(num_images=64, image_size=32, num_classes=4, batch_size=16, max_steps=60, lr=0.02,
                    log_every=20, ckpt_every=100, fast_compile=True)
  return c


@pytest.mark.slow
def test_pretraining_learns_and_seam_starts_from_its_backbone(tmp_path):
  config = make_config(tmp_path)
  assert stages.select('', config)[:4] == ['demo', 'prepare', 'pretrain', 'train']
  assert layout.init_weights(config) == layout.export_dir(config, 'pretrain')
  variables = pretrain_task.run(config)
  logs = [__import__('json').loads(l) for l in open(tmp_path / 'pretrain' / 'metrics.jsonl')]
  # Chance: the cross-entropy of a uniform guess over the 4 hue bins and the grey class.
  chance = np.log(config.pretrain.num_classes + config.pretrain.grey_class)
  print('pretrain loss per log step:', [round(l['loss'], 3) for l in logs], 'chance', round(chance, 3))
  assert config.pretrain.grey_class and logs[-1]['step'] == 60
  assert logs[-1]['loss'] < 0.8 * chance and logs[-1]['loss'] < logs[0]['loss']
  # The running statistics followed the data (init: mean 0, var 1).
  bn = variables['batch_stats']['backbone']['b3']['bn_branch2a']
  assert not np.allclose(bn['mean'], 0., atol=1e-3) and not np.allclose(bn['var'], 1., atol=1e-2)

  # SEAM's initial variables: the pretrained backbone (params and statistics), its own freshly initialised head.
  with config.unlocked():
    config.model.calibrate_bn = True   # ignored: initial weights exist
  init = trainer.init_variables(config, seam_task.seam_task(config, make_loader=lambda seed: (None, 0)),
                                jax.random.PRNGKey(0))
  flat = lambda t: flax.traverse_util.flatten_dict(t)
  for col in ('params', 'batch_stats'):
    got, want = flat(init[col]['backbone']), flat(variables[col]['backbone'])
    assert got.keys() == want.keys()
    for k in got:
      np.testing.assert_array_equal(got[k], want[k])
  assert 'fc8' in init['params']


def test_pretraining_off_gives_a_random_start(tmp_path):
  config = make_config(tmp_path)
  with config.unlocked():
    config.pretrain.enabled = False
  assert layout.init_weights(config) == '' and 'pretrain' not in stages.select('', config)
  with config.unlocked():
    config.model.init_weights = '/x/imagenet.params'
  assert layout.init_weights(config) == '/x/imagenet.params'
