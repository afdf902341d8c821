"""Segmentation retrain (RETRAIN_SPEC) against the PyTorch reference of the spec (torch_reference/deeplab.py), same
weights: the DeepLab head, the BatchNorm groups (QUIRK Q1), the optimizer groups and poly schedule, whole training
steps, the multi-scale + flip test fusion and the released checkpoint format. Data, resume and the end-to-end run:
test_seg_pipeline.py.

Float tolerances: both sides compute in float32, so each is compared with an exact float64 run of the PyTorch
reference: the JAX error may be a small multiple of the float32 PyTorch error (same arithmetic, other summation
order and fused ops), `float32_tol` below.
"""
import dataclasses

import cv2
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from configs import demo
from seam_jax import models
from seam_jax.common import bucketing, visual
from seam_jax.common.errors import DataError
from seam_jax.data import seg_data
from seam_jax.infer import crf, predict, seg_inference
from seam_jax.models import convert, deeplab, export
from seam_jax.train import optim, seg_task, trainer
from torch_reference import deeplab as ref_lib
from torch_reference import models as ref_models

WIDTH = 16

def float32_tol(ours, ref32, ref64, factor=4.):
  """Assert |ours - ref64| <= factor * |ref32 - ref64| + 4 eps |ref64|: our float32 result is as close to the exact
  value as the original's float32 result, up to `factor` (summation order differs)."""
  ours, ref32, ref64 = (np.asarray(a, np.float64) for a in (ours, ref32, ref64))
  bound = factor * np.abs(ref32 - ref64).max() + 4 * np.finfo(np.float32).eps * np.abs(ref64).max()
  err = np.abs(ours - ref64).max()
  assert err <= bound, f'error {err:.3g} > bound {bound:.3g} (float32 reference: {np.abs(ref32 - ref64).max():.3g})'


def nchw(x, dtype=torch.float32):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(dtype)


def nhwc(t):
  return t.detach().double().numpy().transpose(0, 2, 3, 1)


def copy_sd(ref):
  return {k: np.array(v) for k, v in ref_models.state_dict_numpy(ref).items()}   # no aliasing of torch buffers


def reference(seed=0, width=WIDTH):
  """A randomised narrow reference net and the same weights as Flax variables."""
  ref = ref_models.randomize_(ref_lib.DeepLabRef(width), seed=seed)
  cfg = convert.model_config(width)
  return ref, models.build('deeplab', cfg), convert.state_dict_to_variables(copy_sd(ref), 'deeplab', cfg)


def image(shape, seed=0):
  return np.random.RandomState(seed).randn(*shape).astype(np.float32)

# ------------------------------------------------------------------------------------------------ network
def test_head_parity_eval():
  ref, model, variables = reference()
  x = image((2, 50, 66, 3))
  ref.eval()
  with torch.no_grad():
    t32 = nhwc(ref(nchw(x)))
    t64 = nhwc(ref.double()(nchw(x, torch.float64)))
  out = model.apply(variables, jnp.asarray(x))
  assert out.shape == (2, 50, 66, 21) and out.dtype == jnp.float32
  assert np.abs(t64).max() > 0.1
  float32_tol(out, t32, t64)
  low = model.apply(variables, jnp.asarray(x), upsample=False)
  assert low.shape == (2, 7, 9, 21)      # ceil(ceil(ceil(50 / 2) / 2) / 2) = 7, 66 -> 9


