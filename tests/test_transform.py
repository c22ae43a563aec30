"""scale_by_sparseopt, zero_masked_updates and the sparseopt alias vs NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparseopt_jax as sparseopt
from sparseopt_jax import diagnostics
import reference as ref


def flat(tree):
  return {
      sparseopt.path_str(p): x
      for p, x in jax.tree_util.tree_leaves_with_path(
          tree, is_leaf=lambda v: v is None
      )
  }


def setup(seed=0, dtype=jnp.float32):
  """Params, grads and hand-shaped masks: Dense, Conv, 1x1 Conv, BN/bias.

  Conv_0 has neuron 0 fully pruned; Conv_1x1 is fully dense (identity);
  Dense_0 has a random mask with uneven neurons.
  """
  rng = np.random.default_rng(seed)
  shapes = {"Conv_0": (3, 3, 2, 4), "Conv_1x1": (1, 1, 4, 6), "Dense_0": (6, 5)}
  params, grads, masks = {}, {}, {}
  for name, shape in shapes.items():
    m = rng.random(shape) < 0.45
    if name == "Conv_0":
      m[..., 0] = False
      m[0, 0, 0, 1:] = True  # every other neuron keeps at least one weight
    if name == "Conv_1x1":
      m[...] = True
    w = rng.normal(size=shape) * m
    params[name] = {
        "kernel": jnp.asarray(w, dtype),
        "bias": jnp.asarray(rng.normal(size=shape[-1]), dtype),
    }
    grads[name] = {
        "kernel": jnp.asarray(rng.normal(size=shape), dtype),
        "bias": jnp.asarray(rng.normal(size=shape[-1]), dtype),
    }
    masks[name] = {"kernel": jnp.asarray(m), "bias": None}
  params["BatchNorm_0"] = {"scale": jnp.ones(5, dtype)}
  grads["BatchNorm_0"] = {"scale": jnp.asarray(rng.normal(size=5), dtype)}
  masks["BatchNorm_0"] = {"scale": None}
  return params, grads, masks


def expected_fan_in(grads, masks, neuron_axis=-1, skip=()):
  out = {}
  for name, g in flat(grads).items():
    m = flat(masks)[name]
    if m is None or name in skip:
      out[name] = np.asarray(g, np.float64)
    else:
      out[name] = ref.scale_grad(
          g, ref.sparseopt_factor(np.asarray(m), neuron_axis), neuron_axis
      )
  return out


def assert_tree_close(got, want, rtol=1e-6, atol=1e-7):
  got = flat(got)
  assert got.keys() == want.keys()
  for n in want:
    np.testing.assert_allclose(
        np.asarray(got[n], np.float64), want[n], rtol=rtol, atol=atol, err_msg=n
    )


def run(tx, grads, params, **kw):
  state = tx.init(params)
  return jax.jit(lambda g, s, p, kw: tx.update(g, s, p, **kw))(
      grads, state, params, kw
  )[0]


# ------------------------------------------------------------- the factor


def test_scale_by_sparseopt_matches_reference_under_jit():
  params, grads, masks = setup()
  out = run(sparseopt.scale_by_sparseopt(), grads, params, masks=masks)
  assert_tree_close(out, expected_fan_in(grads, masks))
  # The factor is not trivial on this example.
  f = ref.sparseopt_factor(np.asarray(masks["Dense_0"]["kernel"]))
  assert f.std() > 0.05


def test_hand_checked_factor():
  # Neuron sparsities 0, 3/4, 1: s_avg = 7/12, c = sqrt(1-s)/sqrt(5/12).
  m = jnp.array([[1, 1, 0], [1, 0, 0], [1, 0, 0], [1, 0, 0]], bool)
  want = np.array([1.0, 0.5, 0.0]) / np.sqrt(5 / 12)
  np.testing.assert_allclose(diagnostics.fan_in_scale(m), want, rtol=1e-6)
  g = jnp.ones((4, 3))
  out, _ = sparseopt.scale_by_sparseopt().update(
      {"w": g}, None, None, masks={"w": m}
  )
  np.testing.assert_allclose(out["w"], np.broadcast_to(want, (4, 3)), rtol=1e-6)


def test_constant_fan_in_masks_are_an_exact_no_op():
  # THEORY.md prediction 7: when every neuron of a layer keeps the same
  # number of inputs, s_i = s_avg and every factor is exactly 1, however
  # sparse the layer.
  rng = np.random.default_rng(4)
  m = np.stack(
      [
          np.isin(np.arange(72), rng.choice(72, 5, replace=False)).reshape(
              3, 3, 8
          )
          for _ in range(6)
      ],
      axis=-1,
  )
  assert (m.reshape(-1, 6).sum(0) == 5).all()
  g = jnp.asarray(rng.standard_normal(m.shape), jnp.float32)
  out, _ = jax.jit(sparseopt.scale_by_sparseopt().update)(
      {"k": g}, None, None, masks={"k": jnp.asarray(m)}
  )
  np.testing.assert_array_equal(out["k"], g)


def _other_masks(masks):
  """Every sparse leaf fully dense: factors of exactly 1."""
  return jax.tree.map(
      lambda m: None if m is None else jnp.ones_like(m),
      masks,
      is_leaf=lambda m: m is None,
  )


def test_cached_factors_follow_masks_updated():
  params, grads, masks = setup()
  tx = sparseopt.scale_by_sparseopt()
  state = tx.init(params)
  assert isinstance(state, sparseopt.ScaleBySparseOptState)
  assert not bool(state.valid)
  step = jax.jit(lambda g, s, p, kw: tx.update(g, s, p, **kw))
  # An empty cache is filled whatever the flag says.
  out, state = step(
      grads, state, params, {"masks": masks, "masks_updated": False}
  )
  assert_tree_close(out, expected_fan_in(grads, masks))
  assert bool(state.valid)
  # masks_updated=False: the cache is used, not the masks (a caller's promise
  # that they did not change; breaking it shows the cache is really read).
  dense = _other_masks(masks)
  out, kept = step(
      grads, state, params, {"masks": dense, "masks_updated": False}
  )
  assert_tree_close(out, expected_fan_in(grads, masks))
  # masks_updated=True recomputes, as does leaving the keyword out.
  for kw in (
      {"masks": dense, "masks_updated": jnp.bool_(True)},
      {"masks": dense},
  ):
    out, fresh = step(grads, kept, params, kw)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(grads)):
      np.testing.assert_array_equal(a, b)
    out, _ = step(
        grads, fresh, params, {"masks": dense, "masks_updated": False}
    )
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(grads)):
      np.testing.assert_array_equal(a, b)


def test_cache_holds_a_vector_per_neuron_axis():
  params, grads, masks = setup()
  for axis in (-1, 0):
    tx = sparseopt.scale_by_sparseopt(neuron_axis=axis)
    _, state = tx.update(
        grads, tx.init(params), params, masks=masks, masks_updated=True
    )
    got = state.scales["Dense_0"]["kernel"]
    np.testing.assert_allclose(
        got,
        ref.sparseopt_factor(np.asarray(masks["Dense_0"]["kernel"]), axis),
        rtol=1e-6,
    )
    assert state.scales["Dense_0"]["bias"] is None
  # The norm correction follows the weights: nothing to cache.
  tx = sparseopt.scale_by_sparseopt(correction="norm")
  assert tx.init(params).scales is None


def test_masks_updated_needs_a_state():
  params, grads, masks = setup()
  with pytest.raises(ValueError, match="needs the state"):
    sparseopt.scale_by_sparseopt().update(
        grads, None, params, masks=masks, masks_updated=True
    )


@pytest.mark.parametrize("shape", [(6, 5), (3, 3, 2, 4), (1, 1, 4, 6)])
@pytest.mark.parametrize("axis", [-1, 0, 1])
def test_neuron_axis_vs_reference(shape, axis):
  rng = np.random.default_rng(1)
  m = rng.random(shape) < 0.5
  g = rng.normal(size=shape).astype(np.float32)
  tx = sparseopt.scale_by_sparseopt(neuron_axis=axis)
  out = jax.jit(
      lambda g, m: tx.update({"k": g}, None, None, masks={"k": m})[0]
  )(g, m)
  want = ref.scale_grad(g, ref.sparseopt_factor(m, axis), axis)
  np.testing.assert_allclose(out["k"], want, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(
      diagnostics.fan_in_scale(jnp.asarray(m), axis),
      ref.sparseopt_factor(m, axis),
      rtol=1e-6,
  )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_dense_mask_is_exact_identity(dtype):
  params, grads, _ = setup(dtype=dtype)
  dense = jax.tree.map(
      lambda p: jnp.ones(p.shape, bool) if p.ndim >= 2 else None, params
  )
  out = run(sparseopt.scale_by_sparseopt(), grads, params, masks=dense)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(grads)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # bitwise
  # Dense params without masks: params != 0 derivation is dense as well.
  dense_params = jax.tree.map(lambda p: p + 10.0, params)
  out = run(sparseopt.scale_by_sparseopt(), grads, dense_params)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(grads)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_fully_pruned_neuron_and_layer():
  params, grads, masks = setup()
  masks["Dense_0"]["kernel"] = jnp.zeros((6, 5), bool)  # whole layer
  grads["Dense_0"]["kernel"] = grads["Dense_0"]["kernel"].at[0, 0].set(1e30)
  out = run(sparseopt.scale_by_sparseopt(), grads, params, masks=masks)
  for leaf in jax.tree.leaves(out):
    assert bool(jnp.all(jnp.isfinite(leaf)))
  np.testing.assert_array_equal(out["Dense_0"]["kernel"], 0.0)
  np.testing.assert_array_equal(out["Conv_0"]["kernel"][..., 0], 0.0)
  assert bool(jnp.all(out["Conv_0"]["kernel"][..., 1:] != 0))
  np.testing.assert_array_equal(
      diagnostics.fan_in_scale(jnp.zeros((3, 3, 2, 4), bool)), 0.0
  )


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_dtype_kept_and_values(dtype):
  params, grads, masks = setup(dtype=dtype)
  out = run(sparseopt.scale_by_sparseopt(), grads, params, masks=masks)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(grads)):
    assert a.dtype == b.dtype and a.shape == b.shape
  # bf16: the only error is the final rounding to bf16 (8 mantissa bits).
  want = expected_fan_in(
      jax.tree.map(lambda g: g.astype(jnp.float32), grads), masks
  )
  tol = 1e-2 if dtype == jnp.bfloat16 else 1e-6
  assert_tree_close(out, want, rtol=tol, atol=tol * 1e-3)


# ---------------------------------------------------------- mask sources


def test_mask_precedence():
  params, grads, kw_masks = setup(seed=0)
  _, _, ctor_masks = setup(seed=1)
  want_kw = expected_fan_in(grads, kw_masks)
  want_ctor = expected_fan_in(grads, ctor_masks)
  # params != 0: the derived masks are the support of params; make params'
  # support a third pattern (and include a 1-D leaf, which stays dense).
  _, _, param_masks = setup(seed=2)
  params = jax.tree.map(
      lambda p, m: p if m is None else jnp.where(m, 1.5, 0.0),
      params,
      param_masks,
      is_leaf=lambda x: x is None,
  )
  want_params = expected_fan_in(grads, param_masks)
  assert not np.allclose(want_kw["Dense_0/kernel"], want_ctor["Dense_0/kernel"])

  # The update keyword beats a constructor tree and a callable.
  assert_tree_close(
      run(
          sparseopt.scale_by_sparseopt(ctor_masks),
          grads,
          params,
          masks=kw_masks,
      ),
      want_kw,
  )
  assert_tree_close(
      run(
          sparseopt.scale_by_sparseopt(lambda p: ctor_masks),
          grads,
          params,
          masks=kw_masks,
      ),
      want_kw,
  )
  # A constructor tree or callable beats params != 0.
  assert_tree_close(
      run(sparseopt.scale_by_sparseopt(ctor_masks), grads, params), want_ctor
  )
  calls = []

  def from_params(p):
    calls.append(1)
    return ctor_masks

  assert_tree_close(
      run(sparseopt.scale_by_sparseopt(from_params), grads, params), want_ctor
  )
  assert calls  # the callable really was consulted
  # Nothing given: params != 0.
  assert_tree_close(
      run(sparseopt.scale_by_sparseopt(), grads, params), want_params
  )
  # A constructor tree works without params.
  out, _ = sparseopt.scale_by_sparseopt(ctor_masks).update(grads, None)
  assert_tree_close(out, want_ctor)


def test_no_masks_and_no_params_is_a_clear_error():
  _, grads, _ = setup()
  with pytest.raises(ValueError, match=r"params=None"):
    sparseopt.scale_by_sparseopt().update(grads, None, None)
  with pytest.raises(ValueError, match=r"params=None"):
    sparseopt.zero_masked_updates().update(grads, None, None)


def test_bad_masks_in_update_name_the_path():
  params, grads, masks = setup()
  masks["Dense_0"]["kernel"] = masks["Dense_0"]["kernel"].astype(jnp.float32)
  with pytest.raises(
      TypeError, match=r"masks= \(update keyword\).*Dense_0/kernel"
  ):
    sparseopt.scale_by_sparseopt().update(grads, None, params, masks=masks)
  _, _, masks = setup()
  masks["Conv_0"]["kernel"] = masks["Conv_0"]["kernel"][..., :2]
  with pytest.raises(ValueError, match=r"Conv_0/kernel.*shape"):
    sparseopt.scale_by_sparseopt(masks).update(grads, None, params)
  _, _, masks = setup()
  del masks["BatchNorm_0"]
  with pytest.raises(ValueError, match=r"BatchNorm_0/scale"):
    sparseopt.zero_masked_updates().update(grads, None, params, masks=masks)


def test_neuron_axis_errors_name_the_path():
  params, grads, masks = setup()
  tx = sparseopt.scale_by_sparseopt(neuron_axis=2)  # Dense_0 has ndim 2
  with pytest.raises(ValueError, match=r"neuron_axis=2.*Dense_0/kernel"):
    tx.update(grads, None, params, masks=masks)
  with pytest.raises(TypeError, match=r"neuron_axis must be an int"):
    sparseopt.scale_by_sparseopt(neuron_axis="last")
  with pytest.raises(ValueError, match=r"Unknown correction 'nrm'"):
    sparseopt.scale_by_sparseopt(correction="nrm")


def test_filter_fn_and_exclude_paths_leave_leaves_untouched():
  params, grads, masks = setup()
  tx = sparseopt.scale_by_sparseopt(filter_fn=sparseopt.exclude_paths("Dense"))
  out = run(tx, grads, params, masks=masks)
  np.testing.assert_array_equal(
      out["Dense_0"]["kernel"], grads["Dense_0"]["kernel"]
  )  # bitwise
  assert_tree_close(
      out, expected_fan_in(grads, masks, skip=("Dense_0/kernel",))
  )
  # The same with a pytree of bools.
  flags = jax.tree.map(lambda p: p.ndim >= 2, params)
  flags["Conv_0"]["kernel"] = False
  out = run(
      sparseopt.scale_by_sparseopt(filter_fn=flags), grads, params, masks=masks
  )
  np.testing.assert_array_equal(
      out["Conv_0"]["kernel"], grads["Conv_0"]["kernel"]
  )
  assert_tree_close(out, expected_fan_in(grads, masks, skip=("Conv_0/kernel",)))
  scales = diagnostics.sparseopt_scales(masks, params, filter_fn=flags)
  assert scales["Conv_0"]["kernel"] is None
  np.testing.assert_allclose(
      scales["Dense_0"]["kernel"],
      ref.sparseopt_factor(np.asarray(masks["Dense_0"]["kernel"])),
      rtol=1e-6,
  )


# ------------------------------------------------------------ norm variant


def test_norm_correction_vs_reference():
  params, grads, masks = setup()
  # Dense_0: neuron 1 active but all its weights zero (just regrown), neuron 2
  # with no active weight at all. Conv_1x1: an all-zero (but active) layer.
  m = np.asarray(masks["Dense_0"]["kernel"]).copy()
  m[:, 2] = False
  m[:2, 1] = True
  w = np.asarray(params["Dense_0"]["kernel"]).copy() * m
  w[:, 1] = 0.0
  masks["Dense_0"]["kernel"] = jnp.asarray(m)
  params["Dense_0"]["kernel"] = jnp.asarray(w)
  params["Conv_1x1"]["kernel"] = jnp.zeros((1, 1, 4, 6))
  # Weights outside the mask must not count towards the norm.
  params["Conv_0"]["kernel"] = params["Conv_0"]["kernel"] + jnp.where(
      masks["Conv_0"]["kernel"], 0.0, 100.0
  )

  out = run(
      sparseopt.scale_by_sparseopt(correction="norm"),
      grads,
      params,
      masks=masks,
  )
  want = {}
  for n, g in flat(grads).items():
    mk = flat(masks)[n]
    if mk is None:
      want[n] = np.asarray(g, np.float64)
    else:
      want[n] = ref.scale_grad(
          g, ref.norm_factor(np.asarray(mk), np.asarray(flat(params)[n]))
      )
  assert_tree_close(out, want, rtol=1e-5, atol=1e-6)
  f = ref.norm_factor(m, w)
  assert f[2] == 0.0 and f[1] == 1.0
  np.testing.assert_allclose(
      diagnostics.norm_scale(jnp.asarray(m), jnp.asarray(w)), f, rtol=1e-5
  )
  np.testing.assert_array_equal(
      out["Conv_1x1"]["kernel"], grads["Conv_1x1"]["kernel"]
  )
  for leaf in jax.tree.leaves(out):
    assert bool(jnp.all(jnp.isfinite(leaf)))
  # Scale invariance of the measured factor.
  np.testing.assert_allclose(
      diagnostics.norm_scale(jnp.asarray(m), jnp.asarray(7 * w)), f, rtol=1e-5
  )


def test_norm_needs_params():
  _, grads, masks = setup()
  with pytest.raises(ValueError, match=r"needs params"):
    sparseopt.scale_by_sparseopt(correction="norm").update(
        grads, None, masks=masks
    )
  with pytest.raises(ValueError, match=r"needs params"):
    diagnostics.sparseopt_scales(masks, correction="norm")


# ------------------------------------------------------ zero_masked_updates


def test_zero_masked_updates():
  params, grads, masks = setup()
  out = run(sparseopt.zero_masked_updates(), grads, params, masks=masks)
  for n, g in flat(grads).items():
    m = flat(masks)[n]
    want = np.asarray(g) if m is None else np.where(m, g, 0.0)
    np.testing.assert_array_equal(flat(out)[n], want)
  # From the constructor and from params != 0.
  out = run(sparseopt.zero_masked_updates(masks), grads, params)
  np.testing.assert_array_equal(
      out["Dense_0"]["kernel"],
      np.where(masks["Dense_0"]["kernel"], grads["Dense_0"]["kernel"], 0.0),
  )
  # Inferred from params, zero entries are pruned, but an all-zero kernel is
  # a dense layer (it must not be frozen).
  w = params["Dense_0"]["kernel"]
  params["Dense_0"]["kernel"] = w.at[0].set(0.0).at[1:].set(1.0)
  out = run(sparseopt.zero_masked_updates(), grads, params)
  np.testing.assert_array_equal(out["Dense_0"]["kernel"][0], 0.0)
  np.testing.assert_array_equal(
      out["Dense_0"]["kernel"][1:], grads["Dense_0"]["kernel"][1:]
  )
  params["Dense_0"]["kernel"] = jnp.zeros_like(w)
  out = run(sparseopt.zero_masked_updates(), grads, params)
  np.testing.assert_array_equal(
      out["Dense_0"]["kernel"], grads["Dense_0"]["kernel"]
  )


# ------------------------------------------------------ the zero-init trap


def _train_zero_init(tx, steps=4):
  """Updates of ``tx`` on ``{"w": zeros((2, 2))}`` pulled towards a target."""
  target = jnp.array([[1.0, -2.0], [3.0, 0.5]])
  params = {"w": jnp.zeros((2, 2))}
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    grads = jax.grad(lambda p: jnp.sum((p["w"] - target) ** 2))(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, updates

  history = []
  for _ in range(steps):
    params, state, updates = step(params, state)
    history.append(updates["w"])
  return history


@pytest.mark.parametrize(
    "make",
    [
        lambda: optax.chain(sparseopt.scale_by_sparseopt(), optax.sgd(0.1)),
        lambda: optax.chain(optax.sgd(0.1), sparseopt.zero_masked_updates()),
    ],
    ids=["scale_by_sparseopt", "zero_masked_updates"],
)
def test_inferred_masks_never_freeze_a_zero_initialized_kernel(make):
  # Issue 18 item 5: an all-zero kernel read as a fully pruned layer got
  # zero updates at every step, so it could never leave zero.
  for updates in _train_zero_init(make()):
    assert bool(jnp.all(updates != 0)), updates


def test_zero_kernel_is_dense_under_jit():
  # Decided on values inside jit, not by a Python branch at trace time.
  tx = sparseopt.scale_by_sparseopt()
  step = jax.jit(lambda g, p: tx.update(g, tx.init(p), p)[0])
  g = {"w": jnp.arange(1.0, 5.0).reshape(2, 2)}
  np.testing.assert_array_equal(step(g, {"w": jnp.zeros((2, 2))})["w"], g["w"])
  # One live entry: the other three are pruned, and the live neuron is the
  # only one left in the layer (c = sqrt(1/2) / sqrt(1/4)).
  out = step(g, {"w": jnp.array([[0.0, 0.0], [0.0, 1.0]])})["w"]
  np.testing.assert_allclose(
      out, [[0.0, 2.0 * np.sqrt(2)], [0.0, 4.0 * np.sqrt(2)]], rtol=1e-6
  )


# ---------------------------------------------------------------- alias


@pytest.mark.parametrize("nesterov", [False, True])
def test_alias_equals_manual_chain(nesterov):
  params, grads, masks = setup()
  a = sparseopt.sparseopt(
      0.1, momentum=0.9, nesterov=nesterov, weight_decay=1e-2
  )
  b = optax.chain(
      sparseopt.scale_by_sparseopt(),
      optax.add_decayed_weights(1e-2),
      optax.sgd(0.1, momentum=0.9, nesterov=nesterov),
  )
  sa, sb = a.init(params), b.init(params)
  pa = pb = params
  for step in range(3):
    g = jax.tree.map(lambda x, step=step: x * (step + 1), grads)
    ua, sa = a.update(g, sa, pa, masks=masks)
    ub, sb = b.update(g, sb, pb, masks=masks)
    for x, y in zip(jax.tree.leaves(ua), jax.tree.leaves(ub)):
      np.testing.assert_array_equal(x, y)
    pa, pb = optax.apply_updates(pa, ua), optax.apply_updates(pb, ub)


def test_alias_weight_decay_is_not_scaled():
  # One step from zero momentum: u = -lr (c * g + wd * w), never c * (g + wd w).
  params, grads, masks = setup()
  lr, wd = 0.1, 0.5
  tx = sparseopt.sparseopt(lr, momentum=0.9, weight_decay=wd)
  u, _ = tx.update(grads, tx.init(params), params, masks=masks)
  m = np.asarray(masks["Dense_0"]["kernel"])
  c = ref.sparseopt_factor(m)
  g = np.asarray(grads["Dense_0"]["kernel"], np.float64)
  w = np.asarray(params["Dense_0"]["kernel"], np.float64)
  want = -lr * (c * g + wd * w)
  wrong = -lr * c * (g + wd * w)
  got = np.asarray(u["Dense_0"]["kernel"])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  assert not np.allclose(got, wrong, rtol=1e-3, atol=1e-5)
  # Plain SGD (momentum None / 0) is accepted and means no trace.
  for mom in (None, 0.0):
    tx = sparseopt.sparseopt(lr, momentum=mom)
    u, s = tx.update(grads, tx.init(params), params, masks=masks)
    np.testing.assert_allclose(
        u["Dense_0"]["kernel"], -lr * c * g, rtol=1e-5, atol=1e-7
    )
  with pytest.raises(ValueError, match="weight_decay"):
    sparseopt.sparseopt(0.1, weight_decay=-1.0)


def test_alias_with_schedule():
  params, grads, masks = setup()
  sched = optax.linear_schedule(1.0, 0.0, 4)
  tx = sparseopt.sparseopt(sched, momentum=None)
  s = tx.init(params)
  u0, s = tx.update(grads, s, params, masks=masks)
  u1, s = tx.update(grads, s, params, masks=masks)
  np.testing.assert_allclose(
      u1["Dense_0"]["kernel"], 0.75 * u0["Dense_0"]["kernel"], rtol=1e-6
  )


# ---------------------------------------- in front of normalizing optimizers


@pytest.mark.parametrize("opt", ["adam", "adamw", "lion"])
def test_in_front_of_normalizing_optimizers(opt):
  # A positive per-neuron constant cancels in Adam's m / sqrt(v) (up to eps)
  # and in Lion's sign: updates match the uncorrected optimizer except at
  # dead neurons (factor 0), where they are exactly 0 (before weight decay).
  params, grads, masks = setup()
  make = {
      "adam": lambda: optax.adam(1e-2, eps=1e-12),
      "adamw": lambda: optax.adamw(1e-2, eps=1e-12, weight_decay=0.0),
      "lion": lambda: optax.lion(1e-2, weight_decay=0.0),
  }[opt]
  a = optax.chain(sparseopt.scale_by_sparseopt(), make())
  b = make()
  sa, sb = a.init(params), b.init(params)
  for _ in range(3):
    ua, sa = jax.jit(lambda g, s, p, m: a.update(g, s, p, masks=m))(
        grads, sa, params, masks
    )
    ub, sb = b.update(grads, sb, params)
  got, want = flat(ua), flat(ub)
  for n in got:
    assert got[n].dtype == want[n].dtype
    x, y = np.asarray(got[n]), np.asarray(want[n])
    if n == "Conv_0/kernel":
      np.testing.assert_array_equal(x[..., 0], 0.0)
      x, y = x[..., 1:], y[..., 1:]
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-7, err_msg=n)


# ------------------------------------------------ batch_stats correction


def batch_stats_factor(mask, var, epsilon=1e-5, neuron_axis=-1):
  """c_i = sigma_i / rms_j sigma_j over active neurons; 0 on dead ones."""
  m = np.moveaxis(np.asarray(mask, bool), neuron_axis, -1)
  n = m.shape[-1]
  active = m.reshape(-1, n).any(axis=0)
  sigma = np.sqrt(np.maximum(np.asarray(var, np.float64), 0.0) + epsilon)
  out = np.zeros(n)
  if active.any():
    rms = np.sqrt(np.mean(sigma[active] ** 2))
    out[active] = sigma[active] / rms if rms > 0 else 1.0
  return out


def batch_stats_setup(seed=0):
  """``setup()`` plus variances for every kernel but Dense_0 (a "head")."""
  params, grads, masks = setup(seed)
  rng = np.random.default_rng(seed + 1)
  stats = jax.tree.map(lambda _: None, params)
  for name in ("Conv_0", "Conv_1x1"):
    n = params[name]["kernel"].shape[-1]
    stats[name]["kernel"] = jnp.asarray(rng.gamma(2.0, 0.5, n), jnp.float32)
  # A dead neuron's BatchNorm sees a constant: variance 0.
  stats["Conv_0"]["kernel"] = stats["Conv_0"]["kernel"].at[0].set(0.0)
  return params, grads, masks, stats


def expected_batch_stats(grads, masks, stats, epsilon=1e-5):
  want = {}
  for n, g in flat(grads).items():
    v = flat(stats)[n]
    if v is None:
      want[n] = np.asarray(g, np.float64)
    else:
      f = batch_stats_factor(flat(masks)[n], v, epsilon)
      want[n] = ref.scale_grad(g, f)
  return want


@pytest.mark.parametrize("epsilon", [1e-5, 0.1])
def test_batch_stats_correction_vs_reference(epsilon):
  params, grads, masks, stats = batch_stats_setup()
  tx = sparseopt.scale_by_sparseopt(correction="batch_stats", epsilon=epsilon)
  out = run(tx, grads, params, masks=masks, batch_stats=stats)
  assert_tree_close(
      out, expected_batch_stats(grads, masks, stats, epsilon), rtol=1e-5
  )
  # Dead neuron: exactly 0. Dense_0 has no statistics (a head): untouched.
  np.testing.assert_array_equal(out["Conv_0"]["kernel"][..., 0], 0.0)
  np.testing.assert_array_equal(
      out["Dense_0"]["kernel"], grads["Dense_0"]["kernel"]
  )
  # The factor is not trivial on this example.
  f = batch_stats_factor(
      masks["Conv_1x1"]["kernel"], stats["Conv_1x1"]["kernel"], epsilon
  )
  assert f.std() > 0.05
  got = diagnostics.batch_stats_scale(
      masks["Conv_1x1"]["kernel"], stats["Conv_1x1"]["kernel"], epsilon=epsilon
  )
  np.testing.assert_allclose(got, f, rtol=1e-6)
  scales = diagnostics.sparseopt_scales(
      masks,
      params,
      correction="batch_stats",
      batch_stats=stats,
      epsilon=epsilon,
  )
  assert scales["Dense_0"]["kernel"] is None
  np.testing.assert_allclose(scales["Conv_1x1"]["kernel"], f, rtol=1e-6)


def test_batch_stats_neuron_axis():
  rng = np.random.default_rng(3)
  m = rng.random((5, 3, 4)) < 0.5
  m[:, 1, :] = False  # neuron 1 along axis 1 is dead
  var = rng.gamma(2.0, 0.5, 3)
  got = diagnostics.batch_stats_scale(jnp.asarray(m), jnp.asarray(var), 1)
  np.testing.assert_allclose(
      got, batch_stats_factor(m, var, neuron_axis=1), rtol=1e-6
  )
  assert got[1] == 0.0


def test_batch_stats_fully_pruned_layer_and_zero_variance():
  m = jnp.zeros((3, 4), bool)
  out = diagnostics.batch_stats_scale(m, jnp.zeros(4))
  np.testing.assert_array_equal(out, np.zeros(4))
  g = {"w": jnp.ones((3, 4))}
  upd, _ = sparseopt.scale_by_sparseopt(correction="batch_stats").update(
      g, None, masks={"w": m}, batch_stats={"w": jnp.ones(4)}
  )
  np.testing.assert_array_equal(upd["w"], 0.0)
  # epsilon=0 and constant outputs: sigma 0 everywhere, active neurons get 1.
  m = jnp.ones((3, 4), bool).at[:, 2].set(False)
  out = diagnostics.batch_stats_scale(m, jnp.zeros(4), epsilon=0.0)
  np.testing.assert_array_equal(out, [1.0, 1.0, 0.0, 1.0])
  # Rounding-negative variances are clipped, never NaN.
  out = diagnostics.batch_stats_scale(m, jnp.array([-1e-9, 1.0, 1.0, 1.0]))
  assert bool(jnp.all(jnp.isfinite(out)))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_batch_stats_keeps_dtype(dtype):
  params, grads, masks, stats = batch_stats_setup()
  grads = jax.tree.map(lambda g: g.astype(dtype), grads)
  stats = jax.tree.map(lambda v: v.astype(dtype), stats)
  tx = sparseopt.scale_by_sparseopt(correction="batch_stats")
  out = run(tx, grads, params, masks=masks, batch_stats=stats)
  for g, o in zip(jax.tree.leaves(grads), jax.tree.leaves(out)):
    assert o.dtype == g.dtype and o.shape == g.shape
  tol = 1e-2 if dtype == jnp.bfloat16 else 1e-5
  assert_tree_close(
      out, expected_batch_stats(grads, masks, stats), rtol=tol, atol=tol
  )


def test_batch_stats_not_cached():
  params, grads, masks, stats = batch_stats_setup()
  tx = sparseopt.scale_by_sparseopt(correction="batch_stats")
  state = tx.init(params)
  assert state.scales is None
  step = jax.jit(lambda s, b: tx.update(grads, s, params, masks=masks, **b))
  out1, state = step(state, {"batch_stats": stats, "masks_updated": False})
  stats2 = jax.tree.map(lambda v: v * jnp.linspace(1, 3, v.shape[0]), stats)
  out2, _ = step(state, {"batch_stats": stats2, "masks_updated": False})
  assert_tree_close(out2, expected_batch_stats(grads, masks, stats2), 1e-5)
  assert not np.allclose(out1["Conv_1x1"]["kernel"], out2["Conv_1x1"]["kernel"])


def test_batch_stats_errors_name_the_path():
  params, grads, masks, stats = batch_stats_setup()
  tx = sparseopt.scale_by_sparseopt(correction="batch_stats")
  with pytest.raises(ValueError, match=r"needs the update keyword batch_stats"):
    tx.update(grads, None, params, masks=masks)
  with pytest.raises(ValueError, match=r"needs batch_stats"):
    diagnostics.sparseopt_scales(masks, correction="batch_stats")
  # An explicit filter promises its leaves are corrected: a missing
  # variance there is an error, not a silent skip.
  strict = sparseopt.scale_by_sparseopt(
      correction="batch_stats", filter_fn=sparseopt.is_kernel
  )
  with pytest.raises(ValueError, match=r"\['Dense_0/kernel'\]"):
    strict.update(grads, None, params, masks=masks, batch_stats=stats)
  # Excluding it makes the same call valid.
  ok = sparseopt.scale_by_sparseopt(
      correction="batch_stats", filter_fn=sparseopt.exclude_paths("Dense_0")
  )
  out, _ = ok.update(grads, None, params, masks=masks, batch_stats=stats)
  assert_tree_close(out, expected_batch_stats(grads, masks, stats), 1e-5)
  bad = dict(stats, Conv_0={"kernel": jnp.ones(3), "bias": None})
  with pytest.raises(ValueError, match=r"batch_stats\['Conv_0/kernel'\]"):
    tx.update(grads, None, params, masks=masks, batch_stats=bad)
  with pytest.raises(ValueError, match=r"missing: \['Dense_0/bias'"):
    tx.update(
        grads,
        None,
        params,
        masks=masks,
        batch_stats={k: v for k, v in stats.items() if k != "Dense_0"},
    )
  with pytest.raises(ValueError, match=r"epsilon must be >= 0"):
    sparseopt.scale_by_sparseopt(correction="batch_stats", epsilon=-1.0)


def test_batch_stats_through_chain_and_dynamic_sparse():
  params, grads, masks, stats = batch_stats_setup()
  params = sparseopt.apply_masks(params, masks)
  want = expected_batch_stats(grads, masks, stats)
  inner = optax.chain(
      sparseopt.scale_by_sparseopt(correction="batch_stats"), optax.sgd(0.1)
  )
  out = run(inner, grads, params, masks=masks, batch_stats=stats)
  assert_tree_close(out, {n: -0.1 * w for n, w in want.items()}, 1e-5)
  # dynamic_sparse forwards batch_stats= to its inner chain; a normal step
  # (no mask update) gives the inner updates on kept weights, 0 elsewhere.
  tx = sparseopt.dynamic_sparse(
      inner,
      masks,
      method="rigl",
      update_every=10,
      end_step=100,
      key=jax.random.key(0),
  )
  out = run(tx, grads, params, batch_stats=stats)
  for n, w in want.items():
    m = flat(masks)[n]
    expect = -0.1 * w if m is None else np.where(np.asarray(m), -0.1 * w, 0)
    np.testing.assert_allclose(
        np.asarray(flat(out)[n], np.float64), expect, rtol=1e-5, atol=1e-7
    )
  # The alias takes the correction too.
  alias = sparseopt.sparseopt(0.1, momentum=None, correction="batch_stats")
  out = run(alias, grads, params, masks=masks, batch_stats=stats)
  assert_tree_close(out, {n: -0.1 * w for n, w in want.items()}, 1e-5)


def test_batch_stats_under_scan_without_recompiling():
  params, grads, masks, stats = batch_stats_setup()
  tx = sparseopt.scale_by_sparseopt(correction="batch_stats")
  steps = jnp.linspace(0.5, 2.0, 3)
  per_step = jax.tree.map(
      lambda v: v[None] * steps[:, None] ** jnp.arange(v.shape[0]), stats
  )

  def body(state, s):
    return tx.update(grads, state, params, masks=masks, batch_stats=s)[::-1]

  _, outs = jax.lax.scan(body, tx.init(params), per_step)
  for t in range(3):
    s = jax.tree.map(lambda v, t=t: v[t], per_step)
    assert_tree_close(
        jax.tree.map(lambda o, t=t: o[t], outs),
        expected_batch_stats(grads, masks, s),
        rtol=1e-5,
    )
  step = jax.jit(lambda s: tx.update(grads, None, params, masks=masks, **s))
  step({"batch_stats": stats})
  step({"batch_stats": jax.tree.map(lambda v: 2 * v, stats)})
  assert step._cache_size() == 1
