"""Flax integration: NNX's Optimizer forwards masks=, linen params work."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sparseopt_jax as sparseopt
import reference as ref


def test_nnx_optimizer_forwards_masks():
  from flax import nnx

  class Net(nnx.Module):

    def __init__(self, rngs):
      self.dense = nnx.Linear(6, 5, use_bias=True, rngs=rngs)
      self.bn = nnx.BatchNorm(5, rngs=rngs)

    def __call__(self, x):
      return self.bn(self.dense(x))

  model = Net(nnx.Rngs(0))
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  masks = sparseopt.init_masks(jax.random.key(1), params, 0.6, "uniform")
  kernel_mask = np.asarray(masks["dense"]["kernel"])
  assert masks["dense"]["bias"] is None and masks["bn"]["scale"] is None
  lr = 0.1
  opt = nnx.Optimizer(
      model,
      optax.chain(sparseopt.scale_by_sparseopt(), optax.sgd(lr)),
      wrt=nnx.Param,
  )
  x = jax.random.normal(jax.random.key(2), (8, 6))
  loss = lambda m: jnp.mean(m(x) ** 2 * jnp.arange(1.0, 6.0))  # noqa: E731
  grads = nnx.grad(loss)(model)
  before = np.asarray(model.dense.kernel[...])
  g = np.asarray(grads["dense"]["kernel"][...])
  opt.update(model, grads, masks=masks)
  after = np.asarray(model.dense.kernel[...])
  # The step used the keyword's masks: the factor of *those* masks (the
  # kernel itself is dense, so params != 0 would have given the identity).
  c = ref.sparseopt_factor(kernel_mask)
  assert c.std() > 0.01
  np.testing.assert_allclose(after - before, -lr * c * g, rtol=1e-4, atol=1e-6)


def test_linen_params():
  import flax.linen as nn

  class CNN(nn.Module):

    @nn.compact
    def __call__(self, x):
      x = nn.Conv(4, (3, 3))(x)
      x = nn.BatchNorm(use_running_average=False)(x)
      x = nn.Conv(6, (1, 1))(x)
      x = x.mean((1, 2))
      return nn.Dense(3, name="head")(x)

  model = CNN()
  x = jax.random.normal(jax.random.key(0), (2, 5, 5, 2))
  variables = jax.jit(model.init)(jax.random.key(1), x)
  params = variables["params"]
  masks = sparseopt.init_masks(
      jax.random.key(2),
      params,
      0.7,
      "erk",
      filter_fn=sparseopt.exclude_paths("head"),
  )
  assert set(sparseopt.layer_sparsity(masks)) == {
      "Conv_0/kernel",
      "Conv_1/kernel",
  }
  assert masks["head"]["kernel"] is None
  assert masks["BatchNorm_0"]["scale"] is None
  params = sparseopt.apply_masks(params, masks)

  def loss(p):
    y, _ = model.apply({**variables, "params": p}, x, mutable=["batch_stats"])
    return jnp.sum(y**2)

  grads = jax.jit(jax.grad(loss))(params)
  tx = sparseopt.sparseopt(0.1, momentum=None)
  updates, _ = jax.jit(lambda g, p: tx.update(g, tx.init(p), p, masks=masks))(
      grads, params
  )
  for name in ("Conv_0", "Conv_1"):
    m = np.asarray(masks[name]["kernel"])
    want = -0.1 * ref.scale_grad(grads[name]["kernel"], ref.sparseopt_factor(m))
    np.testing.assert_allclose(
        updates[name]["kernel"], want, rtol=1e-5, atol=1e-7
    )
  np.testing.assert_allclose(
      updates["head"]["kernel"], -0.1 * grads["head"]["kernel"], rtol=1e-6
  )
