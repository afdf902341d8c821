"""SEAM losses vs PyTorch implementations of the original formulas (NCHW, written here from SEAM_SPEC section 3),
and the full SEAM loss value and parameter gradients vs the PyTorch reference net (tests/torch_reference.py)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from seam_jax.train import equivariance, losses
from torch_reference.losses import t_amp, t_onehot, t_seam_loss, t_topk_mean



def nhwc(t):
  return jnp.asarray(t.detach().numpy().transpose(0, 2, 3, 1))


def nchw(a):
  return torch.from_numpy(np.asarray(a).transpose(0, 3, 1, 2).copy())


def random_label(rng, n):
  lab = (rng.random((n, 20)) < 0.3).astype(np.float32)
  lab[np.arange(n), rng.integers(0, 20, n)] = 1.      # at least one class per image
  return np.concatenate([np.ones((n, 1), np.float32), lab], 1)


def close(a, b, tol=1e-5):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


# ---------------------------------------------------------------------------------------------- unit tests
def test_multilabel_soft_margin():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(4, 20)).astype(np.float32) * 3
  y = (rng.random((4, 20)) < 0.4).astype(np.float32)
  ref = F.multilabel_soft_margin_loss(torch.from_numpy(x), torch.from_numpy(y))
  close(losses.multilabel_soft_margin(x, y), ref.item())


@pytest.mark.parametrize('shape', [(2, 20, 12, 12), (3, 20, 9, 7)])
def test_adaptive_min_pooling_loss(shape):
  x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
  close(losses.adaptive_min_pooling_loss(nhwc(x)), t_amp(x).item())


def test_adaptive_min_pooling_loss_ties():
  """Many exact ties (zeros of absent classes, repeated values): the value set is what counts."""
  x = torch.randint(-2, 3, (2, 20, 8, 8)).float()
  close(losses.adaptive_min_pooling_loss(nhwc(x)), t_amp(x).item())


def test_onehot_background_topk_er():
  g = torch.Generator().manual_seed(2)
  cam = torch.rand((2, 21, 10, 10), generator=g)
  cam[:, 5] = cam[:, 3]                       # ties keep both tied values
  close(losses.max_onehot(nhwc(cam)), nhwc(t_onehot(cam)), 0)
  bg = cam.clone()
  bg[:, 0] = 1 - torch.max(bg[:, 1:], dim=1)[0]
  close(losses.with_background(nhwc(cam)), nhwc(bg), 1e-6)
  close(losses.topk_mean(nhwc(cam), 0.2), t_topk_mean(cam, 0.2).item())
  other = torch.rand((2, 21, 10, 10), generator=g)
  close(losses.er_loss(nhwc(cam), nhwc(other)), torch.mean(torch.abs(cam[:, 1:] - other[:, 1:])).item())


def test_ecr_loss():
  g = torch.Generator().manual_seed(3)
  c1, c2, r1, r2 = (torch.rand((2, 21, 9, 9), generator=g) for _ in range(4))
  ref = t_topk_mean(torch.abs(t_onehot(c2) - r1), 0.2) + t_topk_mean(torch.abs(t_onehot(c1) - r2), 0.2)
  close(losses.ecr_loss(nhwc(c1), nhwc(c2), nhwc(r1), nhwc(r2), 0.2), ref.item())


@pytest.mark.slow
@pytest.mark.parametrize('size,scale', [(32, 0.3), (40, 0.5)])
def test_seam_loss_value_and_gradients_vs_torch(size, scale):
  """Value, logged terms and gradients w.r.t. all four network outputs, on random outputs."""
  g = torch.Generator().manual_seed(4)
  small = int(np.floor(size * scale))
  t_out = [torch.randn((2, 21, s, s), generator=g, requires_grad=True) for s in (size, size, small, small)]
  label = random_label(np.random.default_rng(4), 2)
  t_loss, t_terms = t_seam_loss(*t_out, torch.from_numpy(label), scale)
  t_loss.backward()

  def f(outs):
    cam1, rv1, cam2, rv2 = outs
    return losses.seam_loss((cam1, rv1), (cam2, rv2), label, equivariance.Rescale(scale), 0.2)
  (loss, metrics), grads = jax.value_and_grad(f, has_aux=True)([nhwc(t) for t in t_out])
  close(loss, t_loss.item())
  for k in ('cls', 'er', 'ecr'):
    close(metrics[k], t_terms[k].item())
  for gj, t in zip(grads, t_out):
    close(gj, nhwc(t.grad), 1e-6)


@pytest.mark.parametrize('eq', [equivariance.HFlip(), equivariance.Rot90(1)])
def test_exactly_equivariant_outputs_give_zero_er(eq):
  """If the second view's CAMs are exactly the transformed first ones, ER is 0; a mismatched view is not."""
  cam, rv = (jax.random.normal(k, (2, 12, 12, 21)) for k in jax.random.split(jax.random.key(0)))
  label = jnp.asarray(random_label(np.random.default_rng(5), 2))
  _, m = losses.seam_loss((cam, rv), (eq.cam(cam), eq.cam(rv)), label, eq)
  assert float(m['er']) == 0.
  _, m_wrong = losses.seam_loss((cam, rv), (cam[:, ::-1], rv[:, ::-1]), label, eq)
  assert float(m_wrong['er']) > 0.01