@pytest.mark.slow
def test_group_batchnorm_training_matches_dataparallel():
  """QUIRK Q1: batch of 4 on 2 'GPUs' (groups of 2): logits and the running statistics (replica 0's) match."""
  ref, model, variables = reference(seed=1)
  x = image((4, 40, 48, 3), seed=1)
  net = model.clone(bn_mode='group', bn_group=2)
  out, updates = net.apply(variables, jnp.asarray(x), train=True, dropout=False, mutable=['batch_stats'])
  ref64 = ref_lib.train_without_dropout(ref_models.randomize_(ref_lib.DeepLabRef(WIDTH), seed=1).double())
  ref_lib.train_without_dropout(ref)
  with torch.no_grad():
    t32 = nhwc(ref_lib.data_parallel_forward(ref, nchw(x), 2))
    t64 = nhwc(ref_lib.data_parallel_forward(ref64, nchw(x, torch.float64), 2))
  float32_tol(out, t32, t64)
  new = convert.variables_to_state_dict({'params': variables['params'], 'batch_stats': updates['batch_stats']},
                                        'deeplab')
  sd32, sd64 = copy_sd(ref), {k: v.detach().numpy() for k, v in ref64.state_dict().items()}
  old = convert.variables_to_state_dict(variables, 'deeplab')
  stats = [k for k in new if k.endswith(('running_mean', 'running_var'))]
  assert len(stats) == 2 * 39     # 15 basic blocks x 2 + 2 bottlenecks x 3 + bn7 + bn_fov + bn_fov2, mean and var
  assert all(not np.array_equal(new[k], old[k]) for k in stats)   # every running statistic moved
  for k in stats:
    float32_tol(new[k], sd32[k], sd64[k])


@pytest.mark.slow
@pytest.mark.parametrize('mode, group', [('group', 4), ('sync', 8)])
def test_batchnorm_modes_over_sharded_batches(mode, group):
  """Under jit with the batch sharded over the 8 (fake) devices: 'group' statistics per 4 images (spanning
  devices) and 'sync' statistics over the global batch equal the reference's per-chunk / whole-batch BatchNorm."""
  from seam_jax.common import sharding  # pylint: disable=g-import-not-at-top
  ref, model, variables = reference(seed=12)
  ref64 = ref_lib.train_without_dropout(ref_models.randomize_(ref_lib.DeepLabRef(WIDTH), seed=12).double())
  ref_lib.train_without_dropout(ref)
  x = image((8, 32, 32, 3), seed=12)
  mesh = sharding.make_mesh()
  net = model.clone(bn_mode=mode, bn_group=4)
  fn = jax.jit(lambda v, b: net.apply(v, b, train=True, dropout=False, mutable=['batch_stats']),
               in_shardings=(sharding.replicated(mesh), sharding.data_sharded(mesh)))
  out, updates = fn(variables, jnp.asarray(x))
  assert len(out.sharding.device_set) == 8
  with torch.no_grad():
    t32 = nhwc(ref_lib.data_parallel_forward(ref, nchw(x), group))
    t64 = nhwc(ref_lib.data_parallel_forward(ref64, nchw(x, torch.float64), group))
  float32_tol(out, t32, t64)
  new = convert.variables_to_state_dict({'params': variables['params'], 'batch_stats': updates['batch_stats']},
                                        'deeplab')
  sd32, sd64 = copy_sd(ref), {k: v.detach().numpy() for k, v in ref64.state_dict().items()}
  for k in ('backbone.b2.bn_branch2a.running_var', 'backbone.bn7.running_mean', 'bn_fov2.running_var'):
    float32_tol(new[k], sd32[k], sd64[k])

