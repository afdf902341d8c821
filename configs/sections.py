"""Config sections that several recipes or config sections share, built once (big_vision's `get_eval()` idea):
every trainer section (train, aff, seg, pretrain) has the same fields, so the code reads them without defaults."""
import ml_collections


def trainer(**values):
  """The fields the generic trainer (seam_jax.train.trainer, seam_jax.train.optim) reads, with the original SEAM
  recipe's values (SEAM_SPEC section 3) unless given in `values`; a section adds its own fields afterwards."""
  t = ml_collections.ConfigDict()
  t.batch_size = 8                  # global batch over all devices and hosts
  t.epochs = 8
  t.max_steps = -1                  # -1: floor(len(list) / batch) * epochs
  t.lr = 0.01
  t.weight_decay = 5e-4
  t.momentum = 0.0005               # QUIRK: the original's momentum slot holds the weight decay value
  t.fix_momentum = False            # True: use `fixed_momentum` instead (the intended SGD momentum)
  t.fixed_momentum = 0.9
  t.poly_power = 0.9
  t.poly_extra_steps = 0            # lr = base * (1 - i / (max_steps + poly_extra_steps)) ** poly_power
  t.frozen_layers = ('conv1a', 'b2', 'b2_1', 'b2_2')  # backbone layers never trained (the original's)
  t.init_weights = ''               # '' = model.init_weights (seam_jax.layout.init_weights); or a weights file
  t.log_every = 50
  t.ckpt_every = 500
  t.keep_checkpoints = 3
  t.image_summaries = False
  t.fast_compile = False            # CPU only: compile the step without LLVM optimisation (small runs)
  # remat: seam_jax.models.build(remat=...): every block conv's backward tied to its cotangent and blocks b2 to b3_2
  # recomputed in the backward (seam_jax.models.resnet38.tied_vjp): the same loss, 24 % to 36 % of the memory XLA
  # plans for the step without it, about the same CPU time (benchmarks/README.md, "Memory (issue 24)").
  t.remat = False
  unknown = set(values) - set(t.keys())
  if unknown:
    raise KeyError(f'sections.trainer: no trainer fields {sorted(unknown)}')
  t.update(values)
  return t


def model(**values):
  """The `model` section: the networks' width and dtype, initial weights, CPU compile options."""
  m = ml_collections.ConfigDict()
  m.width_div = 1                   # divide every channel count (tests use narrow nets of the same code)
  m.dtype = 'float32'               # compute dtype: 'float32' or 'bfloat16' (params stay float32)
  m.init_weights = ''               # ImageNet ResNet38: MXNet .params, converted .npz/.pth, or '' (random)
  m.calibrate_bn = False            # without init_weights: set the frozen BN statistics from one data batch
  m.fast_compile = False            # CPU only: inference (CAMs, random walk, seg test) compiled without LLVM opt.
  m.update(values)
  return m
