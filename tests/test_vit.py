"""The ViT preset, the normalizer-group correction and the fmnist_vit_qk sweep."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments import fake_data
from experiments import models
from experiments import optimizers
from experiments import sweep
from experiments import train
from experiments.configs import fields
import sparseopt_jax as sparseopt


def _head_masks(rng, d_model, head_sparsity, head_dim):
  """A ``(d_model, heads, head_dim)`` mask, head ``h`` with sparsity s_h."""
  heads = len(head_sparsity)
  mask = np.zeros((d_model, heads, head_dim), bool)
  for h, s in enumerate(head_sparsity):
    keep = round((1 - s) * d_model * head_dim)
    flat = np.zeros(d_model * head_dim, bool)
    flat[rng.choice(flat.size, keep, replace=False)] = True
    mask[:, h, :] = flat.reshape(d_model, head_dim)
  return mask


def _attention_tree(rng):
  d_model, head_dim = 8, 4
  sparsity = {"query": [0.5, 0.75, 0.25], "value": [0.5, 0.75, 0.25]}
  masks = {
      "block0": {
          "attn": {
              n: {"kernel": _head_masks(rng, d_model, s, head_dim)}
              for n, s in sparsity.items()
          },
          "mlp_up": {"kernel": rng.random((d_model, 16)) < 0.5},
      }
  }
  grads = jax.tree.map(
      lambda m: rng.standard_normal(m.shape).astype(np.float32), masks
  )
  return masks, grads


def _apply(spec, masks, grads):
  tx = sparseopt.scale_by_sparseopt(neuron_axis=spec)
  masks = jax.tree.map(jnp.asarray, masks)
  grads = jax.tree.map(lambda g, m: jnp.where(m, g, 0.0), grads, masks)
  out, _ = tx.update(grads, tx.init(grads), grads, masks=masks)
  return out, grads


def test_group_spec_gives_the_per_head_factor_under_qk_norm():
  rng = np.random.default_rng(0)
  masks, grads = _attention_tree(rng)
  out, grads = _apply(optimizers.group_axes("fmnist_vit_qk"), masks, grads)
  # NumPy reference: a head is the unit, its fan-in axes (0, 2).
  m = masks["block0"]["attn"]["query"]["kernel"]
  density = m.mean(axis=(0, 2))
  factor = np.sqrt(density) / np.sqrt(density.mean())
  np.testing.assert_allclose(
      out["block0"]["attn"]["query"]["kernel"],
      grads["block0"]["attn"]["query"]["kernel"] * factor[None, :, None],
      rtol=1e-6,
  )
  assert not np.allclose(factor, 1.0)
  # value and the MLP feed no normalizer in a pre-LN block: left alone.
  for path in (("attn", "value"), ("mlp_up",)):
    a, b = out["block0"], grads["block0"]
    for k in path:
      a, b = a[k], b[k]
    np.testing.assert_array_equal(a["kernel"], b["kernel"])


def test_neuron_spec_gives_the_papers_per_neuron_factor():
  rng = np.random.default_rng(1)
  masks, grads = _attention_tree(rng)
  out, grads = _apply(optimizers.neuron_axes, masks, grads)
  m = masks["block0"]["attn"]["value"]["kernel"]
  density = m.mean(axis=0)  # (heads, head_dim) neurons, fan-in d_model.
  factor = np.sqrt(density) / np.sqrt(density.mean())
  np.testing.assert_allclose(
      out["block0"]["attn"]["value"]["kernel"],
      grads["block0"]["attn"]["value"]["kernel"] * factor[None],
      rtol=1e-6,
  )


def test_layernorm_group_is_the_layer_so_no_factor():
  # One sigma per token over the whole layer: the normalized factor of a
  # single unit is exactly 1. An empty tuple is not "no neuron axes" (it
  # reads as an empty pytree spec and is refused at the first update), so
  # such a layer gets None from the spec: not corrected.
  rng = np.random.default_rng(2)
  masks, grads = _attention_tree(rng)
  with pytest.raises(ValueError, match="structure of the params"):
    _apply((), masks, grads)
  out, grads = _apply(optimizers.group_axes("fmnist_vit"), masks, grads)
  jax.tree.map(np.testing.assert_array_equal, out, grads)
  # BatchNorm models: per neuron, the head (no normalizer after it) not.
  spec = optimizers.group_axes("fmnist_mlp")
  assert spec((jax.tree_util.DictKey("hidden"),), np.zeros((3, 4))) == -1
  assert spec((jax.tree_util.DictKey("head"),), np.zeros((4, 2))) is None


def _vit_params():
  model = models.create_model("fmnist_vit_qk", num_classes=10)
  return jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))
  )["params"]


def test_erk_sees_attention_kernels_as_dense_matrices():
  params = _vit_params()
  config = sweep.make_config("fmnist_vit", {})
  densities = sparseopt.layer_densities(
      params,
      0.9,
      filter_fn=optimizers.sparse_filter(config),
      neuron_axis=optimizers.neuron_axes,
  )
  names = {n.split("/", 1)[1] for n in densities}
  assert names == {
      f"{x}/kernel"
      for x in ("attn/query", "attn/key", "attn/value", "attn/out")
  } | {"mlp_up/kernel", "mlp_down/kernel"}
  # query, key, value and out are all the (64, 64) matrices they compute.
  attn = {v for n, v in densities.items() if "/attn/" in n}
  assert len(attn) == 1
  assert densities["block0/mlp_up/kernel"] < attn.pop()


def _finished_masks(workdir, step):
  path = f"{workdir}/checkpoints/{step}/state"
  masks = ocp.PyTreeCheckpointer().restore(path)["opt_state"]["masks"]
  return {
      sparseopt.path_str(p): np.asarray(m, bool)
      for p, m in jax.tree_util.tree_leaves_with_path(masks)
      if m is not None and np.ndim(m) >= 1
  }


@pytest.mark.parametrize(
    "sweep_name, method",
    [("fmnist_vit_qk", "rigl"), ("fmnist_vit_qk_set", "set")],
)
def test_sweep_is_nine_valid_runs(sweep_name, method):
  runs = dict(sweep.expand(sweep.SWEEPS[sweep_name]))
  assert len(runs) == 9
  arms = {
      (o["optimizer"], o.get("correction_unit", "-")) for o in runs.values()
  }
  assert arms == {
      ("sgd", "-"),
      ("sparseopt", "neuron"),
      ("sparseopt", "group"),
  }
  for overrides in runs.values():
    config = sweep.make_config("fmnist_vit", overrides)
    fields.validate(config)
    assert config.model == "fmnist_vit_qk" and config.method == method


@pytest.mark.parametrize(
    "sweep_name, unit",
    [
        ("fmnist_vit_qk", "neuron"),
        ("fmnist_vit_qk", "group"),
        ("fmnist_vit_qk_set", "group"),
    ],
)
def test_vit_trains_with_rigl_and_set(tmp_path, sweep_name, unit):
  runs = dict(sweep.expand(sweep.SWEEPS[sweep_name]))
  name = f"optimizer-sparseopt__correction_unit-{unit}__seed-0"
  data = fake_data.write_fashion_mnist(str(tmp_path / "d"), 32, 16)
  config = sweep.make_config(
      "fmnist_vit",
      {
          **runs[name],
          "data_dir": data,
          "batch_size": 16,
          "eval_batch_size": 16,
          "num_train_steps": 4,
          "log_every": 2,
          "eval_every": 4,
          "checkpoint_every": 4,
          "update_every": 2,
          "end_fraction": 1.0,
          "progress_bar": False,
      },
  )
  summary = train.train_and_evaluate(config, str(tmp_path / "w"))
  assert np.isfinite(summary["final_test_accuracy"])
  masks = _finished_masks(str(tmp_path / "w"), 4)
  # Sparse: the Dense and attention kernels; dense: embeddings, head,
  # norms and biases.
  assert len(masks) == 4 * 6
  assert all(n.endswith("/kernel") for n in masks)
  assert not any(
      n.startswith(("patch_embed", "pos_embed", "head")) for n in masks
  )
  assert config.method == {"fmnist_vit_qk": "rigl"}.get(sweep_name, "set")
  # Exact: each layer keeps its ERK count through the mask updates.
  densities = sparseopt.layer_densities(
      _vit_params(),
      0.95,
      filter_fn=optimizers.sparse_filter(config),
      neuron_axis=optimizers.neuron_axes,
  )
  assert set(densities) == set(masks)
  for n, m in masks.items():
    assert m.sum() == round(densities[n] * m.size), n
  kept = sum(m.sum() for m in masks.values())
  total = sum(m.size for m in masks.values())
  assert 1 - kept / total == pytest.approx(0.95, abs=1e-3)


def test_vit_refuses_batchnorm_only_fields():
  config = sweep.make_config("fmnist_vit", {"correction": "batch_stats"})
  with pytest.raises(fields.ConfigError, match="needs BatchNorm"):
    fields.validate(config)
  config = sweep.make_config(
      "fmnist_vit", {"correction_unit": "group", "structure": "constant_fan_in"}
  )
  with pytest.raises(fields.ConfigError, match="correction_unit='group'"):
    fields.validate(config)