def test_group_batchnorm_statistics():
  """Each group normalised by its own statistics; running stats from group 0 with the unbiased variance; 'sync'
  uses the whole batch; 'frozen' the running statistics (unchanged)."""
  x = np.random.RandomState(2).randn(6, 5, 4, 3) * [1., 2., 3.] + [0.5, -1., 2.]
  scale, bias = np.array([1.5, 0.5, 1.]), np.array([0.1, -0.2, 0.3])
  variables = {'params': {'scale': jnp.asarray(scale, jnp.float32), 'bias': jnp.asarray(bias, jnp.float32)},
               'batch_stats': {'mean': jnp.full((3,), 0.2), 'var': jnp.full((3,), 2.)}}

  def expect(groups):
    out = []
    for g in np.split(x, groups):
      m, v = g.mean((0, 1, 2)), g.var((0, 1, 2))
      out.append((g - m) / np.sqrt(v + 1e-5) * scale + bias)
    g0 = np.split(x, groups)[0]
    n = g0.size // 3
    mom = deeplab.BN_MOMENTUM
    return (np.concatenate(out), mom * 0.2 + (1 - mom) * g0.mean((0, 1, 2)),
            mom * 2. + (1 - mom) * g0.var((0, 1, 2)) * n / (n - 1))

  eps = np.finfo(np.float32).eps
  for group_size, groups in ((3, 2), (0, 1)):
    y, upd = deeplab.GroupBatchNorm(group_size).apply(variables, jnp.asarray(x, jnp.float32), mutable=['batch_stats'])
    ey, em, ev = expect(groups)
    n = x.size // 3 // groups   # values per statistic: float32 sums of n terms err by at most n eps sum|x|
    # normalised values: the statistics' relative error n eps |x| / std, scaled, plus the final roundings
    tol = n * eps * np.abs(x).max() / x.std((0, 1, 2)).min() * np.abs(scale).max() + 4 * eps * np.abs(ey).max()
    np.testing.assert_allclose(y, ey, rtol=0, atol=tol)
    # running statistics: 0.9997 r + 0.0003 s rounds to a few ulps of r, plus 0.0003 times the error of s
    for got, want, err_s in ((upd['batch_stats']['mean'], em, n * eps * np.abs(x).max()),
                             (upd['batch_stats']['var'], ev, 2 * n * eps * np.abs(x).max() ** 2)):
      np.testing.assert_allclose(got, want, rtol=0, atol=4 * eps * np.abs(want).max() + 3e-4 * err_s)
  norm = deeplab.batch_norm('frozen', 3)('bn', jnp.float32)
  y, upd = norm.apply(variables, jnp.asarray(x, jnp.float32), mutable=['batch_stats'])
  np.testing.assert_allclose(y, (x - 0.2) / np.sqrt(2. + 1e-5) * scale + bias, rtol=1e-5, atol=1e-5)
  assert upd['batch_stats']['mean'].tolist() == [np.float32(0.2)] * 3
  with pytest.raises(ValueError, match='groups of 4'):
    deeplab.GroupBatchNorm(4).apply(variables, jnp.asarray(x, jnp.float32), mutable=['batch_stats'])
  with pytest.raises(ValueError, match='bn_mode'):
    deeplab.batch_norm('synced', 2)


@pytest.mark.slow
def test_head_init_follows_the_original():
  """Kaiming normal fan_out on the head convs: std sqrt(2 / (C_out k^2)) (full width: conv_fov 0.02083, conv_fov2
  0.0625, cls_conv 0.3086); cls_conv bias U(+-1/sqrt(C_in)); head BN 1 / 0. Checked on a width-8 net."""
  assert np.sqrt(2 / (512 * 9)) == pytest.approx(0.02083, abs=1e-5) and np.sqrt(2 / 21) == pytest.approx(0.3086, 1e-4)
  variables = convert.init_variables('deeplab', convert.model_config(8), seed=3)
  p = variables['params']
  for name, c_out, k2 in (('conv_fov', 64, 9), ('conv_fov2', 64, 1), ('cls_conv', 21, 1)):
    k, std = np.asarray(p[name]['kernel']), np.sqrt(2 / (c_out * k2))
    assert abs(k.std() / std - 1) < 5 / np.sqrt(k.size)      # 5 standard errors of a sample std
    assert abs(k.mean()) < 5 * std / np.sqrt(k.size)
  b = np.asarray(p['cls_conv']['bias'])
  assert b.shape == (21,) and 0.5 / np.sqrt(64) < np.abs(b).max() <= 1 / np.sqrt(64)
  assert np.all(np.asarray(p['bn_fov']['scale']) == 1) and np.all(np.asarray(p['bn_fov2']['bias']) == 0)
  assert np.all(np.asarray(variables['batch_stats']['bn_fov']['var']) == 1)


