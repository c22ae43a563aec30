"""ham and normalize_updates against independent NumPy implementations."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparseopt_jax as sparseopt
import reference as ref

# ------------------------------------------------------------- references
#
# Written from the paper's update rule (arXiv:2506.02630, and its reference
# PyTorch wrapper), in float64 with plain loops over leaves.


def ham_step(w, g, u, lr, *, alpha, beta, clip, selected, max_norm=None):
  """One HAM step on one leaf: returns the new weights."""
  w, g, u = (np.asarray(x, np.float64) for x in (w, g, u))
  h = w + u
  if selected:
    exponent = np.clip(-lr * (alpha * np.sign(h) * g + beta), -clip, clip)
    new = h.copy()
    nz = h != 0
    new[nz] = h[nz] * np.exp(exponent[nz])
    h = new
  if max_norm is not None:
    norm = np.sqrt(np.sum(h**2))
    if norm > max_norm:
      h = h * (max_norm / norm)
  return h


def ham_sgd_run(params, grads_seq, lrs, *, momentum, flags, **kw):
  """HAM around SGD with (heavy-ball) momentum, step by step, in NumPy."""
  w = {k: np.asarray(v, np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in w.items()}
  for grads, lr in zip(grads_seq, lrs):
    for k in w:
      g = np.asarray(grads[k], np.float64)
      m[k] = momentum * m[k] + g
      w[k] = ham_step(w[k], g, -lr * m[k], lr, selected=flags[k], **kw)
  return w


def unit(x, eps):
  x = np.asarray(x, np.float64)
  norm = np.sqrt(np.sum(x**2))
  return x / (norm + eps) if norm > 0 else x


# ------------------------------------------------------------------ data


def problem(seed=0, dtype=jnp.float32):
  """A conv kernel with exact zeros, a dense kernel, a bias; big gradients
  on a few entries so that some exponents hit the clip."""
  rng = np.random.default_rng(seed)
  conv = rng.normal(size=(3, 3, 2, 4)) * (rng.random((3, 3, 2, 4)) < 0.5)
  params = {
      "conv": conv,
      "dense": rng.normal(size=(4, 6)),
      "bias": rng.normal(size=(6,)),
  }
  params = {k: jnp.asarray(v, dtype) for k, v in params.items()}

  def grads_at(t):
    r = np.random.default_rng(1000 + t)
    out = {}
    for k, v in params.items():
      g = r.normal(size=v.shape)
      g.reshape(-1)[:2] *= 50.0  # lr * alpha * |g| > clip there
      out[k] = jnp.asarray(g, dtype)
    return out

  return params, grads_at


KERNELS = {"conv": True, "dense": True, "bias": False}


def run(tx, params, grads_seq, **kw):
  step = jax.jit(lambda g, s, p: tx.update(g, s, p, **kw))
  state = tx.init(params)
  for g in grads_seq:
    u, state = step(g, state, params)
    params = optax.apply_updates(params, u)
  return params, state


def assert_close(got, want, rtol=1e-5, atol=1e-6):
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_allclose(
        np.asarray(got[k], np.float64), want[k], rtol=rtol, atol=atol, err_msg=k
    )


# ------------------------------------------------------------------- ham


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_matches_numpy_under_jit(momentum):
  params, grads_at = problem()
  grads = [grads_at(t) for t in range(6)]
  hp = dict(alpha=200.0, beta=1e-3, clip=5.0)
  tx = sparseopt.ham(optax.sgd(0.01, momentum=momentum or None), 0.01, **hp)
  got, state = run(tx, params, grads)
  want = ham_sgd_run(
      params, grads, [0.01] * 6, momentum=momentum, flags=KERNELS, **hp
  )
  assert_close(got, want)
  assert int(state.count) == 6
  # Zero weights with no inner update stay exactly zero; the clip was hit.
  lr_alpha_g = 0.01 * 200.0 * np.abs(np.asarray(grads[0]["conv"]))
  assert lr_alpha_g.max() > 5.0


def test_schedule_learning_rate():
  params, grads_at = problem(1)
  grads = [grads_at(t) for t in range(5)]
  schedule = optax.linear_schedule(0.02, 0.002, 4)
  tx = sparseopt.ham(optax.sgd(schedule), schedule, alpha=50.0)
  got, state = run(tx, params, grads)
  lrs = [float(schedule(t)) for t in range(5)]
  want = ham_sgd_run(
      params,
      grads,
      lrs,
      momentum=0.0,
      flags=KERNELS,
      alpha=50.0,
      beta=1e-3,
      clip=5.0,
  )
  assert_close(got, want)
  assert state.count.dtype == jnp.int32


@pytest.mark.parametrize("form", ["callable", "pytree"])
def test_filter(form):
  params, grads_at = problem(2)
  grads = [grads_at(t) for t in range(3)]
  if form == "callable":
    filter_fn = sparseopt.exclude_paths("dense")
  else:
    filter_fn = {"conv": True, "dense": False, "bias": False}
  tx = sparseopt.ham(optax.sgd(0.01), 0.01, alpha=20.0, filter_fn=filter_fn)
  got, _ = run(tx, params, grads)
  flags = {"conv": True, "dense": False, "bias": False}
  want = ham_sgd_run(
      params, grads, [0.01] * 3, momentum=0.0, flags=flags, alpha=20.0,
      beta=1e-3, clip=5.0,
  )  # fmt: skip
  assert_close(got, want)
  # Unselected leaves take exactly the inner update.
  u, _ = tx.update(grads[0], tx.init(params), params)
  np.testing.assert_array_equal(u["dense"], -0.01 * grads[0]["dense"])
  np.testing.assert_array_equal(u["bias"], -0.01 * grads[0]["bias"])


def test_max_norm_caps_every_leaf():
  params, grads_at = problem(3)
  params = {k: v * 10.0 for k, v in params.items()}
  grads = [grads_at(t) for t in range(3)]
  tx = sparseopt.ham(optax.sgd(0.01), 0.01, alpha=20.0, max_norm=5.0)
  got, _ = run(tx, params, grads)
  want = ham_sgd_run(
      params, grads, [0.01] * 3, momentum=0.0, flags=KERNELS, alpha=20.0,
      beta=1e-3, clip=5.0, max_norm=5.0,
  )  # fmt: skip
  assert_close(got, want)
  for k, v in got.items():  # the bias (not a HAM leaf) is capped too
    assert float(jnp.linalg.norm(v)) <= 5.0 * (1 + 1e-5), k
  # A cap that is not reached changes nothing, bit for bit.
  loose = sparseopt.ham(optax.sgd(0.01), 0.01, max_norm=1e6)
  plain = sparseopt.ham(optax.sgd(0.01), 0.01)
  a, _ = loose.update(grads[0], loose.init(params), params)
  b, _ = plain.update(grads[0], plain.init(params), params)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


def test_bf16_params_keep_dtype():
  params, grads_at = problem(4, jnp.bfloat16)
  grads = [grads_at(t) for t in range(3)]
  # alpha small enough that bf16 rounding is not amplified by exp(clip).
  tx = sparseopt.ham(optax.sgd(0.01, momentum=0.9), 0.01, alpha=2.0)
  got, _ = run(tx, params, grads)
  for k, v in got.items():
    assert v.dtype == jnp.bfloat16, k
  f32 = lambda t: jax.tree.map(lambda x: x.astype(jnp.float32), t)  # noqa: E731
  want, _ = run(tx, f32(params), [f32(g) for g in grads])
  for k in want:
    np.testing.assert_allclose(
        np.asarray(got[k], np.float32), want[k], rtol=3e-2, atol=3e-2
    )
  # Zeros are still exact zeros in bf16 (the conv kernel has some).
  zeros = np.asarray(params["conv"]) == 0
  u, _ = tx.update(
      jax.tree.map(jnp.zeros_like, grads[0]), tx.init(params), params
  )
  assert np.all(np.asarray(u["conv"])[zeros] == 0)


def test_needs_params_and_checks_arguments():
  params, grads_at = problem()
  tx = sparseopt.ham(optax.sgd(0.1), 0.1)
  with pytest.raises(ValueError, match="params"):
    tx.update(grads_at(0), tx.init(params))
  with pytest.raises(ValueError, match="clip"):
    sparseopt.ham(optax.sgd(0.1), 0.1, clip=0.0)
  with pytest.raises(ValueError, match="alpha"):
    sparseopt.ham(optax.sgd(0.1), 0.1, alpha=-1.0)
  with pytest.raises(ValueError, match="max_norm"):
    sparseopt.ham(optax.sgd(0.1), 0.1, max_norm=0.0)


def test_zero_weight_moves_only_with_the_inner_step():
  # h == 0 stays 0 whatever the gradient; w == 0 with u != 0 is scaled.
  params = {"w": jnp.array([[0.0, 0.0], [1.0, 0.0]])}
  grads = {"w": jnp.array([[5.0, 0.0], [1.0, 3.0]])}
  tx = sparseopt.ham(
      optax.chain(optax.sgd(0.1), sparseopt.zero_masked_updates()),
      0.1,
      alpha=1.0,
      beta=0.0,
  )
  masks = {"w": jnp.array([[False, True], [True, True]])}
  u, _ = tx.update(grads, tx.init(params), params, masks=masks)
  new = np.asarray(optax.apply_updates(params, u)["w"])
  assert new[0, 0] == 0.0  # pruned: no inner update, so it stays 0
  assert new[0, 1] == 0.0  # zero gradient: h == 0
  np.testing.assert_allclose(new[1, 1], -0.3 * np.exp(0.1 * 3.0), rtol=1e-6)


# ----------------------------------------------------- SparseOpt placement


def sparse_problem():
  params, grads_at = problem(5)
  masks = sparseopt.init_masks(jax.random.key(0), params, 0.6, "uniform")
  masks["dense"] = masks["dense"].at[:, 0].set(False).at[0, 0].set(True)
  return sparseopt.apply_masks(params, masks), masks, grads_at


@pytest.mark.parametrize("placement", ["outside", "inside"])
def test_sparseopt_placement(placement):
  params, masks, grads_at = sparse_problem()
  grads = [grads_at(t) for t in range(3)]
  lr, hp = 0.01, dict(alpha=50.0, beta=1e-3, clip=5.0)
  if placement == "outside":
    # The corrected gradient reaches the inner SGD and HAM's exponent.
    tx = optax.chain(
        sparseopt.scale_by_sparseopt(), sparseopt.ham(optax.sgd(lr), lr, **hp)
    )
  else:
    # Only the inner update is corrected; the exponent sees the raw gradient.
    tx = sparseopt.ham(
        optax.chain(sparseopt.scale_by_sparseopt(), optax.sgd(lr)), lr, **hp
    )
  got, _ = run(tx, params, grads, masks=masks)

  w = {k: np.asarray(v, np.float64) for k, v in params.items()}
  for g in grads:
    for k in w:
      raw = np.asarray(g[k], np.float64)
      corrected = raw
      if masks[k] is not None:
        factor = ref.sparseopt_factor(np.asarray(masks[k]))
        corrected = ref.scale_grad(raw, factor)
      seen = corrected if placement == "outside" else raw
      w[k] = ham_step(
          w[k], seen, -lr * corrected, lr, selected=KERNELS[k], **hp
      )
  assert_close(got, w)


def test_placements_differ():
  params, masks, grads_at = sparse_problem()
  lr = 0.01
  outside = optax.chain(
      sparseopt.scale_by_sparseopt(), sparseopt.ham(optax.sgd(lr), lr)
  )
  inside = sparseopt.ham(
      optax.chain(sparseopt.scale_by_sparseopt(), optax.sgd(lr)), lr
  )
  a, _ = run(outside, params, [grads_at(0)], masks=masks)
  b, _ = run(inside, params, [grads_at(0)], masks=masks)
  assert not np.allclose(a["dense"], b["dense"])
  np.testing.assert_array_equal(a["bias"], b["bias"])  # not a HAM leaf


@pytest.mark.parametrize("placement", ["outside", "inside"])
def test_pruned_weights_stay_zero_inside_dynamic_sparse(placement):
  params, masks, grads_at = sparse_problem()
  lr = 0.01
  if placement == "outside":
    inner = optax.chain(
        sparseopt.scale_by_sparseopt(),
        sparseopt.ham(optax.sgd(lr, momentum=0.9), lr, max_norm=1000.0),
    )
  else:
    inner = sparseopt.ham(
        optax.chain(
            sparseopt.scale_by_sparseopt(), optax.sgd(lr, momentum=0.9)
        ),
        lr,
    )
  tx = sparseopt.dynamic_sparse(
      inner,
      masks,
      method="rigl",
      update_every=2,
      end_step=10,
      drop_fraction=0.5,
      key=jax.random.key(1),
  )
  step = jax.jit(tx.update)
  state = tx.init(params)
  changes = 0
  for t in range(12):
    before = sparseopt.get_masks(state)
    u, state = step(grads_at(t), state, params)
    params = optax.apply_updates(params, u)
    live = sparseopt.get_masks(state)
    changes += int(
        any(
            bool(jnp.any(before[k] != live[k]))
            for k in KERNELS
            if live[k] is not None
        )
    )
    for k, m in live.items():
      if m is not None:
        assert np.all(np.asarray(params[k])[~np.asarray(m)] == 0.0), (t, k)
        assert np.all(np.isfinite(np.asarray(params[k])))
  assert changes >= 3  # several RigL mask updates happened


def test_under_inject_hyperparams():
  params, grads_at = problem()
  tx = optax.inject_hyperparams(sparseopt.ham)(
      optax.sgd(0.01), learning_rate=0.01, alpha=20.0
  )
  plain = sparseopt.ham(optax.sgd(0.01), 0.01, alpha=20.0)
  state = tx.init(params)
  step = jax.jit(lambda g, s, p: tx.update(g, s, p))
  u, state = step(grads_at(0), state, params)
  want, _ = plain.update(grads_at(0), plain.init(params), params)
  for k in want:
    np.testing.assert_allclose(u[k], want[k], rtol=1e-6, atol=1e-7)
  # The injected alpha is used: alpha = 0 leaves only SGD and the decay.
  state.hyperparams["alpha"] = jnp.asarray(0.0)
  u0, _ = step(grads_at(0), state, params)
  no_alpha = sparseopt.ham(optax.sgd(0.01), 0.01, alpha=0.0)
  want0, _ = no_alpha.update(grads_at(0), no_alpha.init(params), params)
  for k in want0:
    np.testing.assert_allclose(u0[k], want0[k], rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------- normalization


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("eps", [0.0, 1e-3])
def test_normalize_matches_numpy(scope, eps):
  params, grads_at = problem(6)
  g = grads_at(0)
  g["zero"] = jnp.zeros((3, 2))
  tx = sparseopt.normalize_updates(scope, eps=eps)
  u, _ = jax.jit(lambda g, s: tx.update(g, s))(g, tx.init(g))
  if scope == "global":
    norm = np.sqrt(
        sum(np.sum(np.asarray(x, np.float64) ** 2) for x in g.values())
    )
    want = {k: np.asarray(v, np.float64) / (norm + eps) for k, v in g.items()}
  else:
    want = {k: unit(v, eps) for k, v in g.items()}
  assert_close(u, want)
  np.testing.assert_array_equal(u["zero"], 0.0)


def test_normalize_global_is_optax():
  _, grads_at = problem(7)
  g = grads_at(0)
  a, _ = sparseopt.normalize_updates("global", 1e-4).update(g, None)
  b, _ = optax.normalize_by_update_norm(eps=1e-4).update(g, None)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


def test_normalize_layer_bf16_and_errors():
  g = {"w": jnp.full((4, 4), 3.0, jnp.bfloat16)}
  u, _ = sparseopt.normalize_updates("layer").update(g, None)
  assert u["w"].dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(u["w"], np.float32), 0.25, rtol=1e-2)
  with pytest.raises(ValueError, match="scope"):
    sparseopt.normalize_updates("neuron")


def test_renormalization_ablation_arms():
  # The two arms differ only by SparseOpt's per-neuron factors: with the
  # same masks and gradients both updates have the same norm.
  params, masks, grads_at = sparse_problem()
  lr = 0.1
  baseline = optax.chain(
      optax.normalize_by_update_norm(), optax.sgd(lr, momentum=0.9)
  )
  corrected = optax.chain(
      sparseopt.scale_by_sparseopt(),
      optax.normalize_by_update_norm(),
      optax.sgd(lr, momentum=0.9),
  )
  g = grads_at(0)
  a, _ = baseline.update(g, baseline.init(params), params, masks=masks)
  b, _ = corrected.update(g, corrected.init(params), params, masks=masks)
  np.testing.assert_allclose(optax.tree.norm(a), optax.tree.norm(b), rtol=1e-5)
  assert not np.allclose(a["dense"], b["dense"])


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_normalize_under_inject_hyperparams(scope):
  _, grads_at = problem(8)
  g = grads_at(0)
  tx = optax.inject_hyperparams(sparseopt.normalize_updates)(scope, eps=0.5)
  state = tx.init(g)
  step = jax.jit(tx.update)
  u, state = step(g, state)
  want, _ = sparseopt.normalize_updates(scope, eps=0.5).update(g, None)
  for k in want:
    np.testing.assert_allclose(u[k], want[k], rtol=1e-6)
  state.hyperparams["eps"] = jnp.asarray(0.0)
  u0, _ = step(g, state)
  want0, _ = sparseopt.normalize_updates(scope, eps=0.0).update(g, None)
  for k in want0:
    np.testing.assert_allclose(u0[k], want0[k], rtol=1e-6)
