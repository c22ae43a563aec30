"""sparseopt_jax.flax_utils: kernels paired with their BatchNorm by data flow."""

import functools
import inspect
import json
import os
import subprocess
import sys

from flax import nnx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import models
import sparseopt_jax as sparseopt
from sparseopt_jax import flax_utils

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPECTED = {
    "apply_with_batch_variances",
    "pair_batchnorms",
    "running_variances",
}


def flat(tree):
  return {
      sparseopt.path_str(p): x
      for p, x in jax.tree_util.tree_leaves_with_path(
          tree, is_leaf=lambda v: v is None
      )
  }


def factor(mask, var, epsilon=1e-5):
  """NumPy: sigma_i / rms_j sigma_j over active neurons (neuron axis last)."""
  m = np.asarray(mask, bool)
  active = m.reshape(-1, m.shape[-1]).any(axis=0)
  sigma = np.sqrt(np.asarray(var, np.float64) + epsilon)
  out = np.zeros(m.shape[-1])
  if active.any():
    out[active] = sigma[active] / np.sqrt(np.mean(sigma[active] ** 2))
  return out


@functools.lru_cache
def fmnist():
  model = models.create_model("fmnist_resnet", num_classes=10)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 28, 28, 1)))
  variables = model.init(jax.random.key(0), x, train=True)
  return model, x, variables


# ------------------------------------------------------------- the surface


def test_public_names_pinned_documented_private():
  assert set(flax_utils.__all__) == EXPECTED
  public = {
      n
      for n in dir(flax_utils)
      if not n.startswith("_") and not inspect.ismodule(getattr(flax_utils, n))
  }
  assert public == EXPECTED
  for name in EXPECTED:
    obj = getattr(flax_utils, name)
    assert inspect.getdoc(obj)
    assert obj.__module__.startswith("sparseopt_jax._src.")


def test_plain_import_does_not_load_it():
  code = (
      "import json, sys, sparseopt_jax; print(json.dumps(sorted(sys.modules)))"
  )
  out = subprocess.run(
      [sys.executable, "-c", code],
      cwd=_REPO,
      capture_output=True,
      text=True,
      check=True,
  ).stdout
  loaded = set(json.loads(out.splitlines()[-1]))
  assert "sparseopt_jax.flax_utils" not in loaded
  assert "sparseopt_jax._src.flax_utils" not in loaded
  assert "flax" not in {m.split(".")[0] for m in loaded}


# ------------------------------------------------------------- the pairing


def test_fmnist_resnet_every_conv_paired_with_its_bn():
  model, x, _ = fmnist()
  pairs = flax_utils.pair_batchnorms(model, x, train=True)
  assert pairs == {
      "conv_init/kernel": "bn_init",
      "BasicBlock_0/Conv_0/kernel": "BasicBlock_0/BatchNorm_0",
      "BasicBlock_0/Conv_1/kernel": "BasicBlock_0/BatchNorm_1",
      "BasicBlock_1/Conv_0/kernel": "BasicBlock_1/BatchNorm_0",
      "BasicBlock_1/Conv_1/kernel": "BasicBlock_1/BatchNorm_1",
      "BasicBlock_1/conv_proj/kernel": "BasicBlock_1/norm_proj",
      "BasicBlock_2/Conv_0/kernel": "BasicBlock_2/BatchNorm_0",
      "BasicBlock_2/Conv_1/kernel": "BasicBlock_2/BatchNorm_1",
      "BasicBlock_2/conv_proj/kernel": "BasicBlock_2/norm_proj",
  }
  # Eval mode (running averages) pairs the same way.
  assert flax_utils.pair_batchnorms(model, x, train=False) == pairs


def test_resnet20_every_conv_paired_head_not():
  model = models.create_model("resnet20", num_classes=10)
  x = jnp.ones((2, 32, 32, 3))
  pairs = flax_utils.pair_batchnorms(model, x, train=True)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
  kernels = {
      n for n, v in flat(shapes["params"]).items() if n.endswith("kernel")
  }
  convs = {n for n in kernels if len(flat(shapes["params"])[n].shape) == 4}
  norms = {n[: -len("/var")] for n in flat(shapes["batch_stats"]) if "var" in n}
  assert len(convs) == 1 + 9 * 2 + 2  # stem, 9 blocks, 2 projections
  assert set(pairs) == convs and "head/kernel" not in pairs
  # One BatchNorm per conv, each in the conv's own block.
  assert sorted(pairs.values()) == sorted(norms)
  for conv, norm in pairs.items():
    assert conv.split("/")[:-2] == norm.split("/")[:-1]
  assert sum("conv_proj" in c for c in pairs) == 2
  assert all(pairs[c].endswith("norm_proj") for c in pairs if "conv_proj" in c)


