"""Training and model side of any class set (K foreground classes, heads of K + 1): the nets, a SEAM train step, the
input pipeline's label widths, the pseudo-label values of the segmentation data, and weights of another K."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image
import pytest

from configs import demo as demo_config
from seam_jax import layout, models
from seam_jax.common import files
from seam_jax.common.errors import DataError
from seam_jax.common.sharding import compiler_options
from seam_jax.data import input_pipeline as ip
from seam_jax.data import seg_data, voc
from seam_jax.models import convert, export
from seam_jax.train import equivariance, seam_task, seg_task, trainer

K = 7
CLASSES = tuple(f'c{i}' for i in range(K))
CFG32 = convert.model_config(32)


def fast_jit(fn):
  return jax.jit(fn, compiler_options=compiler_options(True))   # CPU: LLVM optimisation off, compiles ~3x faster


def random_variables(model):
  """Random weights of the model's shapes without compiling model.init: kernels N(0, 1/fan_in), BN at identity."""
  rng = np.random.default_rng(0)

  def fill(path, s):
    if path[-1].key == 'kernel':
      return (rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1]))).astype(np.float32)
    return np.full(s.shape, 1. if path[-1].key in ('scale', 'var') else 0., np.float32)
  return jax.tree_util.tree_map_with_path(fill, jax.eval_shape(model.init, jax.random.PRNGKey(0),
                                                               jnp.zeros((1, 32, 32, 3))))


def config_k(tmp_path, **data):
  """configs/demo.py:tiny on a VOC-layout set of the K classes at tmp_path (nothing prepared: data.classes)."""
  c = demo_config.get_config('tiny')
  c.workdir = str(tmp_path / 'work')
  c.data.update(classes=CLASSES, voc_root=str(tmp_path / 'VOC'), list_dir=str(tmp_path / 'lists'), **data)
  return c


