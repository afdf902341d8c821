"""The demo's backbone pretraining stage: its synthetic classification set (seam_jax.data.pretrain_data), its task
(seam_jax.train.pretrain_task) and the hand-over of its export to SEAM through layout.init_weights."""
import flax
import jax
import numpy as np
import pytest

from configs import demo
from seam_jax import layout, stages
from seam_jax.common import errors
from seam_jax.data import demo_data, pretrain_data, voc
from seam_jax.train import pretrain_task, seam_task, trainer


def test_set_is_a_function_of_seed_and_index_and_every_cell_is_labelled():
  a, b = pretrain_data.PretrainSource(40, 48, 0), pretrain_data.PretrainSource(40, 48, 1)
  shapes, textures, counts = set(), set(), []
  for k in range(40):
    img, ids, objects = pretrain_data.render(0, k, 48)
    again = pretrain_data.render(0, k, 48)
    assert np.array_equal(img, again[0]) and np.array_equal(ids, again[1]) and objects == again[2]
    assert not np.array_equal(img, pretrain_data.render(1, k, 48)[0])
    rec = a[k]
    np.testing.assert_array_equal(rec['image'], voc.normalize(img))
    assert rec['colour'].shape == (6, 6, len(pretrain_data.COLOUR_PROTOTYPES))
    np.testing.assert_allclose(rec['colour'].sum(-1), 1., rtol=1e-5)
    cover = (ids >= 0).reshape(6, 8, 6, 8).mean((1, 3))
    # objectness: on where an object covers > 3/4 of the cell, off below 1/4, else unlabelled
    np.testing.assert_array_equal(rec['object'], np.where(cover > .75, 1, np.where(cover < .25, 0, -1)))
    on = rec['shape'] >= 0
    assert np.array_equal(on, rec['texture'] >= 0) and (cover[on] > .5).all()
    assert set(zip(rec['shape'][on], rec['texture'][on])) <= set(objects)
    shapes |= {s for s, _ in objects}
    textures |= {t for _, t in objects}
    counts.append(len(objects))
  assert shapes == set(range(len(pretrain_data.SHAPE_FAMILIES)))
  assert textures == set(range(len(pretrain_data.TEXTURES))) and set(counts) == {0, 1, 2, 3}
  assert any(not np.array_equal(a[k]['object'], b[k]['object']) for k in range(40))


def test_colour_targets_tell_brightness_and_saturation_apart():
  """Soft targets over the prototypes: one hue at two values, or at two saturations, gets two targets (total
  variation distance > 0.2), and a colour at a prototype is mostly that prototype."""
  tv = lambda p, q: .5 * np.abs(pretrain_data.colour_target(p) - pretrain_data.colour_target(q)).sum()
  for hue in np.linspace(0, 1, 12, endpoint=False):
    assert tv(demo_data.hsv_to_rgb(hue, .9, .5), demo_data.hsv_to_rgb(hue, .9, .95)) > .2
    assert tv(demo_data.hsv_to_rgb(hue, .9, .9), demo_data.hsv_to_rgb(hue, .3, .9)) > .2
  for k, proto in enumerate(pretrain_data.COLOUR_PROTOTYPES):
    assert pretrain_data.colour_target(proto * 255).argmax() == k


@pytest.mark.parametrize('kw, match', [(dict(size=16), 'image_size'), (dict(size=50), 'image_size'),
                                       (dict(num_images=0), 'num_images')])
def test_bad_set_parameters(kw, match):
  args = dict(num_images=8, size=48, seed=0)
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
  # Chance for the colour term: the cross-entropy of a uniform guess over the prototypes.
  chance = np.log(len(pretrain_data.COLOUR_PROTOTYPES))
  print('pretrain colour loss per log step:', [round(l['colour'], 3) for l in logs], 'chance', round(chance, 3))
  assert logs[-1]['step'] == 60
  assert logs[-1]['colour'] < 0.8 * chance and logs[-1]['loss'] < logs[0]['loss']
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
