"""remat (a trainer section's switch, seam_jax.models.build(remat=...)): the same loss, gradients and BatchNorm
updates as without it, the same parameters, and the recomputation really happens on XLA:CPU."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import harness, train_steps
from seam_jax import models
from seam_jax.models import resnet38
from tests.test_models import reorder_rtol


def loss_and_grads(kind, remat):
  """(loss, gradients, BatchNorm updates) of `kind`'s training loss at the tiny benchmark size (width_div 32) on a
  fixed batch, weights and dropout key; remat on or off."""
  size = harness.SIZES['tiny']
  config = harness.make_config(size)
  task = train_steps.make_task(kind, config)
  model = models.build(task.model_kind, config.model, remat)
  variables = harness.jax_variables(kind, config.model)
  batch = train_steps.make_batch(kind, size)

  def loss_of(params):
    return task.loss_fn(model, {**variables, 'params': params}, batch, jax.random.PRNGKey(3), 0)
  (loss, aux), grads = jax.jit(jax.value_and_grad(loss_of, has_aux=True))(variables['params'])
  return loss, grads, aux[1] if task.updates_batch_stats else {}


@pytest.mark.parametrize('kind', train_steps.KINDS)
def test_remat_same_loss_and_gradients(kind):
  """The forward pass is the same program: the loss is the same bits. The backward recomputes the REMAT_BLOCKS with
  the same operations on bit-identical inputs (x + cotangent_zero == x), but XLA compiles the recomputation as
  another part of the program, where it may round differently (an FMA contracted in one fusion and not in the
  other, a reduction or a dot summed in another order): the two evaluations differ like two summation orders of
  the network, test_models.reorder_rtol (2 u sum over convs of sqrt(K)) of the gradient's scale; measured: <= 36 u
  of a parameter's largest gradient, against ~830 u."""
  (l0, g0, s0), (l1, g1, s1) = loss_and_grads(kind, False), loss_and_grads(kind, True)
  assert float(l0) == float(l1)
  assert jax.tree.structure(g0) == jax.tree.structure(g1)
  rtol = reorder_rtol(harness.jax_variables(kind, harness.make_config(harness.SIZES['tiny']).model))
  for a, b in zip(jax.tree.leaves((g0, s0)), jax.tree.leaves((g1, s1))):
    a, b = np.asarray(a), np.asarray(b)
    assert np.all(np.isfinite(a))
    np.testing.assert_allclose(b, a, rtol=0, atol=rtol * np.abs(a).max())


def test_tied_convs_alone_are_exact(monkeypatch):
  """Without recomputed blocks, remat only ties each conv's backward to its cotangent: the very same arithmetic,
  gradients equal bit for bit."""
  monkeypatch.setattr(resnet38, 'REMAT_BLOCKS', ())
  (l0, g0, _), (l1, g1, _) = loss_and_grads('seam', False), loss_and_grads('seam', True)
  assert float(l0) == float(l1)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


def test_remat_same_parameters_and_recomputes():
  """The parameter tree is the same with remat (checkpoints and exports are interchangeable), and on XLA:CPU the
  REMAT_BLOCKS' forward convolutions run again in the backward (segmentation: every block is trained): more
  convolutions in the compiled step, which jax.checkpoint's CSE-merged recomputation would not give."""
  size = harness.SIZES['tiny']
  config = harness.make_config(size)
  x = jnp.zeros((5, size.crop, size.crop, 3))
  nets = [models.build('deeplab', config.model, remat) for remat in (False, True)]
  variables = [jax.eval_shape(lambda n=n: n.init({'params': jax.random.PRNGKey(0)}, x)) for n in nets]
  assert jax.tree.map(lambda v: v.shape, variables[0]) == jax.tree.map(lambda v: v.shape, variables[1])

  def convolutions(net):
    def loss(variables):
      out, _ = net.apply(variables, x, train=True, dropout=False, mutable=['batch_stats'])
      return jnp.sum(out)
    hlo = jax.jit(jax.grad(loss)).lower(variables[0]).compile().as_text()
    return hlo.count(' convolution(')
  assert convolutions(nets[1]) > convolutions(nets[0])


def test_cotangent_zero_is_exact():
  """x + cotangent_zero(ct) == x bit for bit, signed zeros and non-finite x included, whatever ct holds."""
  x = jnp.array([0., -0., 1.5, -2.25, jnp.inf, -jnp.inf, jnp.nan], jnp.float32)
  for ct in (jnp.ones(3), -jnp.ones(3), jnp.full(3, jnp.nan), jnp.full(3, -jnp.inf), {'a': jnp.zeros(2, jnp.bfloat16)}):
    y = x + resnet38.cotangent_zero(ct)
    assert np.asarray(y).tobytes() == np.asarray(x).tobytes()
