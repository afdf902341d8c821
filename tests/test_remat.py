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


@pytest.mark.slow
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


@pytest.mark.slow
def test_tied_convs_alone_are_exact(monkeypatch):
  """Without recomputed blocks, remat only ties each conv's backward to its cotangent: the very same arithmetic,
  gradients equal bit for bit."""
  monkeypatch.setattr(resnet38, 'REMAT_BLOCKS', ())
  (l0, g0, _), (l1, g1, _) = loss_and_grads('seam', False), loss_and_grads('seam', True)
  assert float(l0) == float(l1)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


@pytest.mark.slow
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


@pytest.mark.slow
def test_training_stage_uses_remat(tmp_path, monkeypatch):
  """A SEAM training stage with config.train.remat = True builds its step's network with remat (the trainer passes
  its section's switch to models.build; without it, no network is built with remat) and logs the same loss at step
  1 as with False: the first step's loss is the forward pass from the same initial weights, the same operations
  with remat on or off (test_remat_same_loss_and_gradients), so the same bits; the step's update then goes through
  tied_vjp's backward."""
  from tests import test_trainer  # pylint: disable=g-import-not-at-top
  from seam_jax.train import trainer  # pylint: disable=g-import-not-at-top
  built, build = [], models.build

  def spy(kind, model_config, remat=False, *args, **kwargs):
    built.append(bool(remat))
    return build(kind, model_config, remat, *args, **kwargs)
  monkeypatch.setattr(models, 'build', spy)
  losses = {}
  for remat in (False, True):
    built.clear()
    config = test_trainer.make_config(tmp_path / f'remat_{remat}', max_steps=1, log_every=1, ckpt_every=1,
                                      image_summaries=False, remat=remat)
    trainer.train(config, test_trainer.task_for(config))
    assert built and built.count(True) == (1 if remat else 0)   # the train step's network, once
    (line,) = test_trainer.logged(config.workdir)
    assert line['step'] == 1
    losses[remat] = line['loss']
  assert np.isfinite(losses[False]) and losses[True] == losses[False]
