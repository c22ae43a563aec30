"""Masks: creation, distributions, measurement and validation vs NumPy."""

import math

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparseopt_jax as sparseopt
import reference as ref

# Property tests draw random shapes; each new shape costs a few eager
# compilations, so keep the example count modest and the deadline off.
PROPERTY = hypothesis.settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=list(hypothesis.HealthCheck),
)


def make_params(key=0):
  """Dense (in, out), Conv (H, W, Cin, Cout), a 1x1 conv, biases and BN."""
  k = jax.random.split(jax.random.key(key), 3)
  return {
      "Conv_0": {
          "kernel": jax.random.normal(k[0], (3, 3, 2, 6)),
          "bias": jnp.zeros(6),
      },
      "Conv_1x1": {"kernel": jax.random.normal(k[1], (1, 1, 6, 8))},
      "BatchNorm_0": {"scale": jnp.ones(8), "bias": jnp.zeros(8)},
      "Dense_0": {
          "kernel": jax.random.normal(k[2], (8, 5)),
          "bias": jnp.zeros(5),
      },
  }


KERNELS = ("Conv_0/kernel", "Conv_1x1/kernel", "Dense_0/kernel")


def shapes_of(params):
  return {
      sparseopt.path_str(p): tuple(x.shape)
      for p, x in jax.tree_util.tree_leaves_with_path(params)
      if x.ndim >= 2
  }


def flat_masks(masks):
  return {
      sparseopt.path_str(p): m
      for p, m in jax.tree_util.tree_leaves_with_path(
          masks, is_leaf=lambda x: x is None
      )
  }


# ----------------------------------------------------------------- densities


@pytest.mark.parametrize("s", [0.0, 0.5, 0.9])
def test_uniform_densities(s):
  d = sparseopt.layer_densities(make_params(), s, "uniform")
  assert list(d) == sorted(KERNELS)  # tree order of dict keys; 1-D excluded
  for v in d.values():
    assert v == pytest.approx(1 - s, abs=1e-12)


@pytest.mark.parametrize("s", [0.0, 0.5, 0.8, 0.95, 0.99])
def test_erk_densities_match_reference(s):
  params = make_params()
  got = sparseopt.layer_densities(params, s, "erk")
  want = ref.erk_densities(shapes_of(params), s)
  assert got.keys() == want.keys()
  for n in want:
    assert got[n] == pytest.approx(want[n], rel=1e-9, abs=1e-12), n


def test_erk_makes_small_layers_dense_and_redistributes():
  # A tiny layer next to a big one: its raw ERK density is far above the big
  # one's, so at 80% sparsity it overflows, is made dense, and the big layer
  # takes the whole remaining budget.
  params = {"small": jnp.zeros((2, 3)), "big": jnp.zeros((64, 64))}
  got = sparseopt.layer_densities(params, 0.8, "erk")
  want = ref.erk_densities(shapes_of(params), 0.8)
  assert got["small"] == 1.0 and want["small"] == 1.0
  total = 6 + 64 * 64
  assert got["big"] == pytest.approx((0.2 * total - 6) / (64 * 64), rel=1e-12)
  assert got["big"] == pytest.approx(want["big"], rel=1e-12)


def test_erk_power_scale():
  params = make_params()
  got = sparseopt.layer_densities(params, 0.7, "erk", erk_power_scale=0.5)
  want = ref.erk_densities(shapes_of(params), 0.7, power=0.5)
  for n in want:
    assert got[n] == pytest.approx(want[n], rel=1e-9)


def test_erk_is_not_uniform():
  # Guard against an ERK that silently returns the uniform distribution.
  d = sparseopt.layer_densities(make_params(), 0.5, "erk")
  assert len({round(v, 6) for v in d.values()}) > 1


# --------------------------------------------------------------- init_masks


@pytest.mark.parametrize("distribution", ["erk", "uniform"])
@pytest.mark.parametrize("s", [0.0, 0.3, 0.9])
def test_init_masks_exact_counts(distribution, s):
  params = make_params()
  masks = sparseopt.init_masks(jax.random.key(1), params, s, distribution)
  dens = (
      ref.erk_densities(shapes_of(params), s)
      if distribution == "erk"
      else {n: 1 - s for n in KERNELS}
  )
  flat = flat_masks(masks)
  for name, m in flat.items():
    if name in KERNELS:
      assert m.dtype == jnp.bool_
      assert m.shape == shapes_of(params)[name]
      assert int(m.sum()) == ref.exact_count(dens[name], m.size), name
    else:
      assert m is None, name  # biases, BN scale/offset stay dense


