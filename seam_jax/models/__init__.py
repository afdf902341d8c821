"""Model registry and the parameter masks the optimizer needs (trainable / new layer / bias)."""
import flax
import jax
import jax.numpy as jnp

from seam_jax.data import voc

from seam_jax.models.affinity import AffinityNet
from seam_jax.models.deeplab import DeepLab
from seam_jax.models.resnet38 import FROZEN
from seam_jax.models.seam import SEAM

MODELS = {'seam': SEAM, 'affinity': AffinityNet, 'deeplab': DeepLab}


def build(kind, model_config, remat=False, num_classes=voc.NUM_CLASSES):
  """`kind` in MODELS; `model_config` has width_div and dtype ('float32' or 'bfloat16'); `remat` (a trainer section's
  `remat`): the backward of seam_jax.models.resnet38.tied_vjp, less memory for the same results; `num_classes`: the
  heads' outputs, background included (K + 1: seam_jax.layout.num_outputs(config); AffinityNet has no class head)."""
  if kind not in MODELS:
    raise ValueError(f'unknown model kind {kind!r}; expected one of {sorted(MODELS)}')
  extra = {} if kind == 'affinity' else {'num_classes': int(num_classes)}
  return MODELS[kind](width_div=model_config.width_div, dtype=jnp.dtype(model_config.dtype), remat=bool(remat),
                      **extra)


def _label_params(params, fn):
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  return flax.traverse_util.unflatten_dict({k: fn(k) for k in flat})


def is_batchnorm(path):
  return any(p.startswith('bn') for p in path)


def trainable_mask(params, frozen=FROZEN):
  """True for parameters the original trains: not BatchNorm, not the backbone layers `frozen` (SEAM: conv1a/b2/
  b2_1/b2_2, SEAM_SPEC section 1; the segmentation retrain: none, RETRAIN_SPEC QUIRK Q1)."""
  return _label_params(params, lambda k: not is_batchnorm(k) and not (k[0] == 'backbone' and k[1] in frozen))


def param_groups(params, frozen=FROZEN):
  """The original's optimizer groups per parameter: 'frozen', or 0 backbone weights (1x lr, wd), 1 backbone biases
  (2x, no wd), 2 new-layer weights (10x, wd), 3 new-layer biases (20x, no wd)."""
  train = flax.traverse_util.flatten_dict(trainable_mask(params, frozen))

  def group(k):
    if not train[k]:
      return 'frozen'
    return (2 if k[0] != 'backbone' else 0) + (1 if k[-1] == 'bias' else 0)
  return _label_params(params, group)


def calibrate_batchnorm(model, variables, images):
  """Data-dependent BatchNorm statistics for a start from scratch (no ImageNet weights).

  The original always starts from ImageNet weights and keeps every BN frozen, so a random init would leave
  mean 0 / var 1 statistics forever and activations badly scaled through 38 layers. One forward pass on `images`
  in which every BN normalises with its batch statistics gives, layer by layer, exactly the statistics a sequential
  calibration would; they become the running statistics. Opt-in (config.model.calibrate_bn), demo use.
  """
  stats = {}

  def interceptor(next_fun, args, kwargs, context):
    mod = context.module
    if not isinstance(mod, flax.linen.BatchNorm) or context.method_name != '__call__':
      return next_fun(*args, **kwargs)
    x = args[0].astype(jnp.float32)
    mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
    stats[tuple(mod.scope.path)] = (mean, var)
    y = (x - mean) * jax.lax.rsqrt(var + mod.epsilon) * mod.get_variable('params', 'scale')
    return (y + mod.get_variable('params', 'bias')).astype(args[0].dtype)

  with flax.linen.intercept_methods(interceptor):
    model.apply(variables, jnp.asarray(images))
  bs = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables['batch_stats']))
  for path, (mean, var) in stats.items():
    bs[path + ('mean',)], bs[path + ('var',)] = mean, var
  return {**variables, 'batch_stats': flax.traverse_util.unflatten_dict(bs)}
