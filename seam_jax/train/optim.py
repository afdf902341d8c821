"""The original's optimizer (SEAM_SPEC section 3) as optax: torch SGD + poly schedule + four parameter groups.

Per group g with lr multiplier mult_g and weight decay wd_g, at step t (0-based):
  d = grad + wd_g * param                  (SGD-style weight decay, before momentum)
  buf = momentum * buf + d                 (torch SGD: first step buf = d; no dampening, no nesterov)
  param -= base_lr * mult_g * (1 - t / max_steps) ** power * buf
Groups (seam_jax.models.param_groups): 0 backbone weights (1x, wd), 1 backbone biases (2x, no wd), 2 new-layer
weights (10x, wd), 3 new-layer biases (20x, no wd); 'frozen' parameters (BatchNorm, conv1a, b2*; `frozen_layers`
names others) get exactly zero update. QUIRK: the original's momentum is 0.0005 (the weight decay landed in SGD's
momentum slot); `fix_momentum=True` uses `fixed_momentum` instead.
"""
import jax
import jax.numpy as jnp
import optax

from seam_jax import models
from seam_jax.models import resnet38
from seam_jax.common import errors

LR_MULT = {0: 1., 1: 2., 2: 10., 3: 20.}
DECAYED = (0, 2)


def momentum_of(hparams):
  return float(hparams.fixed_momentum if hparams.fix_momentum else hparams.momentum)


def poly_schedule(base_lr, max_steps, power=0.9):
  """lr(t) = base_lr * (1 - t / max_steps) ** power; held at 0 past max_steps. The remaining fraction is computed
  as (max_steps - t) / max_steps from the exact integer difference (1 - t / max_steps in float32 loses ~1e-3
  relative near the end of a 20k-step run)."""
  def schedule(step):
    left = jnp.clip(max_steps - jnp.asarray(step, jnp.int32), 0, max_steps)
    return base_lr * (left.astype(jnp.float32) / max_steps) ** power
  return schedule


def _group_tx(group, hparams, schedule, momentum):
  wd = float(hparams.weight_decay) if group in DECAYED else 0.
  mult = LR_MULT[group]
  return optax.chain(
      optax.add_decayed_weights(wd) if wd else optax.identity(),
      optax.trace(decay=momentum, nesterov=False),
      optax.scale_by_schedule(lambda t: -mult * schedule(t)))


def make_optimizer(hparams, params, max_steps):
  """(tx, schedule) for `params` (only the tree structure and names are used).

  hparams: a trainer section (configs/sections.py: lr, weight_decay, momentum, fix_momentum, fixed_momentum,
  poly_power, poly_extra_steps (the segmentation retrain's poly denominator is max_steps + 1), frozen_layers).
  schedule(t) is the group-0 (1x) learning rate, for logging.
  """
  schedule = poly_schedule(float(hparams.lr), int(max_steps) + int(hparams.poly_extra_steps),
                           float(hparams.poly_power))
  momentum = momentum_of(hparams)
  group_txs = {f'group{g}': _group_tx(g, hparams, schedule, momentum) for g in LR_MULT}
  group_txs['frozen'] = optax.set_to_zero()
  # String labels only: the optimizer state is a dict keyed by label, and pytree keys must be sortable.
  frozen = tuple(hparams.frozen_layers)
  unknown = [n for n in frozen if n not in resnet38.LAYERS]
  if unknown:
    raise errors.DataError(f'config key frozen_layers: {unknown} are not ResNet38 layers '
                           f'(known: {", ".join(resnet38.LAYERS)})')
  groups = models.param_groups(params, frozen)
  labels = jax.tree.map(lambda g: g if g == 'frozen' else f'group{g}', groups)
  return optax.multi_transform(group_txs, labels), schedule