def test_exact_count_rounds_half_up():
  # 0.5 * 5 = 2.5 entries: the documented rounding keeps 3 (half up), and
  # 0.5 * 6 = 3 exactly.
  params = {"a": jnp.zeros((5, 1)), "b": jnp.zeros((2, 3))}
  masks = sparseopt.init_masks(jax.random.key(0), params, 0.5, "uniform")
  assert int(masks["a"].sum()) == 3
  assert int(masks["b"].sum()) == 3


def test_init_masks_deterministic_and_key_dependent():
  params = make_params()
  a = sparseopt.init_masks(jax.random.key(3), params, 0.7)
  b = sparseopt.init_masks(jax.random.key(3), params, 0.7)
  c = sparseopt.init_masks(jax.random.key(4), params, 0.7)
  for n in KERNELS:
    np.testing.assert_array_equal(flat_masks(a)[n], flat_masks(b)[n])
  assert any(
      not np.array_equal(flat_masks(a)[n], flat_masks(c)[n]) for n in KERNELS
  )
  # Layers get different random draws (not the same pattern per shape).
  same = {"x": jnp.zeros((10, 10)), "y": jnp.zeros((10, 10))}
  m = sparseopt.init_masks(jax.random.key(0), same, 0.5, "uniform")
  assert not np.array_equal(m["x"], m["y"])


def test_init_masks_accepts_raw_uint32_key():
  params = make_params()
  m = sparseopt.init_masks(jax.random.PRNGKey(0), params, 0.5, "uniform")
  assert int(flat_masks(m)["Dense_0/kernel"].sum()) == 20


def test_init_masks_under_jit_shapes_are_static():
  # Masks are built from static shapes; building them inside jit must give
  # the same result as outside.
  params = make_params()
  f = jax.jit(lambda k, p: sparseopt.init_masks(k, p, 0.6, "erk"))
  a = f(jax.random.key(5), params)
  b = sparseopt.init_masks(jax.random.key(5), params, 0.6, "erk")
  for n in KERNELS:
    np.testing.assert_array_equal(flat_masks(a)[n], flat_masks(b)[n])


def test_exclude_paths_and_filter_pytree():
  params = make_params()
  f = sparseopt.exclude_paths("Dense")
  masks = sparseopt.init_masks(
      jax.random.key(0), params, 0.5, "uniform", filter_fn=f
  )
  assert masks["Dense_0"]["kernel"] is None
  assert masks["Conv_0"]["kernel"] is not None
  # Anchored regex: only the stem.
  g = sparseopt.exclude_paths("^Conv_0/")
  masks = sparseopt.init_masks(
      jax.random.key(0), params, 0.5, "uniform", filter_fn=g
  )
  assert masks["Conv_0"]["kernel"] is None
  assert masks["Conv_1x1"]["kernel"] is not None
  # A pytree of bools says the same thing; it may even make a 1-D leaf sparse.
  flags = jax.tree.map(lambda x: False, params)
  flags["Conv_0"]["bias"] = True
  masks = sparseopt.init_masks(
      jax.random.key(0), params, 0.5, "uniform", filter_fn=flags
  )
  assert int(masks["Conv_0"]["bias"].sum()) == 3
  assert masks["Conv_0"]["kernel"] is None


def test_exclude_paths_base_and_path_str():
  params = make_params()
  paths = [
      sparseopt.path_str(p)
      for p, _ in jax.tree_util.tree_leaves_with_path(params)
  ]
  assert "Conv_0/kernel" in paths and "BatchNorm_0/scale" in paths
  assert sparseopt.path_str(()) == "<root>"
  assert (
      sparseopt.path_str(
          jax.tree_util.tree_leaves_with_path([jnp.zeros(1), (jnp.zeros(1),)])[
              1
          ][0]
      )
      == "1/0"
  )
  f = sparseopt.exclude_paths("bias", base=lambda p, x: True)
  flags = {
      sparseopt.path_str(p): f(p, x)
      for p, x in jax.tree_util.tree_leaves_with_path(params)
  }
  assert flags["BatchNorm_0/scale"] and not flags["Conv_0/bias"]
  assert sparseopt.is_kernel((), jnp.zeros((2, 2)))
  assert not sparseopt.is_kernel((), jnp.zeros(2))


