"""Tests of experiments.models: presets, sizes, BatchNorm placement."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import models


def _variables(name, num_classes, shape, **kwargs):
  model = models.create_model(name, num_classes=num_classes, **kwargs)
  return model, jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(shape), train=False)
  )


def _count(tree):
  return sum(np.prod(x.shape) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize(
    "name, num_classes, params",
    [
        # torchvision's counts (conv without bias, BN scale/offset, biased head).
        ("resnet18", 1000, 11_689_512),
        ("resnet50", 1000, 25_557_032),
    ],
)
def test_imagenet_resnets_have_torchvision_sizes(name, num_classes, params):
  _, variables = _variables(name, num_classes, (1, 64, 64, 3))
  assert _count(variables["params"]) == params


@pytest.mark.parametrize(
    "name, blocks",
    [("resnet20", 3), ("resnet32", 5), ("resnet56", 9), ("fmnist_resnet", 1)],
)
def test_cifar_resnets(name, blocks):
  _, variables = _variables(name, 100, (1, 32, 32, 3))
  params = variables["params"]
  assert len([k for k in params if k.startswith("BasicBlock")]) == 3 * blocks
  assert params["head"]["kernel"].shape[1] == 100


@pytest.mark.parametrize(
    "name", sorted(set(models.MODELS) - set(models.TRANSFORMERS))
)
def test_batchnorm_after_every_conv(name):
  shape = (1, 28, 28, 1) if name.startswith("fmnist") else (1, 32, 32, 3)
  _, variables = _variables(name, 10, shape)
  paths = [flax.traverse_util.flatten_dict(variables["params"])]
  kernels = [k for k in paths[0] if k[-1] == "kernel" and k[-2] != "head"]
  norms = flax.traverse_util.flatten_dict(variables["batch_stats"])
  assert kernels
  assert len(kernels) == len([k for k in norms if k[-1] == "mean"])


def test_mlp_without_bn_has_bias_and_no_stats():
  _, variables = _variables("fmnist_mlp", 10, (1, 28, 28, 1), width=32)
  assert "batch_stats" in variables
  model = models.MLP(num_classes=10, hidden=32, use_bn=False)
  plain = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))
  assert "batch_stats" not in plain and "bias" in plain["params"]["hidden"]


def test_forward_shapes_and_width():
  model, _ = _variables("fmnist_resnet", 10, (1, 28, 28, 1), width=4)
  x = jnp.zeros((2, 28, 28, 1))

  @jax.jit  # Eager init/apply would compile every op separately.
  def forward(x):
    variables = model.init(jax.random.PRNGKey(0), x, train=False)
    logits, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
    return variables, logits

  variables, logits = forward(x)
  assert variables["params"]["conv_init"]["kernel"].shape == (3, 3, 1, 4)
  assert logits.shape == (2, 10)


def test_unknown_model():
  with pytest.raises(ValueError, match="Unknown model 'vgg'"):
    models.create_model("vgg", num_classes=10)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_vit_shapes(qk_norm):
  name = "fmnist_vit_qk" if qk_norm else "fmnist_vit"
  _, variables = _variables(name, 10, (1, 28, 28, 1))
  assert "batch_stats" not in variables
  params = variables["params"]
  assert params["patch_embed"]["kernel"].shape == (7, 7, 1, 64)
  assert params["pos_embed"].shape == (1, 16, 64)  # 16 tokens of 7x7.
  assert sorted(k for k in params if k.startswith("block")) == [
      f"block{i}" for i in range(4)
  ]
  attn = params["block0"]["attn"]
  for name in ("query", "key", "value"):
    assert attn[name]["kernel"].shape == (64, 4, 16)
  assert attn["out"]["kernel"].shape == (4, 16, 64)
  assert params["block0"]["mlp_up"]["kernel"].shape == (64, 128)
  assert ("query_norm" in attn) == ("key_norm" in attn) == qk_norm
  if qk_norm:
    assert attn["query_norm"]["scale"].shape == (16,)  # Per head_dim.


def test_vit_qk_norm_normalizes_each_head():
  model = models.SelfAttention(heads=2, head_dim=4, qk_norm=True)
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 3, 8))
  variables = model.init(jax.random.PRNGKey(1), x)
  _, inter = model.apply(
      variables, x, capture_intermediates=lambda m, _: "norm" in (m.name or "")
  )
  q = inter["intermediates"]["query_norm"]["__call__"][0]
  # Unit RMS over head_dim for every token and head (scale starts at 1).
  np.testing.assert_allclose(np.sqrt(np.mean(np.square(q), -1)), 1.0, rtol=1e-3)


def test_vit_width_sets_d_model():
  model = models.create_model("fmnist_vit", num_classes=10, width=32)
  assert model.d_model == 32
