"""Every jitted computation of the pipeline lowers for GPU and TPU (issue 24), checked here without either.

Each computation is exported with jax.export for the 'cuda' and 'tpu' platforms, at configs/demo.py:tiny's sizes
(width_div 32) in float32 and bfloat16, from abstract inputs (jax.ShapeDtypeStruct, jax.eval_shape): nothing is
run. The export fails on host callbacks (pure_callback, io_callback, jax.debug), on custom calls without a
cross-platform guarantee (CPU-only kernels) and on ops without a lowering for either platform; the test adds a
check for float64 / complex tensors (unsupported or emulated on TPU).

The computations, built as the stages build them: model.init (trainer.random_init); the SEAM, AffinityNet,
segmentation and pretraining train steps (trainer.make_train_step + the task, jitted by trainer.jit_train_step;
SEAM and AffinityNet with config.data.device_augment on, so seam_jax.data.device_augment runs in the step), and the
first three again with their trainer section's `remat` on (resnet38.tied_vjp's custom VJPs); CAM
inference (cam_inference.CamEngine: PaddedSEAM), the segmentation test forward (seg_inference.SegEngine) and the
random-walk device step (random_walk.make_step, backend 'jax', jax_method 'sparse' and 'dense'), each through its
bucketing.DeviceLoop. The sharded functions themselves are exported (jax.export keeps only the mesh's shape: the 4
of conftest's 8 CPU devices that the tiny global batch of 4 needs), so the shardings are part of what is checked.

Compiler options are no part of an export; the test checks that the CPU-only one (sharding.compiler_options) is
never given to another platform.
"""
import functools
import re

import jax
import numpy as np
import pytest

from configs import demo
from seam_jax import models
from seam_jax.common import bucketing, sharding
from seam_jax.data import input_pipeline, seg_data
from seam_jax.infer import cam_inference, random_walk, seg_inference
from seam_jax.train import affinity_task, optim, pretrain_task, seam_task, seg_task, trainer

pytestmark = pytest.mark.slow   # ~1 min on 2 CPU cores: 30 exports of networks and train steps

PLATFORMS = ('cuda', 'tpu')
DTYPES = ('float32', 'bfloat16')
RNG = jax.ShapeDtypeStruct((2,), np.uint32)   # jax.random.PRNGKey: the trainer's base rng and init rng
IMAGE = np.zeros((48, 64, 3), np.uint8)       # a tiny demo image: the host halves below make one batch row of it
WIDE_TYPES = re.compile(r'[x<](f64|complex<[^>]*>)>')   # float64 / complex element types in StableHLO text


@functools.lru_cache(maxsize=None)
def tiny(dtype, remat=False):
  c = demo.get_config('tiny')
  c.model.dtype = dtype
  c.data.device_augment = True
  c.rw.backend = 'jax'
  for section in (c.train, c.aff, c.seg, c.pretrain):   # the trainer sections' switch (configs/sections.py)
    section.remat = remat
  return c


@functools.lru_cache(maxsize=None)
def mesh():
  return sharding.make_mesh(jax.devices()[:4])


def specs(row, batch):
  """Abstract batch of `batch` rows like `row` (a host augmentation's output; non-numeric fields dropped)."""
  return {k: jax.ShapeDtypeStruct((batch,) + np.shape(v), np.asarray(v).dtype) for k, v in row.items()
          if np.asarray(v).dtype.kind in 'biuf'}


# ------------------------------------------------------------------------------------------- training tasks
def _seam(c, rng):
  record = {'id': 'x', 'image': IMAGE, 'label': np.zeros(20, np.float32)}
  return seam_task.seam_task(c), c, input_pipeline.SeamAugment.from_config(c.data, True)(record, rng)


def _affinity(c, rng):
  scores = np.zeros(IMAGE.shape[:2] + (2,), np.float32)
  record = {'id': 'x', 'image': IMAGE, 'la': scores, 'ha': scores}
  return affinity_task.affinity_task(c), c, affinity_task.AffinityAugment.from_config(c, True)(record, rng)


def _seg(c, rng):
  row = seg_data.SegAugment.from_config(c.seg)({'image': IMAGE, 'label': np.zeros(IMAGE.shape[:2], np.uint8)}, rng)
  return seg_task.seg_task(c), c, row


def _pretrain(c, rng):
  del rng
  return (pretrain_task.pretrain_task(c), pretrain_task.pretrain_config(c),
          pretrain_task.pretrain_source(c.pretrain, c.seed)[0])


TASKS = {'seam': _seam, 'affinity': _affinity, 'seg': _seg, 'pretrain': _pretrain}


@functools.lru_cache(maxsize=None)
def task(name, dtype, remat=False):
  """(Task, the config its trainer runs on, one host-augmented batch row) of a training stage."""
  return TASKS[name](tiny(dtype, remat), np.random.default_rng(0))


def init_case(name, dtype):
  t, c, _ = task(name, dtype)
  return trainer.random_init(c, t), (RNG,)