def test_overrides():
  params = make_params()
  d = sparseopt.layer_densities(
      params, 0.8, "erk", overrides={"Dense": 0.0, "^Conv_0": 0.5}
  )
  assert d["Dense_0/kernel"] == 1.0
  assert d["Conv_0/kernel"] == pytest.approx(0.5)
  # The remaining free layer takes the global target alone.
  assert d["Conv_1x1/kernel"] == pytest.approx(0.2)
  masks = sparseopt.init_masks(
      jax.random.key(0),
      params,
      0.8,
      "erk",
      overrides={"Dense": 0.0, "^Conv_0": 0.5},
  )
  assert bool(masks["Dense_0"]["kernel"].all())
  assert int(masks["Conv_0"]["kernel"].sum()) == 54
  # First matching regex wins.
  d = sparseopt.layer_densities(
      params, 0.5, "uniform", overrides={"Conv": 0.9, "Conv_0": 0.1}
  )
  assert d["Conv_0/kernel"] == pytest.approx(0.1)
  with pytest.raises(ValueError, match=r"overrides\['nothing'\] matches no"):
    sparseopt.layer_densities(params, 0.5, overrides={"nothing": 0.5})
  with pytest.raises(ValueError, match=r"overrides\['Dense'\].*\[0, 1\)"):
    sparseopt.layer_densities(params, 0.5, overrides={"Dense": 1.0})


def test_magnitude_masks_topk_with_index_ties():
  # Integer magnitudes with many ties: the kept set is the top-k of |w|
  # with ties going to the lower flat index.
  w = jnp.array(
      [[3.0, -1.0, 2.0], [-3.0, 1.0, 0.0], [2.0, 2.0, -1.0], [0.0, 1.0, 3.0]]
  )
  params = {"w": w, "b": jnp.ones(3)}
  masks = sparseopt.magnitude_masks(params, 0.5, "uniform")
  want = np.zeros(12, bool)
  want[ref.topk_flat(np.abs(np.asarray(w)), 6)] = True
  np.testing.assert_array_equal(masks["w"].reshape(-1), want)
  assert masks["b"] is None
  # Sanity of the reference itself on this example: |w| = 3,3,3 then 2,2,2.
  assert sorted(ref.topk_flat(np.abs(np.asarray(w)), 6).tolist()) == [
      0,
      2,
      3,
      6,
      7,
      11,
  ]


def test_magnitude_masks_conv_erk_counts():
  params = make_params()
  masks = sparseopt.magnitude_masks(params, 0.75, "erk")
  dens = ref.erk_densities(shapes_of(params), 0.75)
  for n, m in flat_masks(masks).items():
    if m is None:
      continue
    w = np.abs(np.asarray(flat_masks(params)[n]))
    k = ref.exact_count(dens[n], w.size)
    want = np.zeros(w.size, bool)
    want[ref.topk_flat(w, k)] = True
    np.testing.assert_array_equal(np.asarray(m).reshape(-1), want, err_msg=n)


# -------------------------------------------------------------- measurement


def random_mask(shape, density, seed):
  return np.random.default_rng(seed).random(shape) < density


@pytest.mark.parametrize("shape", [(6, 5), (3, 3, 2, 6), (1, 1, 6, 8)])
@pytest.mark.parametrize("axis", [-1, 0])
def test_neuron_sparsity_matches_reference(shape, axis):
  m = random_mask(shape, 0.4, 0)
  m[..., 0] = False  # one fully pruned neuron on the last axis
  got = sparseopt.neuron_sparsity(jnp.asarray(m), axis)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, ref.neuron_sparsity(m, axis), atol=1e-6)
  jitted = jax.jit(sparseopt.neuron_sparsity, static_argnums=1)
  np.testing.assert_allclose(
      jitted(jnp.asarray(m), axis), ref.neuron_sparsity(m, axis), atol=1e-6
  )


def test_full_neuron_sparsity_exact_under_jit():
  # A neuron with every input active has sparsity exactly 0, in and out of
  # jit (diagnostics report s_min; a negative sparsity is nonsense).
  m = jnp.ones((6, 8), bool).at[0, 0].set(False)
  np.testing.assert_array_equal(sparseopt.neuron_sparsity(m)[1:], 0.0)
  np.testing.assert_array_equal(jax.jit(sparseopt.neuron_sparsity)(m)[1:], 0.0)


def test_neuron_sparsity_hand_checked():
  m = jnp.array([[1, 1, 0], [1, 0, 0], [1, 0, 0], [1, 0, 0]], bool)
  np.testing.assert_allclose(sparseopt.neuron_sparsity(m), [0.0, 0.75, 1.0])
  np.testing.assert_allclose(
      sparseopt.neuron_sparsity(m, 0), [1 / 3, 2 / 3, 2 / 3, 2 / 3], rtol=1e-6
  )