class Misleading(nn.Module):
  """Names and creation order that would pair wrongly; data flow does not."""

  @nn.compact
  def __call__(self, x, train: bool = True):
    norm = functools.partial(nn.BatchNorm, use_running_average=not train)
    a = nn.Dense(4, name="bn")(x)  # a Dense named like a norm
    b = nn.Dense(4, name="conv_b")(x)
    x = norm(name="input_norm")(x)  # normalizes no kernel's output
    nb = norm(name="conv")(b)  # a BatchNorm named "conv", made before a's
    na = norm(name="bn_of_conv_b")(a)  # named after the other kernel
    c = nn.Dense(4, name="dense_c")(x)
    nc = norm(name="norm_c")(nn.relu(c))  # activation in between: unpaired
    return nn.Dense(3, name="head")(na + nb + nc)


def test_pairing_follows_data_flow_not_names():
  x = jnp.ones((5, 3))
  pairs = flax_utils.pair_batchnorms(Misleading(), x)
  assert pairs == {"bn/kernel": "bn_of_conv_b", "conv_b/kernel": "conv"}


class TwoNorms(nn.Module):

  @nn.compact
  def __call__(self, x):
    y = nn.Dense(4)(x)
    a = nn.BatchNorm(use_running_average=False)(y)
    return a + nn.BatchNorm(use_running_average=False)(y)


def test_a_kernel_feeding_two_batchnorms_is_an_error():
  with pytest.raises(ValueError, match=r"'Dense_0/kernel' feeds two"):
    flax_utils.pair_batchnorms(TwoNorms(), jnp.ones((2, 3)))


# --------------------------------------------------------- the statistics


def random_masks(params, seed=0):
  rng = np.random.default_rng(seed)

  def mask(path, p):
    if p.ndim < 2:
      return None
    m = rng.random(p.shape) < 0.4
    if sparseopt.path_str(path) == "BasicBlock_1/Conv_1/kernel":
      m[..., 3] = False  # a dead neuron
    return jnp.asarray(m)

  return jax.tree_util.tree_map_with_path(mask, params)


def test_running_variances_give_the_reference_scales():
  model, x, variables = fmnist()
  params = variables["params"]
  rng = np.random.default_rng(1)
  batch_stats = jax.tree_util.tree_map_with_path(
      lambda p, v: jnp.asarray(rng.gamma(2.0, 0.5, v.shape), jnp.float32)
      if sparseopt.path_str(p).endswith("var")
      else v,
      variables["batch_stats"],
  )
  pairs = flax_utils.pair_batchnorms(model, x, train=True)
  masks = random_masks(params)
  grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape)), params)
  tx = sparseopt.scale_by_sparseopt(correction="batch_stats")

  @jax.jit
  def step(grads, params, batch_stats):
    variances = flax_utils.running_variances(pairs, params, batch_stats)
    return tx.update(
        grads, tx.init(params), params, masks=masks, batch_stats=variances
    )[0]

  out = flat(step(grads, params, batch_stats))
  g, m, bs = flat(grads), flat(masks), flat(batch_stats)
  for name, o in out.items():
    if name in pairs:
      f = factor(m[name], bs[pairs[name] + "/var"])
      want = np.asarray(g[name], np.float64) * f
    else:  # the head, biases and BatchNorm parameters
      want = g[name]
    np.testing.assert_allclose(o, want, rtol=1e-5, atol=1e-7, err_msg=name)
  assert np.all(out["BasicBlock_1/Conv_1/kernel"][..., 3] == 0)
  with pytest.raises(KeyError, match=r"no 'bn_init/var'"):
    flax_utils.running_variances(pairs, params, {})


def test_captured_variances_are_what_batchnorm_used():
  model, x, variables = fmnist()
  pairs = flax_utils.pair_batchnorms(model, x, train=True)
  (_, new_state), variances = jax.jit(
      lambda v, x: flax_utils.apply_with_batch_variances(
          model, v, x, train=True, mutable=["batch_stats"]
      )
  )(variables, x)
  got = flat(variances)
  assert {n for n, v in got.items() if v is not None} == set(pairs)
  old, new = flat(variables["batch_stats"]), flat(new_state["batch_stats"])
  for kernel, norm in pairs.items():
    # BatchNorm's update: var <- 0.9 var + 0.1 batch_var.
    key = norm + "/var"
    np.testing.assert_allclose(
        new[key], 0.9 * old[key] + 0.1 * got[kernel], rtol=1e-5, atol=1e-6
    )
    assert got[kernel].dtype == jnp.float32
  # Independently: the stem's batch variance from its conv output in NumPy.
  y = nn.Conv(8, (3, 3), use_bias=False).apply(
      {"params": variables["params"]["conv_init"]}, x
  )
  np.testing.assert_allclose(
      got["conv_init/kernel"],
      np.var(np.asarray(y, np.float64), axis=(0, 1, 2)),
      rtol=1e-4,
  )
  # With running averages the captured variance is the running one.
  _, variances = flax_utils.apply_with_batch_variances(
      model, variables, x, train=False
  )
  np.testing.assert_allclose(flat(variances)["conv_init/kernel"], 1.0)


