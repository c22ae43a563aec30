"""Structured masks (constant fan-in, N:M) for init, RigL/SET and GMP.

Property tests: after init and after every mask update each neuron has
exactly its ``k`` active inputs (``"constant_fan_in"``) or each group of
``m`` consecutive inputs exactly ``n`` (N:M), and SparseOpt's factor is
exactly 1.
"""

import functools
import math

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparseopt_jax as sparseopt
from sparseopt_jax import diagnostics
import reference as ref

# Every fan-in (8, 36, 8) is a multiple of 4 and of 2.
SHAPES = {"dense": (8, 6), "conv": (3, 3, 4, 5), "conv1x1": (1, 1, 8, 4)}
STRUCTURES = ["constant_fan_in", (2, 4), (1, 4), (3, 4), (1, 2)]
N_STEPS = 6

SETTINGS = dict(
    max_examples=10,
    deadline=None,
    suppress_health_check=list(hypothesis.HealthCheck),
)


def make_params(seed):
  rng = np.random.default_rng(seed)
  params = {
      n: {"kernel": jnp.asarray(rng.standard_normal(s), jnp.float32)}
      for n, s in SHAPES.items()
  }
  params["dense"]["bias"] = jnp.zeros(6)
  return params


def rows(mask, axis=-1):
  """(neurons, fan_in) in C order of the non-neuron axes, NumPy."""
  m = np.moveaxis(np.asarray(mask), axis, -1)
  return m.reshape(-1, m.shape[-1]).T


def group_counts(mask, structure, axis=-1):
  r = rows(mask, axis)
  if isinstance(structure, tuple):
    r = r.reshape(-1, structure[1])
  return r.sum(axis=1)


def sparsity_for(structure, s):
  return (
      1.0 - structure[0] / structure[1] if isinstance(structure, tuple) else s
  )


def assert_unit_scale(scale):
  np.testing.assert_array_equal(
      np.asarray(scale), np.ones(np.shape(scale), np.float32)
  )


def test_fan_in_scale_is_exactly_one_on_equal_counts():
  mask = sparseopt.init_masks(
      jax.random.key(0),
      {"w": jnp.ones((16, 5))},
      1 - 11 / 16,
      "uniform",
      structure="constant_fan_in",
  )["w"]
  assert np.all(np.asarray(mask).sum(axis=0) == 11)
  assert np.all(np.asarray(diagnostics.fan_in_scale(mask)) == 1.0)


def check_structure(masks, structure, want=None, axis=-1):
  """Exact structure; ``want``: {name: active count per group}."""
  for path, m in jax.tree_util.tree_leaves_with_path(
      masks, is_leaf=lambda x: x is None
  ):
    if m is None:
      continue
    name = sparseopt.path_str(path)
    counts = group_counts(m, structure, axis)
    if isinstance(structure, tuple):
      assert np.all(counts == structure[0]), (name, counts)
    else:
      assert counts.min() == counts.max(), (name, counts)
    if want is not None:
      assert np.all(counts == want[name]), (name, counts, want[name])
    # SparseOpt's factor is exactly 1 under both structured options.
    assert_unit_scale(diagnostics.fan_in_scale(m, axis))


# ----------------------------------------------------------------- masks