def test_sparsity_and_layer_sparsity():
  m1 = random_mask((6, 5), 0.3, 1)
  m2 = random_mask((3, 3, 2, 6), 0.6, 2)
  masks = {"a": jnp.asarray(m1), "b": None, "c": {"k": jnp.asarray(m2)}}
  total = m1.size + m2.size
  want = 1 - (m1.sum() + m2.sum()) / total
  assert float(sparseopt.sparsity(masks)) == pytest.approx(want, abs=1e-6)
  assert float(jax.jit(sparseopt.sparsity)(masks)) == pytest.approx(
      want, abs=1e-6
  )
  ls = sparseopt.layer_sparsity(masks)
  assert set(ls) == {"a", "c/k"}
  assert float(ls["a"]) == pytest.approx(1 - m1.mean(), abs=1e-6)
  assert float(ls["c/k"]) == pytest.approx(1 - m2.mean(), abs=1e-6)
  assert float(sparseopt.sparsity({"a": None})) == 0.0


def test_apply_masks():
  params = make_params()
  masks = sparseopt.init_masks(jax.random.key(0), params, 0.5, "uniform")
  out = jax.jit(sparseopt.apply_masks)(params, masks)
  for (_p, x), y, m in zip(
      jax.tree_util.tree_leaves_with_path(params),
      jax.tree.leaves(out),
      jax.tree.leaves(masks, is_leaf=lambda v: v is None),
  ):
    if m is None:
      np.testing.assert_array_equal(x, y)
    else:
      np.testing.assert_array_equal(y, np.where(m, x, 0.0))
      assert y.dtype == x.dtype


# ------------------------------------------------------------------- errors


@pytest.mark.parametrize("bad", [1.0, -0.1, float("nan"), 1.5, float("inf")])
def test_bad_sparsity(bad):
  params = make_params()
  with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
    sparseopt.init_masks(jax.random.key(0), params, bad)
  with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
    sparseopt.magnitude_masks(params, bad)
  with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
    sparseopt.layer_densities(params, bad, "uniform")


def test_non_numeric_sparsity():
  with pytest.raises(TypeError, match="sparsity must be a number"):
    sparseopt.layer_densities(make_params(), "half")


def test_unknown_distribution():
  with pytest.raises(ValueError, match=r"Unknown distribution 'gaussian'"):
    sparseopt.init_masks(jax.random.key(0), make_params(), 0.5, "gaussian")


def good_masks():
  return sparseopt.init_masks(jax.random.key(0), make_params(), 0.5, "uniform")


def test_mask_tree_structure_mismatch_names_path():
  params = make_params()
  masks = good_masks()
  del masks["Dense_0"]
  with pytest.raises(ValueError, match=r"Dense_0/kernel"):
    sparseopt.validate_masks(params, masks)
  with pytest.raises(ValueError, match=r"tree structure"):
    sparseopt.apply_masks(params, masks)
  masks = good_masks()
  masks["Extra"] = {"kernel": None}
  with pytest.raises(ValueError, match=r"Extra/kernel.*params lack"):
    sparseopt.validate_masks(params, masks)


def test_mask_shape_mismatch_names_path():
  masks = good_masks()
  masks["Conv_1x1"]["kernel"] = jnp.ones((1, 1, 8, 6), bool)
  with pytest.raises(
      ValueError, match=r"Conv_1x1/kernel.*\(1, 1, 8, 6\).*\(1, 1, 6, 8\)"
  ):
    sparseopt.apply_masks(make_params(), masks)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.int32, jnp.uint8])
def test_non_boolean_mask_names_path(dtype):
  masks = good_masks()
  masks["Dense_0"]["kernel"] = masks["Dense_0"]["kernel"].astype(dtype)
  with pytest.raises(TypeError, match=r"Dense_0/kernel.*boolean"):
    sparseopt.validate_masks(make_params(), masks)


def test_validate_masks_works_on_tracers():
  # Only static properties are checked, so validation runs inside jit.
  @jax.jit
  def f(p, m):
    sparseopt.validate_masks(p, m)
    return sparseopt.apply_masks(p, m)

  f(make_params(), good_masks())


def test_neuron_axis_out_of_range():
  m = jnp.ones((4, 3), bool)
  with pytest.raises(
      ValueError, match=r"neuron_axis=2 is out of range.*ndim=2"
  ):
    sparseopt.neuron_sparsity(m, 2)
  with pytest.raises(ValueError, match=r"neuron_axis=-3 is out of range"):
    sparseopt.neuron_sparsity(m, -3)
  with pytest.raises(TypeError, match=r"neuron_axis must be an int"):
    sparseopt.neuron_sparsity(m, 1.0)


