"""The optax optimizer vs torch.optim.SGD with the original's groups, poly schedule and momentum quirk."""
import jax
import jax.numpy as jnp
from configs import sections
import numpy as np
import optax
import pytest
import torch

from seam_jax import models
from seam_jax.common import errors
from seam_jax.train import optim

BASE_LR = 0.01
MAX_STEPS = 10


def hparams(**kw):
  return sections.trainer(**dict(dict(lr=BASE_LR, weight_decay=5e-4, momentum=0.0005, fix_momentum=False,
                                      fixed_momentum=0.9, poly_power=0.9), **kw))


def toy_params():
  """One parameter per group: backbone weight (0) / bias (1), new-layer weight (2) / bias (3), and frozen ones
  (BatchNorm scale, conv1a / b2_1 weights)."""
  r = np.random.default_rng(0)
  a = lambda *s: jnp.asarray(r.normal(size=s), jnp.float32)
  return {'backbone': {'b4_1': {'conv_branch2a': {'kernel': a(3, 3, 2, 2), 'bias': a(2)},
                                'bn_branch2a': {'scale': a(2), 'bias': a(2)}},
                       'conv1a': {'kernel': a(3, 3, 3, 2)}, 'b2_1': {'conv_branch2a': {'kernel': a(3, 3, 2, 2)}}},
          'fc8': {'kernel': a(1, 1, 2, 21), 'bias': a(21)}}


def group_leaves(params):
  flat = jax.tree_util.tree_leaves_with_path(params)
  groups = jax.tree_util.tree_leaves(models.param_groups(params))
  return [(jax.tree_util.keystr(p), g, x) for (p, x), g in zip(flat, groups)]


def loss(params):
  return sum(jnp.sum(jnp.sin(x) * (i + 1)) for i, x in enumerate(jax.tree_util.tree_leaves(params)))


def run(tx, params, steps):
  state = tx.init(params)
  out = []
  for _ in range(steps):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    params = optax.apply_updates(params, updates)
    out.append(params)
  return out


def test_groups_of_toy_params():
  groups = {k: g for k, g, _ in group_leaves(toy_params())}
  assert sorted(map(str, groups.values())) == ['0', '1', '2', '3', 'frozen', 'frozen', 'frozen', 'frozen']


def test_frozen_params_never_change():
  params = toy_params()
  tx, _ = optim.make_optimizer(hparams(momentum=0.9), params, MAX_STEPS)
  for p in run(tx, params, 4):
    for (_, g, x0), (_, _, x) in zip(group_leaves(params), group_leaves(p)):
      if g == 'frozen':
        assert np.array_equal(np.asarray(x0), np.asarray(x))
      else:
        assert not np.allclose(np.asarray(x0), np.asarray(x))


def test_more_frozen_layers_and_unknown_names():
  params = toy_params()
  tx, _ = optim.make_optimizer(hparams(momentum=0.9, frozen_layers=('conv1a', 'b2_1', 'b4_1')), params, MAX_STEPS)
  p = run(tx, params, 2)[-1]
  assert np.array_equal(np.asarray(p['backbone']['b4_1']['conv_branch2a']['kernel']),
                        np.asarray(params['backbone']['b4_1']['conv_branch2a']['kernel']))
  assert not np.allclose(np.asarray(p['fc8']['kernel']), np.asarray(params['fc8']['kernel']))
  with pytest.raises(errors.DataError, match="frozen_layers: \\['b9'\\]"):
    optim.make_optimizer(hparams(frozen_layers=('conv1a', 'b9')), params, MAX_STEPS)


def test_effective_lr_per_group_is_poly_times_multiplier():
  """With momentum 0 and no weight decay, update = -base * mult * (1 - t / max) ** 0.9 * grad at every step t."""
  params = toy_params()
  tx, schedule = optim.make_optimizer(hparams(momentum=0., weight_decay=0.), params, MAX_STEPS)
  state = tx.init(params)
  for t in range(4):
    grads = jax.grad(loss)(params)
    updates, state = tx.update(grads, state, params)
    expect = BASE_LR * (1 - t / MAX_STEPS) ** 0.9
    np.testing.assert_allclose(float(schedule(t)), expect, rtol=1e-6)
    for (_, g, u), (_, _, gr) in zip(group_leaves(updates), group_leaves(grads)):
      mult = 0. if g == 'frozen' else optim.LR_MULT[g]
      np.testing.assert_allclose(np.asarray(u), -expect * mult * np.asarray(gr), rtol=1e-5, atol=1e-8)
    params = optax.apply_updates(params, updates)


def torch_reference(params, steps, momentum, wd):
  """torch.optim.SGD with the original's four groups, lr set per step like its PolyOptimizer."""
  leaves = group_leaves(params)
  tensors = {k: torch.tensor(np.asarray(x), requires_grad=True) for k, g, x in leaves if g != 'frozen'}
  groups = [{'params': [tensors[k] for k, gg, _ in leaves if gg == g], 'lr': BASE_LR * optim.LR_MULT[g],
             'weight_decay': wd if g in (0, 2) else 0.} for g in range(4)]
  opt = torch.optim.SGD(groups, lr=BASE_LR, momentum=momentum)
  order = [k for k, _, _ in leaves]
  out = []
  for t in range(steps):
    for grp, init in zip(opt.param_groups, [BASE_LR * optim.LR_MULT[g] for g in range(4)]):
      grp['lr'] = init * (1 - t / MAX_STEPS) ** 0.9
    opt.zero_grad()
    total = 0.
    for i, k in enumerate(order):
      if k in tensors:
        total = total + torch.sum(torch.sin(tensors[k]) * (i + 1))
    total.backward()
    opt.step()
    out.append({k: v.detach().numpy().copy() for k, v in tensors.items()})
  return out


def test_matches_torch_sgd_step_by_step():
  params = toy_params()
  for kw, momentum in [({}, 0.0005), ({'fix_momentum': True}, 0.9)]:
    tx, _ = optim.make_optimizer(hparams(**kw), params, MAX_STEPS)
    ours = run(tx, params, 3)
    ref = torch_reference(params, 3, momentum, 5e-4)
    for p, r in zip(ours, ref):
      for k, g, x in group_leaves(p):
        if g != 'frozen':
          np.testing.assert_allclose(np.asarray(x), r[k], rtol=1e-6, atol=1e-6)