# ------------------------------------------------------------------------------------------------ optimizer
def test_optimizer_groups_match_the_original():
  ref = ref_lib.DeepLabRef(32)
  params = convert.abstract_variables('deeplab', convert.model_config(32))['params']
  groups = flax.traverse_util.flatten_dict(models.param_groups(params, ()))
  got = {('backbone.' if p[0] == 'backbone' else '') + convert.torch_name('params', p): g for p, g in groups.items()}
  names = dict(ref.named_parameters())
  assert set(got) == set(names)
  expected = {n: 'frozen' for n in names}
  for g, members in enumerate(ref.get_parameter_groups()):
    for t in members:
      expected[next(n for n, q in names.items() if q is t)] = g
  assert got == expected
  assert {g for g in got.values()} == {'frozen', 0, 2, 3}
  assert got['backbone.conv1a.weight'] == 0       # QUIRK Q1: conv1a trained
  assert got['cls_conv.bias'] == 3 and got['bn_fov.weight'] == 'frozen'


def test_poly_schedule_denominator_is_max_plus_one():
  hp = demo.get_config().seg
  hp.lr, hp.max_steps = 0.001, 20000
  _, schedule = optim.make_optimizer(hp, {'cls_conv': {'bias': jnp.zeros(3)}}, 20000)
  for i, want in ((0, 1e-3), (10000, 1e-3 * (1 - 10000 / 20001) ** 0.9), (19999, 1e-3 * (2 / 20001) ** 0.9)):
    assert float(schedule(i)) == pytest.approx(want, rel=1e-6)
  assert float(schedule(10000)) == pytest.approx(5.36e-4, abs=1e-6) and float(schedule(19999)) == pytest.approx(
      2.5e-7, rel=0.02)   # the spec's rounded values

def random_batch(n, hw, seed=0):
  r = np.random.default_rng(seed)
  label = r.integers(0, 21, (n,) + hw).astype(np.uint8)
  label[:, :3] = 255
  return {'image': r.normal(size=(n,) + hw + (3,)).astype(np.float32), 'label': label}

@pytest.mark.slow
def test_train_steps_match_the_original():
  """Two SGD steps (groups, weight decay, momentum, poly lr over max+1, BN statistics of group 0) from the same
  weights on the same batch, dropout off: parameters, statistics and losses match the original's train.py."""
  config = demo.get_config('tiny')   # seg: batch 4, BN groups of 2, fast compile
  config.seg.update(lr=0.01, init_from_seam=False)
  ref, model, variables = reference(seed=4)
  ref64 = ref_models.randomize_(ref_lib.DeepLabRef(WIDTH), seed=4).double()
  task = dataclasses.replace(seg_task.seg_task(config, make_loader=lambda seed: (None, 0)),
                             loss_fn=seg_task.make_loss_fn('group', 2, dropout=False))
  tx, _ = optim.make_optimizer(task.hparams, variables['params'], 3)
  state = trainer.state_from_variables(jax.tree.map(jnp.asarray, variables), tx)
  step = jax.jit(trainer.make_train_step(model, task, tx))
  batch = random_batch(4, (40, 40), seed=4)
  img = batch['image']
  label = torch.from_numpy(batch['label'].astype(np.int64))
  losses = {32: [], 64: [], 'jax': []}
  for r, key, dtype in ((ref, 32, torch.float32), (ref64, 64, torch.float64)):
    ref_lib.train_without_dropout(r)
    opt = ref_lib.make_sgd(r, lr=0.01)
    for itr in range(2):
      losses[key].append(ref_lib.train_step(r, opt, nchw(img, dtype), label, itr, 3, group=2, lr_init=0.01))
  for _ in range(2):
    state, metrics = step(state, jax.tree.map(jnp.asarray, batch), jax.random.PRNGKey(0))
    losses['jax'].append(float(metrics['loss']))
  float32_tol(losses['jax'], losses[32], losses[64])
  got = convert.variables_to_state_dict(jax.tree.map(np.asarray, state.variables), 'deeplab')
  sd32, sd64 = copy_sd(ref), {k: v.detach().numpy() for k, v in ref64.state_dict().items()}
  before = convert.variables_to_state_dict(variables, 'deeplab')
  for k in got:
    if k.endswith(('bn_fov.weight', 'bn_branch2a.bias')):
      assert np.array_equal(got[k], before[k])       # BN affine never optimised
    float32_tol(got[k] - before[k], sd32[k] - before[k], sd64[k] - before[k])   # the update itself


