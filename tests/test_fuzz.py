"""Hypothesis fuzzing of the public transforms on random pytrees.

Random trees of 1-4 leaves with random shapes (ndim 1-4), dtypes (float32,
bfloat16, float16), masks (random, dense, empty, or None), neuron axes and
correction kinds. From finite inputs a transform must return finite
outputs of the same shapes and dtypes, or raise one of its documented
errors (ValueError/TypeError naming the leaf); nothing else.
"""

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax

import sparseopt_jax as sparseopt

DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


@st.composite
def problems(draw):
  n_leaves = draw(st.integers(1, 4))
  seed = draw(st.integers(0, 2**31 - 1))
  rng = np.random.default_rng(seed)
  dtype = draw(st.sampled_from(DTYPES))
  params, grads, masks = {}, {}, {}
  for i in range(n_leaves):
    ndim = draw(st.integers(1, 4))
    shape = tuple(
        draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim))
    )
    kind = draw(st.sampled_from(["random", "dense", "empty", "none"]))
    if kind == "none" or ndim < 2:
      mask = None
    elif kind == "dense":
      mask = np.ones(shape, bool)
    elif kind == "empty":
      mask = np.zeros(shape, bool)
    else:
      mask = rng.random(shape) < draw(st.floats(0.0, 1.0))
    w = rng.standard_normal(shape) * 3
    if mask is not None:
      w = w * mask
    params[f"layer{i}"] = jnp.asarray(w, dtype)
    grads[f"layer{i}"] = jnp.asarray(rng.standard_normal(shape) * 10, dtype)
    masks[f"layer{i}"] = None if mask is None else jnp.asarray(mask)
  return params, grads, masks


def _check(out, ref):
  assert jax.tree.structure(out) == jax.tree.structure(ref)
  for o, r in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
    assert o.shape == r.shape and o.dtype == r.dtype
    assert bool(jnp.all(jnp.isfinite(o.astype(jnp.float32))))


def _documented(exc: Exception) -> bool:
  # Documented errors name what was wrong: a parameter path or the argument.
  return isinstance(exc, (ValueError, TypeError)) and (
      "layer" in str(exc) or "neuron_axis" in str(exc)
  )


@hypothesis.settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=list(hypothesis.HealthCheck),
)
@hypothesis.given(
    problem=problems(),
    neuron_axis=st.integers(-5, 4),
    which=st.sampled_from(
        ["fan_in", "norm", "zero", "alias", "adam", "derived"]
    ),
)
def test_transforms_on_random_trees(problem, neuron_axis, which):
  params, grads, masks = problem
  if which == "zero":
    tx, kw = sparseopt.zero_masked_updates(), {"masks": masks}
  elif which == "alias":
    tx, kw = sparseopt.sparseopt(
        0.1, weight_decay=1e-3, neuron_axis=neuron_axis
    ), {"masks": masks}
  elif which == "adam":
    tx = optax.chain(
        sparseopt.scale_by_sparseopt(neuron_axis=neuron_axis), optax.adam(1e-3)
    )
    kw = {"masks": masks}
  elif which == "derived":  # masks from params != 0
    tx, kw = sparseopt.scale_by_sparseopt(neuron_axis=neuron_axis), {}
  else:
    tx = sparseopt.scale_by_sparseopt(neuron_axis=neuron_axis, correction=which)
    kw = {"masks": masks}
  try:
    state = tx.init(params)
    out, _ = jax.jit(lambda g, s, p, kw: tx.update(g, s, p, **kw))(
        grads, state, params, kw
    )
  except Exception as exc:  # pylint: disable=broad-except
    if not _documented(exc):
      raise
    # The only documented error here: a neuron axis outside some leaf.
    ndims = [np.ndim(p) for p in jax.tree.leaves(params)]
    assert any(not -n <= neuron_axis < n for n in ndims if n >= 2), exc
    return
  if which == "adam":
    # Adam itself is not finite everywhere: in float16 its eps (1e-8)
    # underflows, so a zero gradient gives 0/0. Hold the chain to plain
    # Adam's standard on the gradient SparseOpt hands it: no worse.
    plain = optax.adam(1e-3)
    scaled, _ = sparseopt.scale_by_sparseopt(neuron_axis=neuron_axis).update(
        grads, None, params, masks=masks
    )
    ref_out, _ = plain.update(scaled, plain.init(params), params)
    ok = jax.tree.map(lambda r: jnp.isfinite(r.astype(jnp.float32)), ref_out)
    out = jax.tree.map(lambda o, k: jnp.where(k, o, 0), out, ok)
  _check(out, grads)
  if which in ("fan_in", "derived"):
    # Dense leaves (mask None) pass through untouched.
    for name, m in masks.items():
      if m is None and which == "fan_in":
        np.testing.assert_array_equal(out[name], grads[name])


@hypothesis.settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=list(hypothesis.HealthCheck),
)
@hypothesis.given(
    problem=problems(),
    method=st.sampled_from(["rigl", "set", "static"]),
    corrupt=st.sampled_from([None, "nan", "inf"]),
)
def test_dynamic_sparse_on_random_trees(problem, method, corrupt):
  params, grads, masks = problem
  if corrupt:
    # Non-finite gradients may give non-finite weights, but never break the
    # masks' exact counts. (A non-finite weight that is then pruned cannot be
    # zeroed by an additive update; optax.apply_if_finite keeps such steps
    # out, see test_dst.)
    grads = jax.tree.map(
        lambda g: g.at[(0,) * g.ndim].set(
            jnp.nan if corrupt == "nan" else jnp.inf
        ),
        grads,
    )
  tx = sparseopt.dynamic_sparse(
      optax.chain(sparseopt.scale_by_sparseopt(), optax.sgd(0.1, 0.9)),
      masks,
      method=method,
      update_every=1,
      end_step=10,
      key=jax.random.key(0),
  )
  state = tx.init(params)
  step = jax.jit(tx.update)
  counts = {k: None if m is None else int(m.sum()) for k, m in masks.items()}
  for _ in range(3):
    updates, state = step(grads, state, params)
    finite_before = jax.tree.map(jnp.isfinite, params)
    params = optax.apply_updates(params, updates)
    live = sparseopt.get_masks(state)
    for k, m in live.items():
      if m is not None:
        assert int(m.sum()) == counts[k]
        pruned = ~m & finite_before[k]
        assert bool(jnp.all(params[k][pruned] == 0))
    if not corrupt:
      _check(updates, grads)
