"""The demo's backbone pretraining stage: its synthetic classification set (seam_jax.data.pretrain_data), its task
(seam_jax.train.pretrain_task) and the hand-over of its export to SEAM through layout.init_weights."""
import flax
import jax
import numpy as np
import pytest

from configs import demo
from seam_jax import layout, stages
from seam_jax.common import errors
from seam_jax.data import pretrain_data, voc
from seam_jax.train import pretrain_task, seam_task, trainer


def test_set_is_a_function_of_seed_and_index_and_its_labels_follow_the_object():
  a, b = pretrain_data.PretrainSource(60, 32, 0), pretrain_data.PretrainSource(60, 32, 1)
  textures, backgrounds, cover = set(), 0, []
  for k in range(60):
    img, mask, obj = pretrain_data.render(0, k, 32)
    again = pretrain_data.render(0, k, 32)
    assert np.array_equal(img, again[0]) and np.array_equal(mask, again[1]) and obj == again[2]
    assert not np.array_equal(img, pretrain_data.render(1, k, 32)[0])
    rec = a[k]
    np.testing.assert_array_equal(rec['image'], voc.normalize(img))
    assert rec['colour'].shape == (pretrain_data.NUM_COLOURS,) and abs(rec['colour'].sum() - 1) < 1e-5
    if obj is None:   # a background alone: the background class, no texture
      backgrounds += 1
      assert not mask.any() and rec['colour'][-1] == 1 and rec['texture'] == -1
      continue
    (hue, sat, value), texture = obj
    assert rec['colour'][-1] == 0 and rec['texture'] == texture
    np.testing.assert_array_equal(rec['colour'], pretrain_data.colour_target(hue, value))
    textures.add(texture)
    cover.append(mask.mean())
  assert textures == set(range(len(pretrain_data.TEXTURES))) and 1 <= backgrounds <= 15   # binomial(60, 0.1)
  assert np.median(cover) > .5                    # the object fills most of the image (object_scale 1.5-2)
  assert any(not np.array_equal(a[k]['colour'], b[k]['colour']) for k in range(60))


def test_colour_targets_are_smooth_and_tell_brightness_apart():
  """Soft targets over hue x value bins: the mass sits at the nearest bins, a hue between two bin centres is shared
  by both (no hard edge), one hue at values 0.45 and 0.9 gets two targets (total variation > 0.5), and a small hue
  change moves the target a little."""
  tv = lambda p, q: .5 * np.abs(p - q).sum()
  n, values = pretrain_data.HUE_BINS, pretrain_data.VALUE_BINS
  target = lambda h, v: pretrain_data.colour_target(h, v)[:-1].reshape(n, len(values))
  for k in range(n):
    t = target(k / n, values[1])
    assert t.argmax() == k * len(values) + 1
    edge = target((k + .5) / n, values[1]).sum(1)
    assert abs(edge[k] - edge[(k + 1) % n]) < 1e-5 and edge[k] > .4
    assert tv(pretrain_data.colour_target(k / n, .45), pretrain_data.colour_target(k / n, .9)) > .5
    assert tv(pretrain_data.colour_target(k / n, .9), pretrain_data.colour_target(k / n + .01, .9)) < .2


@pytest.mark.parametrize('kw, match', [(dict(size=16), 'image_size'), (dict(num_images=0), 'num_images'),
                                       (dict(object_scale=(0.5, 0.2)), 'object_scale'),
                                       (dict(object_scale=(0., 1.)), 'object_scale')])
def test_bad_set_parameters(kw, match):
  args = dict(num_images=8, size=32, seed=0)
  with pytest.raises(errors.DataError, match=match):
    pretrain_data.PretrainSource(**{**args, **kw})


def make_config(tmp_path):
  c = demo.get_config('tiny')
  c.workdir = str(tmp_path)
  c.pretrain.update(num_images=64, image_size=32, batch_size=16, max_steps=60, lr=0.02,
                    log_every=20, ckpt_every=100, fast_compile=True)
  return c


@pytest.mark.slow
def test_pretraining_learns_and_seam_starts_from_its_backbone(tmp_path):
  config = make_config(tmp_path)
  assert stages.select('', config)[:4] == ['demo', 'prepare', 'pretrain', 'train']
  assert layout.init_weights(config) == layout.export_dir(config, 'pretrain')
  variables = pretrain_task.run(config)
  logs = [__import__('json').loads(l) for l in open(tmp_path / 'pretrain' / 'metrics.jsonl')]
  # The bar for the colour term: the cross-entropy of the best constant guess, the set's mean target (a net that
  # learnt nothing of the images reaches at best that).
  source = pretrain_task.pretrain_source(config.pretrain, config.seed)
  targets = np.stack([source[k]['colour'] for k in range(len(source))])
  constant = float(np.mean(-np.sum(targets * np.log(targets.mean(0)), -1)))
  print('pretrain colour loss per log step:', [round(l['colour'], 3) for l in logs], 'constant guess',
        round(constant, 3))
  assert logs[-1]['step'] == 60
  assert logs[-1]['colour'] < constant and logs[-1]['loss'] < logs[0]['loss']
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