def train_case(name, dtype, remat=False):
  """The trainer's jitted step (trainer._steps) on abstract state, batch and rng; `remat`: the trainer section's
  switch on (seam_jax.models.resnet38.tied_vjp's custom VJPs in the step)."""
  t, c, row = task(name, dtype, remat)
  assert bool(t.hparams.remat) == remat
  shapes = jax.eval_shape(trainer.random_init(c, t), RNG)
  tx, _ = optim.make_optimizer(t.hparams, shapes['params'], 100)
  state = jax.eval_shape(lambda v: trainer.state_from_variables(v, tx), shapes)
  step = trainer.make_train_step(models.build(t.model_kind, c.model, t.hparams.remat, t.num_outputs), t, tx)
  return trainer.jit_train_step(step, mesh(), t.hparams.fast_compile), (state, specs(row, t.hparams.batch_size), RNG)


# ------------------------------------------------------------------------------------------- inference stages
def variables(name, dtype):
  """Zero variables of the network of a training task, as the inference stages load them."""
  t, c, _ = task(name, dtype)
  shapes = jax.eval_shape(trainer.random_init(c, t), RNG)
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


def loop_case(loop, row):
  return loop.fn, (loop.variables, loop.batch_specs(row))


def cam_case(dtype):
  c = tiny(dtype)
  loop = cam_inference.CamEngine(variables('seam', dtype), c.model, c.infer.batch_size, mesh())
  return loop_case(loop, cam_inference.prepare_views(IMAGE, tuple(c.infer.scales), c.infer.flip, c.infer.bucket)[0]
                   .arrays)


def seg_test_case(dtype):
  c = tiny(dtype)
  loop = seg_inference.SegEngine(variables('seg', dtype), c.model, c.seg.test_batch_size, mesh())
  opts = seg_inference.SegTestOptions.from_config(c.seg)
  return loop_case(loop, seg_inference.prepare_views(seg_data.normalize32(IMAGE), opts)[0].arrays)


def rw_case(method, dtype):
  c = tiny(dtype).copy_and_resolve_references()
  c.rw.jax_method = method
  fn = random_walk.make_step(models.build('affinity', c.model), c, 'jax')
  loop = bucketing.DeviceLoop(fn, variables('affinity', dtype), c.rw.batch_size, mesh(), c.model.fast_compile)
  hw = IMAGE.shape[:2]
  row = {'image': np.zeros(bucketing.padded_size(*hw) + (3,), np.float32),
         'cams': random_walk.pooled_cams({}, *hw, c.rw.alpha)}
  return loop_case(loop, row)


CASES = {
    **{f'init_{k}': functools.partial(init_case, k) for k in ('seam', 'affinity', 'seg')},  # seg's = pretrain's
    **{f'train_{k}': functools.partial(train_case, k) for k in TASKS},
    **{f'train_{k}_remat': functools.partial(train_case, k, remat=True) for k in ('seam', 'affinity', 'seg')},
    'train_seam_matmul_wgrad': functools.partial(train_case, 'seam'),
    'cam_inference': cam_case,
    'seg_test': seg_test_case,
    'rw_sparse': functools.partial(rw_case, 'sparse'),
    'rw_dense': functools.partial(rw_case, 'dense'),
}


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('name', sorted(CASES))
def test_exports_for_gpu_and_tpu(name, dtype, monkeypatch):
  """Traced with the convolutions GPU/TPU run (conv_wgrad picks lax's kernel gradient off CPU: tracing here on
  CPU would pick the matmul one), and once with the matmul one (SEAM_JAX_CONV_WGRAD=matmul, valid anywhere)."""
  monkeypatch.setenv('SEAM_JAX_CONV_WGRAD', 'matmul' if name.endswith('matmul_wgrad') else 'xla')
  fn, args = CASES[name](dtype)
  exported = jax.export.export(fn, platforms=PLATFORMS)(*args)
  assert exported.platforms == PLATFORMS
  wide = sorted(set(WIDE_TYPES.findall(exported.mlir_module())))
  assert not wide, f'{name} ({dtype}) computes in {wide}, unsupported or emulated on TPU'


def test_cpu_compiler_options_stay_on_cpu(monkeypatch):
  """The CPU-only XLA option (LLVM optimisation off) goes to CPU compilations only: those of the platform asked
  (default: the default backend's), a DeviceLoop's those of its mesh's devices whatever the default backend."""
  for platform in PLATFORMS:
    assert sharding.compiler_options(True, platform) is None
  assert sharding.compiler_options(True, 'cpu') and not sharding.compiler_options(False, 'cpu')
  monkeypatch.setattr(jax, 'default_backend', lambda: 'tpu')
  assert sharding.compiler_options(True) is None
  loop = bucketing.DeviceLoop(lambda v, b: b['x'] * v, np.float32(2), 4, mesh(), fast_compile=True)
  assert loop._options == sharding.compiler_options(True, 'cpu')  # pylint: disable=protected-access
