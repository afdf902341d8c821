"""Config files and the shared CLI plumbing: overrides, unknown keys, missing files."""
import os
import subprocess
import sys
import textwrap

import pytest

from configs import coco14, demo, voc12

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = textwrap.dedent('''
    from absl import flags
    from seam_jax.common import cli
    from seam_jax.common.errors import DataError
    cli.define_config()
    def main(argv):
      c = flags.FLAGS.config
      if c.train.batch_size == 3:
        raise DataError('image not found: /nowhere/x.jpg')
      from seam_jax import layout
      print('OK', c.train.batch_size, c.train.lr, layout.voc_root(c), tuple(c.infer.scales))
    cli.run(main)
''')


def run_cli(tmp_path, *args):
  script = tmp_path / 'entry.py'
  script.write_text(SCRIPT)
  env = dict(os.environ, PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, str(script), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=900)


def test_voc12_holds_the_spec_numbers():
  c = voc12.get_config()
  assert (c.train.batch_size, c.train.epochs, c.train.lr, c.train.weight_decay) == (8, 8, 0.01, 5e-4)
  assert c.train.momentum == 0.0005 and not c.train.fix_momentum and c.train.poly_power == 0.9
  assert c.train.scale_factor == 0.3 and c.train.topk_ratio == 0.2
  assert c.data.crop_size == 448 and tuple(c.data.resize_long) == (448, 768)
  assert tuple(c.data.jitter) == (0.3, 0.3, 0.3, 0.1)
  assert tuple(c.infer.scales) == (0.5, 1.0, 1.5, 2.0) and c.infer.flip
  assert tuple(c.infer.crf_alphas) == (4.0, 24.0) and c.infer.crf_iters == 10 and c.infer.bg_threshold == 0.26
  assert c.aff.radius == 5 and c.aff.crop_size == 448 and c.aff.batch_size == 8 and c.aff.lr == 0.01
  assert (c.rw.beta, c.rw.logt, c.rw.alpha) == (8, 6, 6.0)
  assert c.model.width_div == 1


def test_demo_inherits_every_field():
  full, small = voc12.get_config(), demo.get_config()
  def keys(c, prefix=''):
    return {prefix + k for k in c.keys()} | {x for k, v in c.items() if hasattr(v, 'keys')
                                              for x in keys(v, prefix + k + '.')}
  assert keys(full) <= keys(small)
  assert small.model.width_div > 1 and small.data.crop_size < full.data.crop_size


def test_coco14_is_the_voc_recipe_on_coco():
  """configs/coco14.py: the COCO format and its splits; every other value the VOC recipe's but the documented
  choices (epochs, lists, AffinityNet's canvas)."""
  coco, full = coco14.get_config(), voc12.get_config()
  assert coco.data.format == 'coco' and coco.data.train_annotations.endswith('instances_train2014.json')
  assert coco.data.val_annotations.endswith('instances_val2014.json')
  assert (coco.train.epochs, coco.aff.epochs, coco.data.aff_canvas) == (3, 3, 640)
  choices = {'workdir', 'data', 'train.epochs', 'aff.epochs', 'infer.list', 'eval.list', 'aff.train_list', 'rw.list',
             'seg.train_list', 'seg.test_list'}
  flat = lambda c: {f'{s}.{k}': v for s in c.keys() if hasattr(c[s], 'keys') for k, v in c[s].items()}
  for key, value in flat(full).items():
    if key not in choices and key.split('.')[0] not in choices:
      assert flat(coco)[key] == value, key


def test_override_from_command_line(tmp_path):
  r = run_cli(tmp_path, '--config=configs/demo.py', '--config.train.batch_size=4', '--config.train.lr=0.5',
              '--config.infer.scales=(1.0,2.0)')
  assert r.returncode == 0, r.stderr
  assert 'OK 4 0.5 work_dirs/demo/VOC2012 (1.0, 2.0)' in r.stdout


@pytest.mark.parametrize('args,needle', [
    (['--config=configs/demo.py', '--config.train.bogus=1'], 'unknown config key'),
    (['--config=configs/nope.py'], 'configs/nope.py'),
    (['--config=configs/demo.py', '--config.train.batch_size=abc'], 'batch_size'),
    (['--config=configs/demo.py', '--config.train.batch_size=3'], 'image not found: /nowhere/x.jpg'),
])
def test_bad_input_is_one_clear_error(tmp_path, args, needle):
  r = run_cli(tmp_path, *args)
  assert r.returncode != 0
  assert needle in r.stderr
  assert 'Traceback' not in r.stderr