@hypothesis.settings(**SETTINGS)
@hypothesis.given(
    seed=st.integers(0, 2**31 - 1),
    structure=st.sampled_from(STRUCTURES),
    s=st.sampled_from([0.0, 0.3, 0.5, 0.9, 0.99]),
    distribution=st.sampled_from(["erk", "uniform"]),
    magnitude=st.booleans(),
)
def test_property_init_masks_exact_structure(
    seed, structure, s, distribution, magnitude
):
  params = make_params(seed)
  s = sparsity_for(structure, s)
  if magnitude:
    masks = sparseopt.magnitude_masks(
        params, s, distribution, structure=structure
    )
  else:
    masks = sparseopt.init_masks(
        jax.random.key(seed), params, s, distribution, structure=structure
    )
  dens = sparseopt.layer_densities(params, s, distribution)
  want = {}
  for n, d in dens.items():
    fan_in = math.prod(SHAPES[n.split("/")[0]][:-1])
    want[n] = (
        structure[0]
        if isinstance(structure, tuple)
        else min(fan_in, max(1, ref.exact_count(d, fan_in)))
    )
  check_structure(masks, structure, want)
  assert masks["dense"]["bias"] is None
  if magnitude:  # each group keeps its own largest |w|, ties to lower index
    for n in ("dense", "conv", "conv1x1"):
      w = rows(np.abs(np.asarray(params[n]["kernel"])))
      got = rows(masks[n]["kernel"])
      if isinstance(structure, tuple):
        w, got = w.reshape(-1, structure[1]), got.reshape(-1, structure[1])
      for wr, gr in zip(w, got):
        k = int(gr.sum())
        np.testing.assert_array_equal(
            np.sort(np.flatnonzero(gr)), np.sort(ref.topk_flat(wr, k))
        )


def test_unstructured_is_unchanged():
  params = make_params(0)
  key = jax.random.key(1)
  a = sparseopt.init_masks(key, params, 0.7)
  b = sparseopt.init_masks(key, params, 0.7, structure="unstructured")
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  # The top-k of the per-leaf random scores, as before structures existed.
  dens = sparseopt.layer_densities(params, 0.7)
  for i, (n, d) in enumerate(dens.items()):
    leaf = params[n.split("/")[0]]["kernel"]
    scores = jax.random.uniform(jax.random.fold_in(key, i), leaf.shape)
    k = ref.exact_count(d, leaf.size)
    idx = np.sort(ref.topk_flat(np.asarray(scores), k))
    got = np.flatnonzero(np.asarray(a[n.split("/")[0]]["kernel"]).reshape(-1))
    np.testing.assert_array_equal(got, idx)


def test_nm_groups_run_along_cin_and_neuron_axis():
  params = {"conv": jnp.ones((3, 3, 8, 5)), "t": jnp.ones((6, 12))}
  masks = sparseopt.init_masks(
      jax.random.key(0), {"conv": params["conv"]}, 0.5, structure=(2, 4)
  )
  # Groups of 4 consecutive Cin at each (h, w, neuron).
  per_group = np.asarray(masks["conv"]).reshape(3, 3, 2, 4, 5).sum(axis=3)
  assert np.all(per_group == 2)
  # neuron_axis=0: a (out, in) kernel, groups along the input axis.
  masks = sparseopt.init_masks(
      jax.random.key(0),
      {"t": params["t"]},
      1 / 3,
      structure="constant_fan_in",
      neuron_axis=0,
  )
  assert np.all(np.asarray(masks["t"]).sum(axis=1) == 8)
  assert_unit_scale(diagnostics.fan_in_scale(masks["t"], 0))


def test_mask_errors():
  params = {
      "a": {"kernel": jnp.ones((6, 4))},
      "b": {"kernel": jnp.ones((8, 4))},
  }
  with pytest.raises(ValueError, match=r"'a/kernel'.*multiple of m=4"):
    sparseopt.init_masks(jax.random.key(0), params, 0.5, structure=(2, 4))
  with pytest.raises(ValueError, match=r"1 - 1/4"):
    sparseopt.init_masks(jax.random.key(0), params, 0.5, structure=(1, 4))
  with pytest.raises(ValueError, match=r"overrides"):
    sparseopt.init_masks(
        jax.random.key(0),
        {"b": params["b"]},
        0.5,
        structure=(2, 4),
        overrides={"b": 0.5},
    )
  with pytest.raises(ValueError, match=r"Unknown structure 'block'"):
    sparseopt.init_masks(jax.random.key(0), params, 0.5, structure="block")
  with pytest.raises(ValueError, match=r"1 <= n <= m"):
    sparseopt.init_masks(jax.random.key(0), params, 0.5, structure=(5, 4))
  with pytest.raises(TypeError, match=r"structure must be"):
    sparseopt.init_masks(jax.random.key(0), params, 0.5, structure=(2.0, 4))
  with pytest.raises(ValueError, match=r"'v'.*two axes"):
    sparseopt.init_masks(
        jax.random.key(0),
        {"v": jnp.ones(8)},
        0.5,
        structure="constant_fan_in",
        filter_fn=lambda p, x: True,
    )