def test_cross_entropy_ignores_255():
  logits = jnp.asarray(np.random.RandomState(5).randn(2, 3, 4, 21), jnp.float32)
  labels = np.random.RandomState(6).randint(0, 21, (2, 3, 4))
  labels[0, 0] = 255
  loss, count = seg_task.cross_entropy(logits, jnp.asarray(labels))
  t = torch.nn.functional.cross_entropy(torch.from_numpy(np.array(logits)).permute(0, 3, 1, 2),
                                        torch.from_numpy(labels), ignore_index=255)
  assert int(count) == 24 - 4
  assert float(loss) == pytest.approx(float(t), rel=1e-6)
  loss, count = seg_task.cross_entropy(logits, jnp.full((2, 3, 4), 255))
  assert float(loss) == 0. and int(count) == 0

# ------------------------------------------------------------------------------------------------ weights
def test_released_checkpoint_round_trip(tmp_path):
  """The authors' deeplabv1 ResNet38 state dict (`backbone.`-nested names, num_batches_tracked) -> export folder ->
  .pth: the same tensors under the same names; a wrong model kind is refused naming the file."""
  ref = ref_models.randomize_(ref_lib.DeepLabRef(32), seed=7)
  torch.save(ref.state_dict(), tmp_path / 'deeplabv1.pth')
  convert.convert(str(tmp_path / 'deeplabv1.pth'), str(tmp_path / 'export'), 'deeplab', width_div=32)
  assert export.read_meta(str(tmp_path / 'export'))['kind'] == 'deeplab'
  convert.convert(str(tmp_path / 'export'), str(tmp_path / 'back.pth'), 'deeplab', width_div=32)
  back = torch.load(tmp_path / 'back.pth')
  original = {k: v for k, v in ref.state_dict().items() if not k.endswith('num_batches_tracked')}
  assert set(back) == set(original)
  assert all(torch.equal(back[k], original[k]) for k in original)
  with pytest.raises(DataError, match='deeplabv1.pth.*looks like a deeplab checkpoint'):
    convert.load_variables(str(tmp_path / 'deeplabv1.pth'), 'seam', convert.model_config(32))

# ------------------------------------------------------------------------------------------------ test time
@pytest.mark.slow
def test_multiscale_flip_fusion_matches_the_original():
  """Bucketed, padded, batched views fused on the host == the original's 12-view test (here 4 scales x flip on
  an odd-sized image; bucket 32 pads every view)."""
  ref, _, variables = reference(seed=11)
  ref.eval()
  img_norm = image((1, 45, 61, 3), seed=11)[0]
  opts = seg_inference.SegTestOptions(scales=(0.5, 0.75, 1.0, 1.25), flip=True, bucket=32, crf=False)
  engine = seg_inference.SegEngine(variables, convert.model_config(WIDTH), batch_size=4)
  pieces = seg_inference.prepare_views(img_norm, opts)
  assert len(pieces) == 8 and any(p.arrays['x'].shape[:2] != tuple(p.arrays['valid']) for p in pieces)
  [(_, _, outs)] = list(bucketing.schedule(engine, [('x', None, pieces)]))
  fused = seg_inference.fuse_logits(outs, img_norm.shape[:2])
  t32 = ref_lib.multiscale_logits(ref, img_norm, opts.scales).numpy()
  t64 = ref_lib.multiscale_logits(ref.double(), img_norm.astype(np.float64), opts.scales).numpy()
  assert fused.shape == (21, 45, 61)
  float32_tol(fused, t32, t64)
  label = seg_inference.label_map(img_norm, outs, opts)
  np.testing.assert_array_equal(label, np.argmax(seg_inference.softmax(fused), 0))
  crf_opts = dataclasses.replace(opts, crf=True)
  want = crf.crf_inference(seg_data.denormalize_uint8(img_norm), seg_inference.softmax(fused), 1, 21, bi_sxy=32)
  np.testing.assert_array_equal(seg_inference.label_map(img_norm, outs, crf_opts), np.argmax(want, 0))