def test_train_step_recipe_through_dynamic_sparse():
  model, x, variables = fmnist()
  labels = jnp.arange(x.shape[0]) % 10
  params = variables["params"]
  masks = random_masks(params)
  params = sparseopt.apply_masks(params, masks)
  tx = sparseopt.dynamic_sparse(
      optax.chain(
          sparseopt.scale_by_sparseopt(correction="batch_stats"),
          optax.sgd(0.1, momentum=0.9),
      ),
      masks,
      update_every=2,
      end_step=10,
      key=jax.random.key(0),
  )

  @jax.jit
  def train_step(params, batch_stats, opt_state):
    def loss_fn(params):
      (logits, new_state), variances = flax_utils.apply_with_batch_variances(
          model,
          {"params": params, "batch_stats": batch_stats},
          x,
          train=True,
          mutable=["batch_stats"],
      )
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
      return loss.mean(), (new_state["batch_stats"], variances)

    (loss, (batch_stats, variances)), grads = jax.value_and_grad(
        loss_fn, has_aux=True
    )(params)
    updates, opt_state = tx.update(
        grads, opt_state, params, batch_stats=variances
    )
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  batch_stats, opt_state = variables["batch_stats"], tx.init(params)
  losses = []
  for _ in range(3):  # step 2 is a mask update
    params, batch_stats, opt_state, loss = train_step(
        params, batch_stats, opt_state
    )
    losses.append(float(loss))
  assert np.all(np.isfinite(losses))
  for p in jax.tree.leaves(params):
    assert bool(jnp.all(jnp.isfinite(p)))


# -------------------------------------------------------------------- NNX


class NnxBlock(nnx.Module):

  def __init__(self, rngs):
    self.conv = nnx.Conv(4, 4, (3, 3), use_bias=False, rngs=rngs)
    self.bn = nnx.BatchNorm(4, rngs=rngs)
    self.proj = nnx.Conv(4, 4, (1, 1), use_bias=False, rngs=rngs)
    # Named after the other conv; it normalizes the projection.
    self.conv_bn = nnx.BatchNorm(4, rngs=rngs)

  def __call__(self, x):
    return nnx.relu(self.bn(self.conv(x)) + self.conv_bn(self.proj(x)))


class NnxNet(nnx.Module):

  def __init__(self, rngs):
    self.stem = nnx.Conv(1, 4, (3, 3), rngs=rngs)
    self.conv = nnx.BatchNorm(4, rngs=rngs)  # a BatchNorm named "conv"
    self.blocks = nnx.List([NnxBlock(rngs), NnxBlock(rngs)])
    self.head = nnx.Linear(4, 2, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.conv(self.stem(x)))
    for block in self.blocks:
      x = block(x)
    return self.head(x.mean(axis=(1, 2)))


def test_nnx_pairing_and_running_variances():
  model = NnxNet(nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 6, 6, 1)))
  call = {cls: cls.__call__ for cls in (NnxNet, NnxBlock, nnx.Conv)}
  pairs = flax_utils.pair_batchnorms(model, x)
  assert pairs == {
      "stem/kernel": "conv",
      "blocks/0/conv/kernel": "blocks/0/bn",
      "blocks/0/proj/kernel": "blocks/0/conv_bn",
      "blocks/1/conv/kernel": "blocks/1/bn",
      "blocks/1/proj/kernel": "blocks/1/conv_bn",
  }
  # The trace used a copy and restored every class.
  assert {cls: cls.__call__ for cls in call} == call
  np.testing.assert_array_equal(model.conv.var[...], 1.0)

  rng = np.random.default_rng(2)
  for norm in (model.conv, model.blocks[0].bn, model.blocks[1].conv_bn):
    norm.var[...] = jnp.asarray(rng.gamma(2.0, 0.5, 4), jnp.float32)
  params = nnx.state(model, nnx.Param)
  variances = flax_utils.running_variances(
      pairs, params, nnx.state(model, nnx.BatchStat)
  )
  got = flat(variances)
  assert got["head/kernel"] is None
  np.testing.assert_array_equal(
      got["blocks/1/proj/kernel"], model.blocks[1].conv_bn.var[...]
  )
  # Through nnx.Optimizer, which forwards update keywords to optax.
  masks = jax.tree.map(
      lambda p: jnp.asarray(rng.random(p.shape) < 0.5) if p.ndim >= 2 else None,
      nnx.as_pure(params),
  )
  tx = optax.chain(
      sparseopt.scale_by_sparseopt(correction="batch_stats"), optax.sgd(1.0)
  )
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  grads = nnx.grad(lambda m: m(x).sum())(model)
  updates = optimizer.update(model, grads, masks=masks, batch_stats=variances)
  g, m, u = flat(nnx.as_pure(grads)), flat(masks), flat(updates)
  for name in pairs:
    want = -np.asarray(g[name], np.float64) * factor(m[name], got[name])
    np.testing.assert_allclose(u[name], want, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(u["head/kernel"], -g["head/kernel"], rtol=1e-6)