# ------------------------------------------------------ RigL / SET / GMP


@functools.partial(jax.jit, static_argnames=("method", "structure"))
def scan_dst(params, masks, grads, key, fraction, *, method, structure):
  """Wrapper built inside jit: one compilation per (method, structure)."""
  tx = sparseopt.dynamic_sparse(
      optax.chain(sparseopt.scale_by_sparseopt(), optax.sgd(0.1, 0.9)),
      masks,
      method=method,
      update_every=1,
      end_step=N_STEPS,
      drop_schedule=lambda t: fraction,
      key=key,
      structure=structure,
  )

  def body(carry, g):
    p, s = carry
    u, s = tx.update(g, s, p)
    return (optax.apply_updates(p, u), s), (s.masks, p, s.num_changed)

  _, hist = jax.lax.scan(body, (params, tx.init(params)), grads)
  return hist


@hypothesis.settings(**SETTINGS)
@hypothesis.given(
    seed=st.integers(0, 2**31 - 1),
    structure=st.sampled_from(["constant_fan_in", (2, 4), (1, 2)]),
    method=st.sampled_from(["rigl", "set"]),
    frac16=st.integers(0, 16),
)
def test_property_dst_keeps_structure_exactly(seed, structure, method, frac16):
  fraction = frac16 / 16
  params = make_params(seed)
  masks = sparseopt.init_masks(
      jax.random.key(seed),
      params,
      sparsity_for(structure, 0.6),
      "uniform",
      structure=structure,
  )
  params = sparseopt.apply_masks(params, masks)
  rng = np.random.default_rng(seed)
  grads = jax.tree.map(
      lambda p: jnp.asarray(
          rng.standard_normal((N_STEPS,) + p.shape), jnp.float32
      ),
      params,
  )
  masks_h, params_h, changed_h = scan_dst(
      params,
      masks,
      grads,
      jax.random.key(seed),
      jnp.float32(fraction),
      method=method,
      structure=structure,
  )
  want = {
      n: group_counts(m, structure)
      for n, m in {f"{k}/kernel": masks[k]["kernel"] for k in SHAPES}.items()
  }
  check_structure(masks, structure, want)
  prev = {k: np.asarray(masks[k]["kernel"]) for k in SHAPES}
  for t in range(N_STEPS):
    now = jax.tree.map(lambda x, t=t: x[t], masks_h)
    check_structure(now, structure, want)
    for k in SHAPES:
      new = np.asarray(now[k]["kernel"])
      if method == "rigl" and 0 < t < N_STEPS:
        # Per group, RigL's drop/grow of the NumPy reference.
        w_in = np.asarray(params_h[k]["kernel"][t])
        g = np.abs(np.asarray(grads[k]["kernel"][t]))
        view = lambda x: (  # noqa: E731
            rows(x).reshape(-1, structure[1])
            if isinstance(structure, tuple)
            else rows(x)
        )
        want_rows = [
            ref.drop_grow(m, w, s, fraction)[0]
            for m, w, s in zip(view(prev[k]), view(w_in), view(g))
        ]
        np.testing.assert_array_equal(view(new), np.stack(want_rows))
      elif t == 0:
        np.testing.assert_array_equal(new, prev[k])
      prev[k] = new