def test_make_equivariance():
  c = ml_collections.ConfigDict({'equivariance': 'rescale', 'scale_factor': 0.3})
  assert equivariance.make_equivariance(c) == equivariance.Rescale(0.3)
  assert equivariance.make_equivariance(c).image(jnp.zeros((1, 448, 448, 3))).shape == (1, 134, 134, 3)
  c.equivariance = 'flip'
  assert isinstance(equivariance.make_equivariance(c), equivariance.HFlip)
  c.equivariance = 'bogus'
  with pytest.raises(ValueError, match='bogus'):
    equivariance.make_equivariance(c)


# ------------------------------------------------------------------------ full loss through the networks
@pytest.mark.slow
def test_seam_loss_and_param_gradients_vs_torch_reference_net():
  """The key parity test: SEAM loss value and d loss / d params (every parameter, BN included) of the Flax net
  vs the PyTorch reference net with the same (converted) weights, eval mode, 64x64 inputs, 0.3 rescale."""
  from seam_jax.models import convert   # pylint: disable=g-import-not-at-top
  from seam_jax import models   # pylint: disable=g-import-not-at-top
  from seam_jax.train import seam_task, trainer   # pylint: disable=g-import-not-at-top
  from torch_reference import models as torch_reference                   # pylint: disable=g-import-not-at-top
  net = torch_reference.randomize_(torch_reference.SEAMRef(width_div=16), seed=1).eval()
  cfg = convert.model_config(16)
  variables = convert.state_dict_to_variables(torch_reference.state_dict_numpy(net), 'seam', cfg)
  g = torch.Generator().manual_seed(6)
  img = torch.randn((2, 3, 64, 64), generator=g)
  label = random_label(np.random.default_rng(6), 2)

  img2 = F.interpolate(img, scale_factor=0.3, mode='bilinear', align_corners=True)
  t_loss, _ = t_seam_loss(*net(img), *net(img2), torch.from_numpy(label), 0.3)
  t_loss.backward()
  grad_sd = {k: (p.grad if p.grad is not None else torch.zeros_like(p)).numpy() for k, p in net.named_parameters()}
  grad_sd.update({k: v.numpy() for k, v in net.state_dict().items() if 'running' in k})
  t_grads = convert.state_dict_to_variables(grad_sd, 'seam', cfg)['params']

  model = models.build('seam', cfg)
  loss_fn = seam_task.make_loss_fn(equivariance.Rescale(0.3), 0.2, train=False)
  batch = {'image': nhwc(img), 'label': jnp.asarray(label[:, 1:])}

  def f(params):
    return loss_fn(model, {'params': params, 'batch_stats': variables['batch_stats']}, batch, jax.random.key(0), 0)
  (loss, _), grads = jax.jit(jax.value_and_grad(f, has_aux=True), compiler_options=trainer.compiler_options(True))(
      variables['params'])
  close(loss, t_loss.item())
  flat = jax.tree_util.tree_leaves_with_path(grads)
  for (path, gj), gt in zip(flat, jax.tree_util.tree_leaves(t_grads)):
    scale = max(float(np.abs(gt).max()), 1e-8)
    np.testing.assert_allclose(np.asarray(gj), gt, rtol=1e-4, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path))
  assert sum(float(np.abs(x).sum()) for x in jax.tree_util.tree_leaves(t_grads)) > 0


def test_pcm_gradient_with_all_zero_feature_vectors_matches_torch():
  """Pixels whose PCM features are exactly 0 (zero padding of a crop, all-dead relu): torch's norm has gradient
  0 there; a NaN here would poison the f8/f9 weights."""
  from seam_jax.models import seam   # pylint: disable=g-import-not-at-top
  from torch_reference import models as torch_reference   # pylint: disable=g-import-not-at-top
  g = torch.Generator().manual_seed(7)
  f = torch.randn((2, 6, 5, 5), generator=g)
  f[:, :, :2] = 0.
  f.requires_grad_(True)
  cdn = torch.rand((2, 21, 5, 5), generator=g)
  w = torch.randn((2, 21, 5, 5), generator=g)
  (torch_reference.pcm(cdn, f) * w).sum().backward()
  grad = jax.grad(lambda x: jnp.sum(seam.pcm(nhwc(cdn), x) * nhwc(w)))(nhwc(f.detach()))
  assert np.all(np.isfinite(np.asarray(grad)))
  close(grad, nhwc(f.grad), 1e-4)
