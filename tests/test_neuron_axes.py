"""Neurons spanning several axes (attention / DenseGeneral) and per-leaf specs.

One small model mixes a conv, a dense layer and an attention block whose
query, key and value kernels are ``(d_model, heads, head_dim)`` (neurons:
axes ``(1, 2)``) and whose output kernel is ``(heads, head_dim, d_model)``
(neuron: axis ``-1``, fan-in ``heads * head_dim``). Every function with a
neuron axis is checked against the NumPy references in ``reference.py``,
under ``jax.jit``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparseopt_jax as sparseopt
from sparseopt_jax import diagnostics
from sparseopt_jax._src import structure as structure_lib
import reference as ref

D, H, K = 8, 2, 3
ATTN = ("query", "key", "value")


def make_params(key=0):
  shapes = {
      "conv": {"kernel": (3, 3, 2, 4), "bias": (4,)},
      "dense": {"kernel": (12, 6), "bias": (6,)},
      "attn": {n: {"kernel": (D, H, K)} for n in ATTN}
      | {"out": {"kernel": (H, K, D), "bias": (D,)}},
  }
  leaves, treedef = jax.tree.flatten(
      shapes, is_leaf=lambda x: isinstance(x, tuple)
  )
  keys = jax.random.split(jax.random.key(key), len(leaves))
  return jax.tree.unflatten(
      treedef, [jax.random.normal(k, s) for k, s in zip(keys, leaves)]
  )


# The per-leaf spec, as a pytree and as a callable.
SPEC = {
    "conv": {"kernel": -1, "bias": None},
    "dense": {"kernel": -1, "bias": None},
    "attn": {n: {"kernel": (1, 2)} for n in ATTN}
    | {"out": {"kernel": -1, "bias": None}},
}


def spec_fn(path, leaf):
  name = sparseopt.path_str(path)
  if np.ndim(leaf) < 2:
    return None
  if name.startswith("attn/") and not name.startswith("attn/out"):
    return (1, 2)
  return -1


def axes_of(name):
  return (1, 2) if name.startswith("attn/") and "out" not in name else -1


def flat(tree):
  return {
      sparseopt.path_str(p): x
      for p, x in jax.tree_util.tree_leaves_with_path(
          tree, is_leaf=lambda x: x is None
      )
  }


def random_masks(params, seed=1, density=0.5):
  rng = np.random.default_rng(seed)

  def make(p):
    if p.ndim < 2:
      return None
    m = rng.random(p.shape) < density
    m.flat[0] = True
    return jnp.asarray(m)

  return jax.tree.map(make, params)


# ------------------------------------------------------------- resolution


def test_spec_forms_resolve_alike():
  params = make_params()
  a = sparseopt.diagnostics.sparseopt_scales(
      random_masks(params), neuron_axis=SPEC
  )
  b = sparseopt.diagnostics.sparseopt_scales(
      random_masks(params), neuron_axis=spec_fn
  )
  for (na, x), (nb, y) in zip(flat(a).items(), flat(b).items()):
    assert na == nb
    if x is None:
      assert y is None
    else:
      np.testing.assert_array_equal(x, y)
  assert flat(a)["attn/query/kernel"].shape == (H, K)
  assert flat(a)["attn/out/kernel"].shape == (D,)
  assert flat(a)["conv/kernel"].shape == (4,)


def test_int_equals_one_axis_tuple_and_axis_order_is_free():
  m = jnp.asarray(np.random.default_rng(0).random((D, H, K)) < 0.4)
  f = diagnostics.fan_in_scale
  np.testing.assert_array_equal(f(m, -1), f(m, (-1,)))
  for axes in [(1, 2), (2, 1), (-2, -1), (-1, 1)]:
    np.testing.assert_array_equal(f(m, axes), f(m, (1, 2)))


# ------------------------------------------------------ scale_by_sparseopt


@pytest.mark.parametrize("spec", [SPEC, spec_fn], ids=["pytree", "callable"])
@pytest.mark.parametrize("cached", [False, True])
def test_fan_in_correction_vs_reference(spec, cached):
  params = make_params()
  masks = random_masks(params)
  grads = make_params(7)
  tx = sparseopt.scale_by_sparseopt(neuron_axis=spec)
  state = tx.init(params)
  kw = {"masks_updated": jnp.asarray(True)} if cached else {}
  step = jax.jit(lambda g, s: tx.update(g, s, params, masks=masks, **kw))
  out, state = step(grads, state)
  if cached:  # The cache holds neuron-shaped factors; reused as they are.
    kw["masks_updated"] = jnp.asarray(False)
    step2 = jax.jit(lambda g, s: tx.update(g, s, params, masks=masks, **kw))
    again, _ = step2(grads, state)
    for x, y in zip(jax.tree.leaves(out), jax.tree.leaves(again)):
      np.testing.assert_array_equal(x, y)
  fm, fg = flat(masks), flat(grads)
  for name, u in flat(out).items():
    if fm[name] is None:
      np.testing.assert_array_equal(u, fg[name])
      continue
    axes = axes_of(name)
    c = ref.multi_factor(np.asarray(fm[name]), axes)
    want = ref.multi_scale_grad(np.asarray(fg[name]), c, axes)
    np.testing.assert_allclose(u, want, rtol=1e-5, atol=1e-6, err_msg=name)


def test_none_leaf_in_spec_is_not_corrected():
  params = make_params()
  masks = random_masks(params)
  spec = jax.tree.map(lambda x: x, SPEC)
  spec["attn"]["value"]["kernel"] = None
  grads = make_params(3)
  out, _ = sparseopt.scale_by_sparseopt(neuron_axis=spec).update(
      grads, None, params, masks=masks
  )
  np.testing.assert_array_equal(
      out["attn"]["value"]["kernel"], grads["attn"]["value"]["kernel"]
  )
  assert not np.allclose(
      out["attn"]["key"]["kernel"], grads["attn"]["key"]["kernel"]
  )


def test_norm_correction_vs_reference():
  params = make_params()
  masks = random_masks(params, seed=4)
  grads = make_params(5)
  tx = sparseopt.scale_by_sparseopt(neuron_axis=SPEC, correction="norm")
  out, _ = jax.jit(
      lambda g: tx.update(g, tx.init(params), params, masks=masks)
  )(grads)
  fm, fp, fg = flat(masks), flat(params), flat(grads)
  for name, u in flat(out).items():
    if fm[name] is None:
      continue
    axes = axes_of(name)
    c = ref.multi_norm_factor(np.asarray(fm[name]), np.asarray(fp[name]), axes)
    want = ref.multi_scale_grad(np.asarray(fg[name]), c, axes)
    np.testing.assert_allclose(u, want, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("flat_attn", [False, True])
def test_batch_stats_correction_with_neuron_shaped_variances(flat_attn):
  params = make_params()
  masks = random_masks(params, seed=6)
  masks["attn"]["key"]["kernel"] = (
      masks["attn"]["key"]["kernel"].at[:, 1, 2].set(False)  # a dead neuron
  )
  grads = make_params(8)
  rng = np.random.default_rng(2)

  def var(name, p):
    if p.ndim < 2:
      return None
    shape = (H, K) if axes_of(name) == (1, 2) else (p.shape[-1],)
    v = rng.random(shape) + 0.1
    return v.reshape(-1) if flat_attn else v

  stats = jax.tree_util.tree_map_with_path(
      lambda path, p: var(sparseopt.path_str(path), p), params
  )
  tx = sparseopt.scale_by_sparseopt(neuron_axis=SPEC, correction="batch_stats")
  out, _ = jax.jit(
      lambda g, b: tx.update(g, tx.init(params), masks=masks, batch_stats=b)
  )(grads, stats)
  fm, fg, fs = flat(masks), flat(grads), flat(stats)
  for name, u in flat(out).items():
    if fm[name] is None:
      continue
    axes = axes_of(name)
    v = np.asarray(fs[name])
    if axes == (1, 2):
      v = v.reshape(H, K)
    c = ref.multi_batch_stats_factor(np.asarray(fm[name]), v, axes)
    want = ref.multi_scale_grad(np.asarray(fg[name]), c, axes)
    np.testing.assert_allclose(u, want, rtol=1e-5, atol=1e-6, err_msg=name)
  assert np.all(np.asarray(out["attn"]["key"]["kernel"])[:, 1, 2] == 0)


def test_bad_variance_shape_names_the_leaf():
  m = jnp.ones((D, H, K), bool)
  with pytest.raises(ValueError, match=r"attn/q.*expected \(2, 3\)"):
    diagnostics.batch_stats_scale(m, jnp.ones(5), (1, 2), name="attn/q")


# ------------------------------------------------------------------ masks


def test_erk_densities_of_an_attention_tree():
  """ERK: an int axis keeps Evci et al.'s sum(shape)/prod(shape); a tuple
  declares a DenseGeneral, whose raw density is that of its 2-D
  (fan_in, fan_out) matrix."""
  params = make_params()
  spec = jax.tree.map(lambda x: x, SPEC)
  spec["attn"]["out"]["kernel"] = (-1,)  # DenseGeneral (heads*head_dim, D)
  got = sparseopt.layer_densities(params, 0.7, neuron_axis=spec)
  shapes = {n: tuple(x.shape) for n, x in flat(params).items() if x.ndim >= 2}
  sizes = {n: int(np.prod(s)) for n, s in shapes.items()}
  raw = {
      n: ref.dense_general_erk_raw(
          s, (1, 2) if n != "attn/out/kernel" else (2,)
      )
      if n.startswith("attn/")
      else sum(s) / np.prod(s)
      for n, s in shapes.items()
  }
  want = ref.erk_from_raw(sizes, raw, 0.7)
  assert list(got) == list(want)
  for n in want:
    np.testing.assert_allclose(got[n], want[n], rtol=1e-12, err_msg=n)
  # q, k, v and out are all a (8, 6) / (6, 8) Dense: one density.
  attn = {got[f"attn/{n}/kernel"] for n in ATTN + ("out",)}
  assert max(attn) - min(attn) < 1e-12
  # The conv keeps the per-dimension formula; the default is unchanged.
  np.testing.assert_allclose(
      sparseopt.layer_densities(params, 0.7)["conv/kernel"],
      ref.erk_densities(shapes, 0.7)["conv/kernel"],
      rtol=1e-12,
  )
  assert sparseopt.layer_densities(params, 0.7) == sparseopt.layer_densities(
      params, 0.7, neuron_axis=-1
  )
  # A tuple on a conv would make it a DenseGeneral too: different density.
  by_tuple = sparseopt.layer_densities(params, 0.7, neuron_axis=(-1,))
  assert (
      by_tuple["conv/kernel"]
      != sparseopt.layer_densities(params, 0.7)["conv/kernel"]
  )
  assert by_tuple["dense/kernel"] > 0


@pytest.mark.parametrize("spec", [SPEC, spec_fn], ids=["pytree", "callable"])
def test_constant_fan_in_masks_over_multi_axis_neurons(spec):
  params = make_params()
  masks = jax.jit(
      lambda k: sparseopt.init_masks(
          k, params, 0.6, structure="constant_fan_in", neuron_axis=spec
      )
  )(jax.random.key(0))
  dens = sparseopt.layer_densities(params, 0.6, neuron_axis=spec)
  for name, m in flat(masks).items():
    if m is None:
      continue
    counts, fan_in = ref.multi_neuron_counts(np.asarray(m), axes_of(name))
    k = max(1, ref.exact_count(dens[name], fan_in))
    assert np.all(counts == k), name
    np.testing.assert_array_equal(
        diagnostics.fan_in_scale(m, axes_of(name)), np.ones(counts.shape)
    )


def test_nm_masks_over_multi_axis_neurons():
  params = {"q": jnp.ones((D, H, K))}
  m = sparseopt.init_masks(
      jax.random.key(1), params, 0.5, structure=(2, 4), neuron_axis=(1, 2)
  )["q"]
  # Each neuron (h, j) keeps 2 of every 4 consecutive d_model inputs.
  assert np.all(np.asarray(m).reshape(2, 4, H, K).sum(axis=1) == 2)


def test_group_views_round_trip():
  x = jnp.arange(D * H * K).reshape(D, H, K)
  rows = structure_lib.to_groups(x, "constant_fan_in", (1, 2))
  assert rows.shape == (H * K, D)
  np.testing.assert_array_equal(rows[1 * K + 2], x[:, 1, 2])  # C order
  back = structure_lib.from_groups(rows, x.shape, "constant_fan_in", (1, 2))
  np.testing.assert_array_equal(back, x)
  o = jnp.arange(H * K * D).reshape(H, K, D)
  rows = structure_lib.to_groups(o, (1, 3), -1)
  np.testing.assert_array_equal(
      structure_lib.from_groups(rows, o.shape, (1, 3), -1), o
  )


def test_magnitude_masks_constant_fan_in_keep_each_neurons_largest():
  params = {"q": make_params()["attn"]["query"]["kernel"]}
  m = sparseopt.magnitude_masks(
      params, 0.5, "uniform", structure="constant_fan_in", neuron_axis=(1, 2)
  )["q"]
  w = np.abs(np.asarray(params["q"]))
  for h in range(H):
    for j in range(K):
      want = np.argsort(-w[:, h, j], kind="stable")[:4]
      assert set(np.flatnonzero(np.asarray(m)[:, h, j])) == set(want)


def test_sparse_init_draws_per_multi_axis_neuron():
  params = make_params()
  masks = random_masks(params, seed=9)
  key = jax.random.key(3)
  out = jax.jit(
      lambda p: sparseopt.sparse_init(key, p, masks, neuron_axis=spec_fn)
  )(params)
  fm = flat(masks)
  sparse = [n for n, m in fm.items() if m is not None]
  for i, name in enumerate(sparse):
    m = np.asarray(fm[name])
    axes = axes_of(name)
    counts, _ = ref.multi_neuron_counts(m, axes)
    z = np.asarray(jax.random.normal(jax.random.fold_in(key, i), m.shape))
    std = np.sqrt(2.0 / np.maximum(counts, 1))
    want = np.where(m, ref.multi_scale_grad(z, std, axes), 0.0)
    np.testing.assert_allclose(flat(out)[name], want, rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------- dst / GMP


def test_rigl_grow_with_corrected_multi_axis_vs_reference():
  rng = np.random.default_rng(11)
  mask = rng.random((D, H, K)) < 0.5
  mask[:, 0, 0] = False
  mask[:2, 0, 0] = True  # a sparse neuron
  w = rng.normal(size=(D, H, K))
  g = rng.normal(size=(D, H, K))
  tx = sparseopt.dynamic_sparse(
      optax.sgd(0.0),
      {"q": jnp.asarray(mask)},
      update_every=1,
      end_step=100,
      drop_schedule="constant",
      drop_fraction=0.3,
      grow_with="corrected",
      neuron_axis=(1, 2),
      key=jax.random.key(0),
  )
  step = jax.jit(tx.update)
  params, grads = {"q": jnp.asarray(w)}, {"q": jnp.asarray(g)}
  state = tx.init(params)
  for _ in range(2):
    _, state = step(grads, state, params)
  c = ref.multi_factor(mask, (1, 2))
  score = np.abs(ref.multi_scale_grad(g, c, (1, 2)))
  want, k = ref.drop_grow(mask, w, score, 0.3)
  np.testing.assert_array_equal(sparseopt.get_masks(state)["q"], want)
  assert int(state.num_changed["q"]) == k
  raw, _ = ref.drop_grow(mask, w, np.abs(g), 0.3)
  assert not np.array_equal(raw, want)  # the correction mattered


def test_rigl_constant_fan_in_over_multi_axis_neurons():
  params = {"q": make_params()["attn"]["query"]["kernel"]}
  masks = sparseopt.init_masks(
      jax.random.key(2),
      params,
      0.5,
      "uniform",
      structure="constant_fan_in",
      neuron_axis=(1, 2),
  )
  g = make_params(4)["attn"]["key"]["kernel"]
  tx = sparseopt.dynamic_sparse(
      optax.sgd(0.0),
      masks,
      update_every=1,
      end_step=100,
      drop_schedule="constant",
      drop_fraction=0.5,
      structure="constant_fan_in",
      neuron_axis=(1, 2),
      key=jax.random.key(0),
  )
  step = jax.jit(tx.update)
  state = tx.init(params)
  for _ in range(2):
    _, state = step({"q": g}, state, params)
  want = ref.multi_drop_grow_per_neuron(
      np.asarray(masks["q"]), params["q"], np.abs(np.asarray(g)), 0.5, (1, 2)
  )
  np.testing.assert_array_equal(sparseopt.get_masks(state)["q"], want)
  counts, _ = ref.multi_neuron_counts(want, (1, 2))
  assert np.all(counts == 4)


def test_gradual_pruning_constant_fan_in_per_leaf_spec():
  params = make_params()
  tx = sparseopt.gradual_pruning(
      optax.sgd(0.0),
      0.5,
      start_step=0,
      end_step=2,
      update_every=1,
      distribution="uniform",
      structure="constant_fan_in",
      neuron_axis=SPEC,
  )
  step = jax.jit(tx.update)
  state = tx.init(params)
  grads = jax.tree.map(jnp.zeros_like, params)
  for _ in range(3):
    updates, state = step(grads, state, params)
    params = optax.apply_updates(params, updates)
  for name, m in flat(sparseopt.get_masks(state)).items():
    if m is None:
      continue
    counts, fan_in = ref.multi_neuron_counts(np.asarray(m), axes_of(name))
    assert np.all(counts == ref.exact_count(0.5, fan_in)), name


# ------------------------------------------------------------ diagnostics


def test_diagnostics_with_a_per_leaf_spec():
  params = make_params()
  masks = random_masks(params, seed=12, density=0.4)
  out = jax.jit(lambda m: diagnostics.skew_diagnostics(m, neuron_axis=SPEC))(
      masks
  )
  hist = jax.jit(lambda m: diagnostics.fan_in_histogram(m, neuron_axis=SPEC))(
      masks
  )
  for name, m in flat(masks).items():
    if m is None:
      continue
    counts, fan_in = ref.multi_neuron_counts(np.asarray(m), axes_of(name))
    s = 1.0 - counts / fan_in
    np.testing.assert_allclose(out[f"{name}/s_mean"], s.mean(), rtol=1e-6)
    np.testing.assert_allclose(out[f"{name}/s_max"], s.max(), rtol=1e-6)
    np.testing.assert_allclose(out[f"{name}/s_std"], s.std(), rtol=1e-5)
    assert float(out[f"{name}/dead"]) == float((counts == 0).sum())
    total = sum(float(v) for k, v in hist.items() if k.startswith(name + "/"))
    assert total == counts.size
  after = jax.tree.map(lambda p: 1.1 * p + 0.01, params)
  turn = jax.jit(
      lambda a, b: diagnostics.turning_diagnostics(
          a, b, masks, neuron_axis=SPEC
      )
  )(params, after)
  masks2 = random_masks(params, seed=13, density=0.4)
  jump = jax.jit(
      lambda: diagnostics.mask_update_jump(
          params, after, masks, masks2, neuron_axis=spec_fn
      )
  )()
  assert "attn/query/kernel/angle_mean" in turn
  assert "attn/out/kernel/factor_jump" in jump
  for v in list(turn.values()) + list(jump.values()):
    assert np.isfinite(float(v))
  angle, _, _ = diagnostics.neuron_turning(
      params["attn"]["query"]["kernel"],
      after["attn"]["query"]["kernel"],
      masks["attn"]["query"]["kernel"],
      (1, 2),
  )
  assert angle.shape == (H, K)


# ----------------------------------------------------------------- errors


def test_errors_name_the_leaf():
  params = make_params()
  masks = random_masks(params)
  bad = jax.tree.map(lambda x: x, SPEC)
  bad["attn"]["key"]["kernel"] = (1, 3)
  with pytest.raises(ValueError, match=r"out of range.*attn/key/kernel"):
    sparseopt.scale_by_sparseopt(neuron_axis=bad).update(
        params, None, params, masks=masks
    )
  bad["attn"]["key"]["kernel"] = (1, -2)
  with pytest.raises(ValueError, match=r"attn/key/kernel.*twice"):
    sparseopt.init_masks(
        jax.random.key(0),
        params,
        0.5,
        structure="constant_fan_in",
        neuron_axis=bad,
    )
  with pytest.raises(ValueError, match=r"attn/key/kernel.*twice"):
    sparseopt.layer_densities(params, 0.5, neuron_axis=bad)
  with pytest.raises(TypeError, match=r"neuron_axis must be an int"):
    sparseopt.scale_by_sparseopt(neuron_axis=(1, "a"))
  with pytest.raises(TypeError, match=r"neuron_axis must be an int"):
    sparseopt.dynamic_sparse(
        optax.sgd(0.1),
        masks,
        end_step=1,
        key=jax.random.key(0),
        neuron_axis=[1.5],
    )
  with pytest.raises(ValueError, match=r"structure of the params"):
    sparseopt.scale_by_sparseopt(neuron_axis={"conv": -1}).update(
        params, None, params, masks=masks
    )
  with pytest.raises(TypeError, match=r"callable returned .last. for .attn/"):
    sparseopt.scale_by_sparseopt(neuron_axis=lambda p, x: "last").update(
        params, None, params, masks=masks
    )
  none_spec = jax.tree.map(lambda x: x, SPEC)
  none_spec["dense"]["kernel"] = None
  with pytest.raises(ValueError, match=r"'dense/kernel' has no neuron axis"):
    sparseopt.init_masks(
        jax.random.key(0),
        params,
        0.5,
        structure="constant_fan_in",
        neuron_axis=none_spec,
    )