@hypothesis.settings(**SETTINGS)
@hypothesis.given(
    seed=st.integers(0, 2**31 - 1),
    structure=st.sampled_from(STRUCTURES),
    s=st.sampled_from([0.5, 0.9]),
)
def test_property_gmp_keeps_structure_exactly(seed, structure, s):
  s = sparsity_for(structure, s)
  t0, t1, every = 0, 4, 1
  params = make_params(seed)
  tx = sparseopt.gradual_pruning(
      optax.sgd(0.01),
      s,
      start_step=t0,
      end_step=t1,
      update_every=every,
      structure=structure,
  )
  dens = sparseopt.layer_densities(params, s, "erk")
  step, state = jax.jit(tx.update), tx.init(params)
  prev = None
  for t in range(6):
    g = jax.tree.map(lambda p, t=t: jnp.full_like(p, 0.1 * t), params)
    _, state = step(g, state, params)
    masks = sparseopt.get_masks(state)
    r = 1.0 - (1.0 - min(t, t1) / t1) ** 3
    want = {}
    for n, d in dens.items():
      fan_in = math.prod(SHAPES[n.split("/")[0]][:-1])
      size = structure[1] if isinstance(structure, tuple) else fan_in
      final = (
          structure[0]
          if isinstance(structure, tuple)
          else min(fan_in, max(1, ref.exact_count(d, fan_in)))
      )
      want[n] = size - math.floor(r * (size - final))
    # Before end_step an N:M group holds n < kept <= m, the same in
    # every group; from end_step on exactly n.
    counts = {
        f"{k}/kernel": group_counts(masks[k]["kernel"], structure)
        for k in SHAPES
    }
    for n in want:
      assert np.all(counts[n] == want[n]), (t, n, counts[n], want[n])
      assert_unit_scale(
          diagnostics.fan_in_scale(masks[n.split("/")[0]]["kernel"])
      )
    if t >= t1:
      check_structure(masks, structure, want)
    if prev is not None:
      for k in SHAPES:
        assert not np.any(np.asarray(masks[k]["kernel"]) & ~prev[k])
    prev = {k: np.asarray(masks[k]["kernel"]) for k in SHAPES}


def test_dst_errors():
  params = make_params(0)
  masks = sparseopt.init_masks(jax.random.key(0), params, 0.5, "uniform")
  kw = dict(end_step=10, key=jax.random.key(0))
  with pytest.raises(ValueError, match=r"'conv/kernel'.*constant fan-in"):
    sparseopt.dynamic_sparse(
        optax.sgd(0.1), masks, structure="constant_fan_in", **kw
    )
  with pytest.raises(ValueError, match=r"'conv/kernel'.*is not 2:4"):
    sparseopt.dynamic_sparse(optax.sgd(0.1), masks, structure=(2, 4), **kw)
  bad = {"a": jnp.ones((6, 4), bool)}
  with pytest.raises(ValueError, match=r"'a'.*multiple of m=4"):
    sparseopt.dynamic_sparse(optax.sgd(0.1), bad, structure=(2, 4), **kw)


def test_dst_with_concrete_structured_masks():
  # Built outside jit: the structure is checked and k_max bounded per group.
  params = make_params(3)
  for structure in ("constant_fan_in", (2, 4)):
    masks = sparseopt.init_masks(
        jax.random.key(0),
        params,
        sparsity_for(structure, 0.7),
        structure=structure,
    )
    p = sparseopt.apply_masks(params, masks)
    tx = sparseopt.dynamic_sparse(
        optax.chain(sparseopt.scale_by_sparseopt(), optax.sgd(0.1)),
        masks,
        update_every=1,
        end_step=10,
        drop_fraction=0.5,
        drop_schedule="constant",
        key=jax.random.key(1),
        structure=structure,
    )
    want = {
        f"{k}/kernel": group_counts(masks[k]["kernel"], structure)
        for k in SHAPES
    }
    step, state = jax.jit(tx.update), tx.init(p)
    moved = 0
    for t in range(4):
      u, state = step(grads_at(p, t), state, p)
      p = optax.apply_updates(p, u)
      now = sparseopt.get_masks(state)
      check_structure(now, structure, want)
      for k in SHAPES:
        assert np.all(
            np.asarray(p[k]["kernel"])[~np.asarray(now[k]["kernel"])] == 0
        )
      moved += int(sum(jax.tree.leaves(state.num_changed)))
    assert moved > 0


def grads_at(params, t):
  rng = np.random.default_rng(t)
  return jax.tree.map(
      lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), params
  )