def test_filter_pytree_with_wrong_structure():
  with pytest.raises(ValueError, match=r"filter_fn.*structure"):
    sparseopt.init_masks(
        jax.random.key(0), make_params(), 0.5, filter_fn={"Dense_0": True}
    )
  flags = jax.tree.map(lambda _: False, make_params())
  flags["Dense_0"]["kernel"] = 1  # not a bool
  with pytest.raises(TypeError, match=r"Dense_0/kernel.*bool"):
    sparseopt.init_masks(jax.random.key(0), make_params(), 0.5, filter_fn=flags)


# -------------------------------------------------------- property tests

# Mask building compiles a few eager ops per new shape, so masks are drawn
# from a fixed pool of shapes (compiled once); densities alone are pure
# Python and get fully random shapes.
SHAPE_POOL = [
    (4, 3),
    (6, 5),
    (1, 7),
    (8, 2),
    (3, 3, 2, 4),
    (1, 1, 5, 6),
    (3, 1, 2, 3),
]
dims = st.integers(1, 9)
random_shape = st.one_of(
    st.tuples(dims, dims),
    st.tuples(st.sampled_from([1, 3, 5]), st.sampled_from([1, 3]), dims, dims),
)


def layered(shapes):
  # NumPy leaves: only shapes are read, and eager jnp.zeros would compile a
  # broadcast for every new shape.
  params = {
      f"l{i}": {
          "kernel": np.zeros(shape, np.float32),
          "bias": np.zeros(shape[-1], np.float32),
      }
      for i, shape in enumerate(shapes)
  }
  return params, [f"l{i}/kernel" for i in range(len(shapes))]


@hypothesis.settings(max_examples=100, deadline=None)
@hypothesis.given(
    shapes=st.lists(random_shape, min_size=1, max_size=6),
    s=st.floats(0.0, 0.99),
    power=st.sampled_from([1.0, 0.5]),
)
def test_property_erk_densities(shapes, s, power):
  params, names = layered(shapes)
  dens = sparseopt.layer_densities(params, s, "erk", erk_power_scale=power)
  want = ref.erk_densities(dict(zip(names, shapes)), s, power)
  sizes = [math.prod(x) for x in shapes]
  for n in names:
    assert 0.0 <= dens[n] <= 1.0 + 1e-12
    assert dens[n] == pytest.approx(want[n], rel=1e-9, abs=1e-12)
  # The budget is met exactly before rounding to whole entries.
  kept = sum(dens[n] * z for n, z in zip(names, sizes))
  assert kept == pytest.approx((1 - s) * sum(sizes), rel=1e-9)


@PROPERTY
@hypothesis.given(
    shapes=st.lists(st.sampled_from(SHAPE_POOL), min_size=1, max_size=4),
    s=st.floats(0.0, 0.97),
    distribution=st.sampled_from(["erk", "uniform"]),
    seed=st.integers(0, 2**16),
)
def test_property_mask_invariants(shapes, s, distribution, seed):
  params, names = layered(shapes)
  dens = sparseopt.layer_densities(params, s, distribution)
  want = (
      ref.erk_densities(dict(zip(names, shapes)), s)
      if distribution == "erk"
      else {n: 1 - s for n in names}
  )
  key = jax.random.key(seed)
  masks = sparseopt.init_masks(key, params, s, distribution)
  again = sparseopt.init_masks(key, params, s, distribution)
  flat, flat2 = flat_masks(masks), flat_masks(again)
  active = 0
  total = 0
  for n, shape in zip(names, shapes):
    assert 0.0 <= dens[n] <= 1.0 + 1e-12
    assert dens[n] == pytest.approx(want[n], rel=1e-9, abs=1e-12)
    size = math.prod(shape)
    count = int(flat[n].sum())
    assert count == ref.exact_count(dens[n], size)
    np.testing.assert_array_equal(flat[n], flat2[n])  # deterministic
    active += count
    total += size
  # Every layer rounds by at most half an entry, so the overall sparsity
  # misses the target by at most that much per layer.
  assert abs(active - (1 - s) * total) <= 0.5 * len(shapes) + 1e-6
  assert float(sparseopt.sparsity(masks)) == pytest.approx(
      1 - active / total, abs=1e-6
  )
  mags = sparseopt.magnitude_masks(params, s, distribution)
  for n in names:
    assert int(flat_masks(mags)[n].sum()) == int(flat[n].sum())