class ViewLog:
  """An engine for bucketing.schedule that runs `engine` and records the padded (H, W) of every batch of views."""

  def __init__(self, engine):
    self.engine, self.batch_size, self.shapes = engine, engine.batch_size, []

  def __call__(self, batch):
    self.shapes.append(batch['x'].shape[1:3])
    return self.engine(batch)


@pytest.fixture(scope='module')
def tiny_engine():
  cfg = convert.model_config(32)
  cfg.fast_compile = True
  return seg_inference.SegEngine(reference(seed=13, width=32)[2], cfg, batch_size=2)


def segment_images(engine, opts, images):
  """seg_inference.segment over in-memory uint8 images: [(the image `save` got, its label map)], in order."""
  got = {}
  done = []
  seg_inference.segment(engine, opts, list(range(len(images))), lambda i: (i, None, images[i]),
                        lambda i, _, img, label: got.__setitem__(i, (img, label)), done.append, threads=1)
  assert len(done) == len(images)
  return [got[i] for i in range(len(images))]


def test_large_image_is_tested_at_bounded_size(tiny_engine):
  """Issue 21: an image whose longer side is above max_side (3000 x 400, max_side 120) is tested at its INTER_AREA
  downscale (120 x 16: the engine only gets views padded from 120 x 16 and 60 x 8, the CRF runs at that size) and
  its label map comes back at the image's size: the downscaled image's labels, INTER_NEAREST resized."""
  assert seg_inference.bounded_size(3000, 400, 120) == (120, 16) and seg_inference.bounded_size(400, 3000, 120) == (
      16, 120)
  assert seg_inference.bounded_size(10000, 10, 100) == (100, 1) and seg_inference.bounded_size(45, 61, 0) == (45, 61)
  img = (np.random.RandomState(13).rand(3000, 400, 3) * 255).astype(np.uint8)
  opts = seg_inference.SegTestOptions(scales=(0.5, 1.0), flip=True, bucket=32, crf=True, max_side=120)
  log = ViewLog(tiny_engine)
  [(saved, label)] = segment_images(log, opts, [img])
  assert saved is img and label.shape == (3000, 400) and label.dtype == np.uint8
  assert sorted(set(log.shapes)) == [(64, 32), (128, 32)]
  small = cv2.resize(img, (16, 120), interpolation=cv2.INTER_AREA)
  [(_, want)] = segment_images(tiny_engine, dataclasses.replace(opts, max_side=0), [small])
  np.testing.assert_array_equal(label, cv2.resize(want, (400, 3000), interpolation=cv2.INTER_NEAREST))


def test_image_within_max_side_is_unchanged(tiny_engine):
  """max_side 0, equal to or above the longer side: bit-identical labels to the unbounded test (the views of the
  image itself, as before issue 21; VOC images under the default 1000). seg.max_side reaches the options; < 0 is
  refused."""
  img = (np.random.RandomState(14).rand(45, 61, 3) * 255).astype(np.uint8)
  opts = seg_inference.SegTestOptions(scales=(0.75, 1.0), flip=True, bucket=32, crf=True)
  norm = seg_data.normalize32(img)
  [(_, _, outs)] = list(bucketing.schedule(tiny_engine, [(0, None, seg_inference.prepare_views(norm, opts))]))
  want = seg_inference.label_map(norm, outs, opts)
  for max_side in (0, 61, 1000):
    [(_, label)] = segment_images(tiny_engine, dataclasses.replace(opts, max_side=max_side), [img])
    np.testing.assert_array_equal(label, want)
  s = demo.get_config().seg
  assert seg_inference.SegTestOptions.from_config(s).max_side == 1000
  s.max_side = -1
  with pytest.raises(ValueError, match='max_side'):
    seg_inference.SegTestOptions.from_config(s)


def test_predict_overlay_in_strips():
  """predict's side-by-side overlay, blended in strips of rows (bounded temporaries), equals the whole-image blend."""
  r = np.random.RandomState(15)
  img, label = (r.rand(70, 9, 3) * 255).astype(np.uint8), r.randint(0, 21, (70, 9)).astype(np.uint8)
  want = np.concatenate([img, visual.label_overlay(img, label)], axis=1)
  np.testing.assert_array_equal(predict.side_by_side(img, label, rows=16), want)