@pytest.mark.parametrize('kind', ['seam', 'deeplab'])
def test_nets_have_k_plus_one_outputs(kind):
  """Shapes only (a real step runs below): the class head is the only K-dependent layer."""
  model = models.build(kind, CFG32, num_classes=K + 1)
  x = jnp.zeros((2, 32, 40, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  assert variables['params'][export.CLASS_HEAD[kind]]['kernel'].shape[-1] == K + 1
  out = jax.eval_shape(model.apply, variables, x)
  for o in (out if kind == 'seam' else (out,)):
    assert o.shape == (2, 32, 40, K + 1)


@pytest.mark.slow
def test_seam_train_step_with_k_labels(tmp_path):
  config = config_k(tmp_path)
  task = seam_task.seam_task(config, make_loader=lambda seed: None)
  assert task.num_outputs == K + 1 == layout.num_outputs(config)
  assert seg_task.seg_task(config, make_loader=lambda seed: None).num_outputs == K + 1
  model = models.build('seam', CFG32, num_classes=task.num_outputs)
  rng = np.random.default_rng(0)
  batch = {'image': rng.normal(size=(2, 32, 32, 3)).astype(np.float32),
           'label': np.eye(K, dtype=np.float32)[[1, 4]]}
  variables = random_variables(model)
  tx = optax.sgd(1e-3)
  loss_fn = seam_task.make_loss_fn(equivariance.HFlip(), 0.2)   # the cheapest to compile; K is what is tested
  step = fast_jit(trainer.make_train_step(model, trainer.Task(**{**vars(task), 'loss_fn': loss_fn}), tx))
  state, metrics = step(trainer.state_from_variables(variables, tx), batch, jax.random.PRNGKey(1))
  assert np.isfinite(float(metrics['loss'])) and int(state.step) == 1
  with pytest.raises(DataError, match=f'labels have 20 classes but the SEAM class head has {K + 1} outputs'):
    loss_fn(model, variables, {**batch, 'label': np.zeros((2, 20), np.float32)}, jax.random.PRNGKey(1), 0)


def write_set(config, labels, size=(24, 32)):
  """JPEGs <voc_root>/JPEGImages/<id>.jpg, lists/train.txt and the cls_labels.npy of `labels` (id -> label)."""
  rng = np.random.default_rng(0)
  for i in labels:
    files.atomic_write(layout.image_path(config, i), lambda f: Image.fromarray(
        rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(f, format='JPEG'))
  os.makedirs(config.data.list_dir, exist_ok=True)
  voc.write_list(layout.list_path(config, 'train'), list(labels))
  files.save_npy_dict(layout.cls_labels(config), labels)


def test_input_pipeline_reads_k_labels_and_refuses_another_width(tmp_path):
  c = config_k(tmp_path, train_list='train', crop_size=24, resize_long=(24, 32), device_augment=False)
  c.train.batch_size = 2
  ids = [f'im{i}' for i in range(4)]
  write_set(c, {i: np.eye(K, dtype=np.float32)[n] for n, i in enumerate(ids)})
  loader, n = ip.seam_train_loader(c)
  batch = next(iter(loader))
  assert n == 4 and batch['label'].shape == (2, K) and batch['image'].shape == (2, 24, 24, 3)
  files.save_npy_dict(layout.cls_labels(c), {i: np.zeros(20, np.float32) for i in ids})
  with pytest.raises(DataError) as e:
    ip.seam_train_loader(c)
  msg = str(e.value)
  assert '\n' not in msg and layout.cls_labels(c) in msg and '20 classes' in msg and f'has {K}' in msg


def test_sources_read_images_listed_anywhere(tmp_path):
  """layout.Images of the COCO / CSV formats (id -> any path), picklable for grain workers."""
  path = str(tmp_path / 'sub' / 'a.png')
  os.makedirs(os.path.dirname(path))
  Image.fromarray(np.full((8, 10, 3), 7, np.uint8)).save(path)
  images = layout.Images(str(tmp_path / 'none'), {'a': path})
  src = ip.VOCClsSource(images, ['a'], np.zeros((1, K), np.float32))
  assert src[0]['image'].shape == (8, 10, 3) and src[0]['label'].shape == (K,)
  assert [i for i, _ in ip.iterate_images(images, ['a'])] == ['a']
  import pickle  # pylint: disable=g-import-not-at-top
  assert pickle.loads(pickle.dumps(src)).images == images


def test_seg_labels_are_0_to_k_and_void(tmp_path):
  img = tmp_path / 'VOC' / 'JPEGImages'
  os.makedirs(img)
  os.makedirs(tmp_path / 'rw')
  for i, top in (('ok', K), ('bad', K + 1)):
    Image.fromarray(np.zeros((6, 10, 3), np.uint8)).save(img / f'{i}.jpg')
    label = np.full((6, 10), 255, np.uint8)
    label[0, :top + 1] = np.arange(top + 1)
    Image.fromarray(label, mode='L').save(tmp_path / 'rw' / f'{i}.png')
  src = seg_data.SegSource(str(tmp_path / 'VOC'), ['ok', 'bad'], str(tmp_path / 'rw'), num_classes=K)
  assert set(np.unique(src[0]['label'])) == set(range(K + 1)) | {255}
  with pytest.raises(DataError, match=rf'bad\.png has values outside 0/1/.*/{K}/255: \[{K + 1}\]'):
    src[1]
  np.testing.assert_array_equal(seg_data.LABEL_VALUES, np.r_[np.arange(21), 255])


@pytest.fixture(scope='module')
def voc_npz(tmp_path_factory):
  """(path, state dict) of a VOC (K = 20) SEAM checkpoint in the original's names."""
  sd = convert.variables_to_state_dict(convert.init_variables('seam', CFG32, seed=3), 'seam')
  path = str(tmp_path_factory.mktemp('ckpt') / 'seam_voc.npz')
  convert.write_npz(path, sd)
  return path, sd


@pytest.mark.slow
def test_checkpoint_of_another_class_count(voc_npz):
  path, sd = voc_npz
  with pytest.raises(DataError) as e:
    convert.load_variables(path, 'seam', CFG32, num_classes=K + 1)
  msg = str(e.value)
  assert '\n' not in msg and path in msg and 'fc8.weight has 21 outputs' in msg and f'has {K + 1}' in msg
  loaded = convert.load_variables(path, 'seam', CFG32, num_classes=K + 1, reinit_head=True)
  assert loaded['params']['fc8']['kernel'].shape[-1] == K + 1
  back = convert.variables_to_state_dict(loaded, 'seam')
  assert back.keys() == sd.keys()
  for name, x in sd.items():
    if not name.startswith('fc8.'):
      np.testing.assert_array_equal(back[name], x, err_msg=name)


def test_export_records_its_class_count(voc_npz, tmp_path):
  path, _ = voc_npz
  out = str(tmp_path / 'export')
  convert.main(['--src', path, '--dst', out, '--kind', 'seam', '--width_div', '32', '--num_classes', str(K + 1),
                '--reinit_head'])
  assert export.read_meta(out)['num_classes'] == K + 1
  assert convert.load_variables(out, 'seam', CFG32, num_classes=K + 1)['params']['fc8']['kernel'].shape[-1] == K + 1
  with pytest.raises(DataError, match=rf'^{out}: class head params/fc8 has {K + 1} outputs .* has 21 '):
    convert.load_variables(out, 'seam', CFG32)
  voc_again = convert.load_variables(out, 'seam', CFG32, reinit_head=True)
  assert voc_again['params']['fc8']['kernel'].shape[-1] == 21
