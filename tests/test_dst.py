"""Dynamic sparse training: RigL, SET, static; ITOP and skew diagnostics."""

import functools
import math
import re

import hypothesis
import hypothesis.strategies as st
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparseopt_jax as sparseopt
from sparseopt_jax import diagnostics
from sparseopt_jax._src import tree as tree_lib
import reference as ref

IS_NONE = lambda x: x is None  # noqa: E731


def flat(tree):
  return {
      sparseopt.path_str(p): x
      for p, x in jax.tree_util.tree_leaves_with_path(tree, is_leaf=IS_NONE)
  }


def make_tx(masks, method="rigl", inner=None, **kw):
  inner = optax.sgd(0.0) if inner is None else inner
  kw.setdefault("update_every", 1)
  kw.setdefault("end_step", 100)
  kw.setdefault("drop_schedule", "constant")
  kw.setdefault("key", jax.random.key(0))
  return sparseopt.dynamic_sparse(inner, masks, method=method, **kw)


def steps(tx, params, grads_list):
  """Runs jitted steps; returns [(masks_before, params_before, grads,
  updates, params_after, state_after)] per step."""
  step = jax.jit(tx.update)
  state = tx.init(params)
  out = []
  for g in grads_list:
    before = sparseopt.get_masks(state)
    updates, state = step(g, state, params)
    new_params = optax.apply_updates(params, updates)
    out.append((before, params, g, updates, new_params, state))
    params = new_params
  return out


# ----------------------------------------------------------- hand-checked


def test_rigl_hand_checked_drop_grow_and_ties():
  # One layer (2, 4), flat indices 0..7; active {0, 1, 2, 3}.
  # |w| on active = 0.1, 0.5, 0.1, 0.1: the three-way tie at 0.1 drops the
  # two lowest indices, 0 and 2. Growth by |g| among the previously inactive
  # {4..7} = 3, 1, 3, 3 picks 4 and 6 (ties to the lower index); index 0,
  # just dropped, has the largest gradient but must not be regrown.
  mask = jnp.array([[1, 1, 1, 1], [0, 0, 0, 0]], bool)
  w = jnp.array([[0.1, -0.5, -0.1, 0.1], [0.0, 0.0, 0.0, 0.0]])
  g = jnp.array([[100.0, 0.0, 0.0, 0.0], [-3.0, 1.0, 3.0, -3.0]])
  tx = make_tx({"w": mask}, "rigl", drop_fraction=0.5)
  hist = steps(tx, {"w": w}, [{"w": g}, {"w": g}])
  # Step 0 never updates the topology (count 0).
  np.testing.assert_array_equal(hist[0][5].masks["w"], mask)
  new = np.asarray(sparseopt.get_masks(hist[1][5])["w"]).reshape(-1)
  assert sorted(np.flatnonzero(new).tolist()) == [1, 3, 4, 6]
  p = np.asarray(hist[1][4]["w"]).reshape(-1)
  np.testing.assert_array_equal(p, np.float32([0, -0.5, 0, 0.1, 0, 0, 0, 0]))
  want, k = ref.drop_grow(mask, w, np.abs(g), 0.5)
  assert k == 2
  np.testing.assert_array_equal(new, want.reshape(-1))
  diag = diagnostics.dst_diagnostics(hist[1][5])
  assert float(diag["changed"]) == 2.0 and float(diag["w/changed"]) == 2.0
  # ITOP: 6 of 8 entries have been active.
  assert float(sparseopt.itop_rate(hist[1][5])) == pytest.approx(6 / 8)


def test_rigl_k_capped_by_inactive_and_floor():
  # 7 of 8 active, fraction 0.5: floor(3.5) = 3 but only 1 inactive entry.
  mask = jnp.array([[1, 1, 1, 1], [1, 1, 1, 0]], bool)
  w = jnp.arange(1.0, 9.0).reshape(2, 4) * mask
  tx = make_tx({"w": mask}, "rigl", drop_fraction=0.5)
  hist = steps(tx, {"w": w}, [{"w": jnp.ones((2, 4))}] * 2)
  new = np.asarray(sparseopt.get_masks(hist[1][5])["w"]).reshape(-1)
  # Drop the smallest (index 0), grow the only inactive one (index 7).
  assert np.flatnonzero(~new).tolist() == [0]
  assert int(hist[1][5].num_changed["w"]) == 1
  # fraction * active < 1 means no change at all.
  tx = make_tx({"w": mask}, "rigl", drop_fraction=0.1)
  hist = steps(tx, {"w": w}, [{"w": jnp.ones((2, 4))}] * 2)
  np.testing.assert_array_equal(sparseopt.get_masks(hist[1][5])["w"], mask)


def test_set_hand_checked():
  # SET drops like RigL (smallest |w|) and grows at random among the
  # previously inactive entries, never the ones just dropped.
  mask = jnp.array([[1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]], bool)
  params = {"w": jnp.array([[0.3, 0.1, 0.6, 0.2, 0.5, 0.4], [0.0] * 6])}
  grads = {"w": jnp.zeros((2, 6))}
  tx = make_tx({"w": mask}, "set", drop_fraction=0.5)
  step = jax.jit(tx.update)  # one compilation; the key lives in the state

  def grown_after_update(seed):
    state = tx.init(params)._replace(key=jax.random.key(seed))
    for _ in range(2):  # count 0: no update; count 1: update
      _, state = step(grads, state, params)
    return np.asarray(sparseopt.get_masks(state)["w"])

  grown_sets = set()
  for seed in range(6):
    new = grown_after_update(seed)
    # k = 3: the three smallest |w| (0.1, 0.2, 0.3 at 1, 3, 0) are dropped.
    assert new[0].tolist() == [False, False, True, False, True, True]
    assert new.sum() == 6 and new[1].sum() == 3
    grown_sets.add(tuple(np.flatnonzero(new[1])))
  np.testing.assert_array_equal(grown_after_update(5), new)  # same key
  assert len(grown_sets) > 1  # growth depends on the key


def test_grow_with_corrected_prefers_denser_neurons():
  # Neuron 0 keeps 3/4 inputs, neuron 1 keeps 1/4: factors
  # sqrt(.75)/sqrt(.5) = 1.22 and sqrt(.25)/sqrt(.5) = 0.71 (old masks).
  # The inactive candidates: (3, 0) with |g| 0.9, (1..3, 1) with |g| 1.0.
  # Raw growth takes the larger raw gradient, (1, 1); corrected takes
  # 0.9 * 1.22 = 1.10 > 1.0 * 0.71, i.e. (3, 0).
  mask = jnp.array([[1, 1], [1, 0], [1, 0], [0, 0]], bool)
  w = jnp.array([[0.05, 2.0], [1.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
  g = jnp.array([[0.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.9, 1.0]])
  result = {}
  for grow_with in ("raw", "corrected"):
    tx = make_tx({"w": mask}, "rigl", drop_fraction=0.25, grow_with=grow_with)
    hist = steps(tx, {"w": w}, [{"w": g}] * 2)
    result[grow_with] = np.asarray(sparseopt.get_masks(hist[1][5])["w"])
  for r in result.values():
    # k = 1: both drop (0, 0), |w| = 0.05, and keep the other active ones.
    assert not r[0, 0] and r[0, 1] and r[1, 0] and r[2, 0] and r.sum() == 4
  assert result["raw"][1, 1] and not result["raw"][3, 0]
  assert result["corrected"][3, 0] and not result["corrected"][1, 1]
  # Reference: corrected score = |c_i * g| with c from the old mask.
  c = ref.sparseopt_factor(np.asarray(mask))
  want, _ = ref.drop_grow(mask, w, np.abs(np.asarray(g) * c), 0.25)
  np.testing.assert_array_equal(result["corrected"], want)


def test_drop_fraction_schedule():
  f = sparseopt.drop_fraction_schedule(0.3, 1000, "cosine")
  for t in (0, 1, 100, 500, 999, 1000, 5000):
    assert float(f(jnp.int32(t))) == pytest.approx(
        ref.cosine_fraction(0.3, t, 1000), abs=1e-6
    )
  assert float(f(jnp.int32(0))) == pytest.approx(0.3)
  assert float(f(jnp.int32(500))) == pytest.approx(0.15, abs=1e-6)
  g = sparseopt.drop_fraction_schedule(0.2, 100, "constant")
  assert float(g(jnp.int32(77))) == pytest.approx(0.2)
  h = lambda t: 0.1  # noqa: E731
  assert sparseopt.drop_fraction_schedule(0.3, 10, h) is h
  with pytest.raises(ValueError, match=r"Unknown drop_schedule 'linear'"):
    sparseopt.drop_fraction_schedule(0.3, 10, "linear")


def test_cosine_schedule_drives_k():
  # 16 active, f=0.5, T_end=5, update_every=1: fractions
  # 0.25 (1 + cos(pi t / 5)) = 0.452, 0.327, 0.173, 0.048 -> k = 7, 5, 2, 0;
  # from t=5 on no update. (T_end=5 keeps every f * 16 away from an integer:
  # at an exact boundary, e.g. T_end=4, t=2, float32 cos(pi/2) < 0 gives
  # floor(3.9999998) = 3 where exact arithmetic gives 4.)
  rng = np.random.default_rng(0)
  mask = jnp.asarray(np.arange(32).reshape(4, 8) % 2 == 0)
  w = jnp.asarray(rng.normal(size=(4, 8))) * mask
  tx = make_tx(
      {"w": mask}, "rigl", drop_fraction=0.5, drop_schedule="cosine", end_step=5
  )
  grads = [{"w": jnp.asarray(rng.normal(size=(4, 8)))} for _ in range(7)]
  hist = steps(tx, {"w": w}, grads)
  ks = [int(h[5].num_changed["w"]) for h in hist]
  want = [math.floor(ref.cosine_fraction(0.5, t, 5) * 16) for t in (1, 2, 3, 4)]
  assert want == [7, 5, 2, 0]
  assert ks == [0] + want + [0, 0]  # num_changed holds the last update's
  for t in (1, 2, 3):
    changed = np.asarray(hist[t][0]["w"]) ^ np.asarray(hist[t][5].masks["w"])
    assert changed.sum() == 2 * want[t - 1]
  for t in (4, 5, 6):
    np.testing.assert_array_equal(hist[t][0]["w"], hist[t][5].masks["w"])


# --------------------------------------------------------- property tests

SHAPES = {"dense": (5, 4), "conv": (3, 3, 2, 3), "conv1x1": (1, 1, 3, 4)}
END_STEP = 5
N_STEPS = 8


def random_problem(seed, density):
  rng = np.random.default_rng(seed)
  params, masks = {}, {}
  for name, shape in SHAPES.items():
    size = math.prod(shape)
    k = int(round(density * size))
    m = np.zeros(size, bool)
    m[rng.permutation(size)[:k]] = True
    masks[name] = {"kernel": jnp.asarray(m.reshape(shape)), "bias": None}
    params[name] = {
        "kernel": jnp.asarray(
            rng.normal(size=shape) * m.reshape(shape), jnp.float32
        ),
        "bias": jnp.asarray(rng.normal(size=shape[-1]), jnp.float32),
    }
  grads = [
      jax.tree.map(
          lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params
      )
      for _ in range(N_STEPS)
  ]
  grads = jax.tree.map(lambda *xs: jnp.stack(xs), *grads)
  return params, masks, grads


@functools.partial(jax.jit, static_argnames=("method", "update_every"))
def scan_dst(params, masks, grads, key, fraction, *, method, update_every):
  """Builds the wrapper inside jit (masks, key and the drop fraction are
  traced) so one compilation serves every hypothesis example."""
  tx = sparseopt.dynamic_sparse(
      optax.chain(sparseopt.scale_by_sparseopt(), optax.sgd(0.1, 0.9)),
      masks,
      method=method,
      update_every=update_every,
      end_step=END_STEP,
      drop_schedule=lambda t: fraction,
      key=key,
  )

  def body(carry, g):
    p, s = carry
    u, s = tx.update(g, s, p)
    new_p = optax.apply_updates(p, u)
    trace = s.inner_state[1][0].trace
    return (new_p, s), (
        s.masks,
        new_p,
        trace,
        sparseopt.itop_rate(s),
        s.num_changed,
        p,
        s.masks_updated,
        s.inner_state[0].scales,
    )

  _, hist = jax.lax.scan(body, (params, tx.init(params)), grads)
  return hist


# One compilation per method (update_every=2 covers both updating and
# non-updating steps; consecutive updates are covered by the hand-checked
# tests with update_every=1).
@hypothesis.settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=list(hypothesis.HealthCheck),
)
@hypothesis.given(
    seed=st.integers(0, 2**31 - 1),
    density=st.sampled_from([0.05, 0.2, 0.5, 0.8, 1.0]),
    frac16=st.integers(0, 16),
    method=st.sampled_from(["rigl", "set", "static"]),
    update_every=st.sampled_from([2]),
)
def test_property_dst_invariants(seed, density, frac16, method, update_every):
  # Fractions are multiples of 1/16 so fraction * active is exact in float32
  # and the floor agrees with the float64 reference.
  fraction = frac16 / 16
  params, masks0, grads = random_problem(seed, density)
  hist = scan_dst(
      params,
      masks0,
      grads,
      jax.random.key(seed),
      jnp.float32(fraction),
      method=method,
      update_every=update_every,
  )
  hist = jax.tree.map(np.asarray, hist)
  (
      masks_h,
      params_h,
      trace_h,
      itop_h,
      changed_h,
      params_in,
      updated_h,
      scales_h,
  ) = hist
  counts0 = {n: int(m.sum()) for n, m in flat(masks0).items() if m is not None}
  total = sum(math.prod(s) for s in SHAPES.values())
  prev_masks = {
      n: np.asarray(m) for n, m in flat(masks0).items() if m is not None
  }
  prev_itop = sum(counts0.values()) / total
  ever = {n: m.copy() for n, m in prev_masks.items()}
  for t in range(N_STEPS):
    is_update = t > 0 and t % update_every == 0 and t < END_STEP
    assert bool(updated_h[t]) == (is_update and method != "static"), t
    for name in SHAPES:
      n = f"{name}/kernel"
      new = masks_h[name]["kernel"][t]
      old = prev_masks[n]
      assert int(new.sum()) == counts0[n], (t, n)  # exact counts
      # SparseOpt's cached factors follow the masks it was given (those
      # before this step's mask update), refreshed by masks_updated=.
      np.testing.assert_allclose(
          scales_h[name]["kernel"][t],
          ref.sparseopt_factor(old),
          rtol=1e-6,
          err_msg=f"{t} {n}",
      )
      p_after = params_h[name]["kernel"][t]
      # Inactive weights (incl. just dropped) are exactly zero.
      assert np.all(p_after[~new] == 0), (t, n)
      grown = new & ~old
      assert np.all(p_after[grown] == 0)  # grown weights start at zero
      assert np.all(trace_h[name]["kernel"][t][grown] == 0)  # no momentum
      assert np.all(trace_h[name]["kernel"][t][old & ~new] == 0)
      if method == "static" or not is_update:
        np.testing.assert_array_equal(new, old, err_msg=f"{t} {n}")
        continue
      g = grads[name]["kernel"][t]
      w = params_in[name]["kernel"][t]
      if method == "rigl":
        want, k = ref.drop_grow(old, w, np.abs(np.asarray(g)), fraction)
        np.testing.assert_array_equal(new, want, err_msg=f"{t} {n}")
      else:
        # SET: the drop is deterministic; growth is random among the
        # previously inactive.
        want, k = ref.drop_grow(old, w, np.zeros(old.shape), fraction)
        np.testing.assert_array_equal(new & old, want & old)
        assert not np.any(grown & old) and int(grown.sum()) == k
      assert int(changed_h[name]["kernel"][t]) == k
      ever[n] |= new
    for name in SHAPES:
      prev_masks[f"{name}/kernel"] = masks_h[name]["kernel"][t]
    itop = float(itop_h[t])
    assert itop >= prev_itop - 1e-7  # monotone
    assert sum(counts0.values()) / total - 1e-6 <= itop <= 1.0 + 1e-6
    assert itop == pytest.approx(
        sum(e.sum() for e in ever.values()) / total, abs=1e-6
    )
    prev_itop = itop
    # Biases (dense) get their plain SGD updates: never frozen.
    assert np.all(params_h[name]["bias"][t] != params_in[name]["bias"][t])


# ------------------------------------------------------------ inner state


def mlp_problem(seed=0):
  rng = np.random.default_rng(seed)
  params = {
      "a": {
          "kernel": jnp.asarray(rng.normal(size=(6, 8)), jnp.float32),
          "bias": jnp.zeros(8),
      },
      "b": {"kernel": jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)},
  }
  masks = sparseopt.init_masks(jax.random.key(seed), params, 0.5, "uniform")
  params = sparseopt.apply_masks(params, masks)
  grads = [
      jax.tree.map(
          lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params
      )
      for _ in range(4)
  ]
  return params, masks, grads


@pytest.mark.parametrize(
    "opt,moments",
    [
        (lambda: optax.sgd(0.1, momentum=0.9), ("trace",)),
        (lambda: optax.adam(0.1), ("mu", "nu")),
        (lambda: optax.adamw(0.1, weight_decay=0.1), ("mu", "nu")),
    ],
)
@pytest.mark.parametrize("method", ["rigl", "set"])
def test_inner_moments_reset_at_changed_positions(opt, moments, method):
  params, masks, grads = mlp_problem()
  tx = make_tx(
      masks,
      method,
      inner=optax.chain(sparseopt.scale_by_sparseopt(), opt()),
      update_every=2,
      drop_fraction=0.5,
  )
  hist = steps(tx, params, grads)
  old, _, _, _, new_params, state = hist[2]  # step with count 2 updates
  new = state.masks
  for moment in moments:
    tree = optax.tree.get(state.inner_state, moment)
    prev = optax.tree.get(hist[1][5].inner_state, moment)
    for n in ("a/kernel", "b/kernel"):
      o, m = np.asarray(flat(old)[n]), np.asarray(flat(new)[n])
      changed = o ^ m
      assert changed.sum() > 0
      x = np.asarray(flat(tree)[n])
      np.testing.assert_array_equal(x[changed], 0.0, err_msg=f"{moment} {n}")
      # Kept connections keep (nonzero) moments.
      assert np.all(x[o & m] != 0), (moment, n)
      assert np.all(np.asarray(flat(prev)[n])[o & m] != 0)
    # Dense leaves are untouched by the reset.
    assert np.all(np.asarray(tree["a"]["bias"]) != 0)
  # And the weights obey the topology.
  for n in ("a/kernel", "b/kernel"):
    p = np.asarray(flat(new_params)[n])
    assert np.all(p[~np.asarray(flat(new)[n])] == 0)


def test_reset_changed_moments_generic():
  # Any params-shaped subtree is reset, scalars and other shapes are kept,
  # whatever the state classes (here MultiSteps around adam).
  params = {"w": jnp.ones((2, 3)), "b": jnp.ones(3)}
  state = optax.MultiSteps(optax.adam(0.1), 2).init(params)
  state = jax.tree.map(lambda x: jnp.ones_like(x) if x.ndim else x, state)
  changed = {
      "w": jnp.array([[True, False, False], [False, False, True]]),
      "b": None,
  }
  out = sparseopt.reset_changed_moments(state, params, changed)
  for path, leaf in jax.tree_util.tree_leaves_with_path(out):
    name = jax.tree_util.keystr(path)
    if leaf.shape == (2, 3):
      np.testing.assert_array_equal(
          leaf, np.where(changed["w"], 0.0, 1.0), err_msg=name
      )
    elif leaf.shape == (3,):
      np.testing.assert_array_equal(leaf, 1.0, err_msg=name)
  assert int(out.mini_step) == int(state.mini_step)


# ------------------------------------------------ the mask-update flag


def _recorder():
  """An inner transform whose state is the last ``masks_updated=`` seen."""

  def update(updates, state, params=None, *, masks_updated=None, **extra):
    del state, params, extra
    return updates, jnp.asarray(masks_updated, bool)

  return optax.GradientTransformationExtraArgs(
      lambda params: jnp.zeros([], bool), update
  )


@pytest.mark.parametrize("method", ["rigl", "set", "static"])
def test_masks_updated_follows_the_schedule(method):
  params, masks, grads = mlp_problem()
  update_every, end_step, n = 3, 10, 13
  dst = make_tx(
      masks,
      method,
      inner=optax.chain(_recorder(), optax.sgd(0.1)),
      update_every=update_every,
      end_step=end_step,
  )
  # Nested in a chain, as in a training script: the accessor finds it.
  tx = optax.chain(optax.clip_by_global_norm(10.0), dst)
  state = tx.init(params)
  assert not bool(sparseopt.masks_updated(state))
  step = jax.jit(tx.update)
  flags, forwarded, masks_seen = [], [], [sparseopt.get_masks(state)]
  for t in range(n):
    u, state = step(grads[t % len(grads)], state, params)
    params = optax.apply_updates(params, u)
    flags.append(bool(sparseopt.masks_updated(state)))
    forwarded.append(bool(state[1].inner_state[0]))
    masks_seen.append(sparseopt.get_masks(state))
  # The update called with count t produced a mask update iff t is on the
  # schedule; the state it returns says so.
  want = [
      method != "static" and 0 < t < end_step and t % update_every == 0
      for t in range(n)
  ]
  assert flags == want
  # The inner transform is told at the first step and after each update.
  assert forwarded == [t == 0 or want[t - 1] for t in range(n)]
  if method != "static":
    # The flag marks real changes here (drop fraction > 0 on every update).
    for t in range(n):
      changed = not np.array_equal(
          masks_seen[t]["a"]["kernel"], masks_seen[t + 1]["a"]["kernel"]
      )
      assert changed == want[t], t


def _eqns(jaxpr, inside=False):
  """(primitive, operand avals, inside a cond or loop body) for every eqn."""
  for eqn in jaxpr.eqns:
    yield eqn.primitive.name, [v.aval for v in eqn.invars], inside
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      yield from _eqns(sub, inside or eqn.primitive.name in ("cond", "while"))


def test_normal_step_never_counts_masks():
  # Counting masks (SparseOpt's factors) and ranking weights (RigL) must
  # only happen inside the lax.cond branch (SparseOpt's recount) and the
  # loop body (RigL's mask update) that run at mask updates.
  params, masks, grads = mlp_problem()
  tx = make_tx(
      masks,
      "rigl",
      update_every=100,
      end_step=1000,
      inner=optax.chain(
          sparseopt.scale_by_sparseopt(), optax.sgd(0.1, momentum=0.9)
      ),
  )
  state = tx.init(params)
  jaxpr = jax.make_jaxpr(tx.update)(grads[0], state, params).jaxpr
  # RigL ranks flattened layers, so their flat shapes count too.
  mask_shapes = {
      s for m in jax.tree.leaves(masks) for s in (m.shape, (m.size,))
  }
  costly = (
      "reduce_sum",
      "reduce_or",
      "reduce_and",
      "reduce_max",
      "reduce_min",
      "argmax",
      "argmin",
      "top_k",
      "sort",
      "cumsum",
  )
  found = [
      (name, inside)
      for name, avals, inside in _eqns(jaxpr)
      if name in costly
      and any(getattr(a, "shape", None) in mask_shapes for a in avals)
  ]
  assert found, "no reductions over masks at all: the check is vacuous"
  assert all(inside for _, inside in found), found
  # Both caches are in play: SparseOpt's counts and RigL's top-k.
  names = {name for name, _ in found}
  assert "reduce_sum" in names and "top_k" in names


@pytest.mark.parametrize("method", ["rigl", "set", "static"])
def test_normal_step_reads_no_sparse_params(method):
  # Pruned weights are zeroed at count 0 (-params, whatever the caller's
  # params hold there) and then stay zero, so a normal step emits 0 there
  # without reading the params: outside the loop bodies, no equation may
  # read a sparse kernel's params (momentum SGD itself never reads them).
  params, masks, grads = mlp_problem()
  tx = make_tx(
      masks,
      method,
      update_every=100,
      end_step=1000,
      inner=optax.chain(
          sparseopt.scale_by_sparseopt(), optax.sgd(0.1, momentum=0.9)
      ),
  )
  state = tx.init(params)
  closed = jax.make_jaxpr(tx.update)(grads[0], state, params)
  n_params = len(jax.tree.leaves(params))
  param_vars = closed.jaxpr.invars[-n_params:]
  sparse = {
      v
      for v, m in zip(
          param_vars, jax.tree.leaves(masks, is_leaf=lambda x: x is None)
      )
      if m is not None
  }
  assert len(sparse) == 2
  readers = [
      e.primitive.name
      for e in closed.jaxpr.eqns
      if any(
          v in sparse for v in e.invars if isinstance(v, jax.extend.core.Var)
      )
  ]
  assert readers and set(readers) <= {"while"}, readers

  # Behaviour: params unmasked at count 0 are zeroed; at a later normal step
  # a pruned position gets exactly 0, live ones the inner update.
  def sparse_leaves(updates, params):
    for u, p, m in zip(
        jax.tree.leaves(updates),
        jax.tree.leaves(params),
        jax.tree.leaves(masks, is_leaf=lambda x: x is None),
    ):
      if m is not None:
        yield np.asarray(u), np.asarray(p), np.asarray(m)

  step = jax.jit(tx.update)
  dirty = jax.tree.map(lambda p: p + 1.0, params)
  updates, state = step(grads[0], state, dirty)
  for u, p, m in sparse_leaves(updates, dirty):
    np.testing.assert_array_equal(u[~m], -p[~m])
  params = optax.apply_updates(dirty, updates)
  updates, state = step(grads[1], state, params)
  for u, p, m in sparse_leaves(updates, params):
    assert np.all(p[~m] == 0) and np.all(u[~m] == 0)
    assert np.all(u[m] != 0)


@pytest.mark.parametrize("method", ["rigl", "set", "static"])
@pytest.mark.parametrize("inner", ["sgd", "adam"])
def test_donated_step_copies_no_kernel_buffer(method, inner):
  # The normal step's cost is one elementwise pass, as for a static mask:
  # with the state donated, no kernel-sized buffer (moment or mask) may be
  # copied in the entry computation. A cond around the mask update (or the
  # optimizer state passed through one) copies every sparse kernel's
  # moments and masks on every step; the loop dynamic_sparse uses does not.
  rng = np.random.default_rng(0)
  params = {
      f"l{i}": {"kernel": jnp.asarray(rng.normal(size=(64, 64)), jnp.float32)}
      for i in range(3)
  }
  masks = sparseopt.init_masks(jax.random.key(0), params, 0.9)
  params = sparseopt.apply_masks(params, masks)
  opt = {"sgd": optax.sgd(0.1, momentum=0.9), "adam": optax.adam(1e-3)}
  tx = make_tx(
      masks,
      method,
      inner=optax.chain(sparseopt.scale_by_sparseopt(), opt[inner]),
      update_every=10,
  )

  def step(state, g, p):
    updates, state = tx.update(g, state, p)
    return state, updates

  hlo = (
      jax.jit(step, donate_argnums=0)
      .lower(tx.init(params), params, params)
      .compile()
      .as_text()
  )
  entry = hlo[hlo.index("\nENTRY") :]
  entry = entry[: entry.index("\n}\n")]
  copies = re.findall(r"= (\w+)\[([\d,]*)\][^ ]* copy\(", entry)
  assert not [c for c in copies if c[1] == "64,64"], copies


def test_vmap_over_keys_equals_each_run():
  # Sweeps vmap whole runs over seeds: the gated mask update then runs for
  # the batch when any member updates, and must give each member exactly
  # what its own run gives.
  params, masks, grads = mlp_problem()

  def run(key):
    tx = sparseopt.dynamic_sparse(
        optax.sgd(0.1, momentum=0.9),
        masks,
        method="set",
        update_every=2,
        end_step=100,
        key=key,
    )
    state, p = tx.init(params), params
    for g in grads:
      updates, state = tx.update(g, state, p)
      p = optax.apply_updates(p, updates)
    return p, sparseopt.get_masks(state)

  keys = jax.random.split(jax.random.key(3), 2)
  batched = jax.jit(jax.vmap(run))(keys)
  for i in range(2):
    one = jax.jit(run)(keys[i])
    for a, b in zip(jax.tree.leaves(batched), jax.tree.leaves(one)):
      np.testing.assert_array_equal(np.asarray(a)[i], np.asarray(b))


# --------------------------------------------------------- equivalence


def test_static_equals_manual_chain_step_for_step():
  params, masks, grads = mlp_problem(1)
  grads = grads * 3
  lr = 0.05
  dst = sparseopt.dynamic_sparse(
      optax.chain(sparseopt.scale_by_sparseopt(), optax.sgd(lr, 0.9)),
      masks,
      method="static",
      update_every=2,
      end_step=100,
      key=jax.random.key(0),
  )
  manual = optax.chain(
      sparseopt.scale_by_sparseopt(),
      optax.sgd(lr, 0.9),
      sparseopt.zero_masked_updates(),
  )
  sd, sm = dst.init(params), manual.init(params)
  pd = pm = params
  step_d = jax.jit(dst.update)
  step_m = jax.jit(lambda g, s, p: manual.update(g, s, p, masks=masks))
  for g in grads:
    ud, sd = step_d(g, sd, pd)
    um, sm = step_m(g, sm, pm)
    pd, pm = optax.apply_updates(pd, ud), optax.apply_updates(pm, um)
    for a, b in zip(jax.tree.leaves(pd), jax.tree.leaves(pm)):
      # Equal up to float rounding (the two programs fuse differently,
      # observed 1 ulp), and pruned entries exactly zero in both.
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
      np.testing.assert_array_equal(a == 0, b == 0)
  # Nontrivial: the params did move.
  assert not np.allclose(pd["a"]["kernel"], params["a"]["kernel"])


# ----------------------------------------------------- jit / sharding


def test_no_retrace_no_host_sync():
  params, masks, grads = mlp_problem()
  tx = make_tx(masks, "rigl", inner=sparseopt.sparseopt(0.1), update_every=2)
  traces = []

  @jax.jit
  def step(g, s, p):
    traces.append(1)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  state = tx.init(params)
  params, state = step(grads[0], state, params)  # compile
  before = sparseopt.get_masks(state)
  # Steps with count 1, 2 (mask update) and 3: no retrace, and no transfer
  # from device to host while stepping.
  with jax.transfer_guard_device_to_host("disallow"):
    for g in grads[1:]:
      params, state = step(g, state, params)
  assert len(traces) == 1
  assert not np.array_equal(before["a"]["kernel"], state.masks["a"]["kernel"])


def test_sharded_params_over_mesh():
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  devices = np.array(jax.devices())
  mesh = Mesh(devices, ("data",))
  replicated = NamedSharding(mesh, P())
  params, masks, grads = mlp_problem()
  tx = make_tx(masks, "rigl", inner=sparseopt.sparseopt(0.1), update_every=1)
  state = tx.init(params)
  ref_step = jax.jit(tx.update)
  want_u, want_s = ref_step(grads[0], state, params)
  want_u, want_s = ref_step(grads[1], want_s, params)
  put = lambda t: jax.device_put(t, replicated)  # noqa: E731
  sp, ss = put(params), put(state)
  u, ss = ref_step(put(grads[0]), ss, sp)
  u, ss = ref_step(put(grads[1]), ss, sp)
  for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(want_u)):
    np.testing.assert_array_equal(a, b)
    assert a.sharding.is_equivalent_to(replicated, a.ndim)
  np.testing.assert_array_equal(
      ss.masks["a"]["kernel"], want_s.masks["a"]["kernel"]
  )


# ------------------------------------------------------- state accessors


def test_accessors_inside_outside_jit_and_nested():
  params, masks, grads = mlp_problem()
  dst = make_tx(masks, "rigl", inner=sparseopt.sparseopt(0.1), update_every=1)
  tx = optax.chain(optax.clip_by_global_norm(10.0), dst)
  state = tx.init(params)
  step = jax.jit(tx.update)
  for g in grads[:3]:
    u, state = step(g, state, params)
    params = optax.apply_updates(params, u)
  outside = (
      sparseopt.get_masks(state),
      sparseopt.itop_rate(state),
      diagnostics.dst_diagnostics(state),
  )
  inside = jax.jit(
      lambda s: (
          sparseopt.get_masks(s),
          sparseopt.itop_rate(s),
          diagnostics.dst_diagnostics(s),
      )
  )(state)
  for a, b in zip(jax.tree.leaves(outside), jax.tree.leaves(inside)):
    # Not bitwise: XLA turns count / fan_in into count * (1 / fan_in) under
    # jit, so a full neuron's s_i is -3e-8 instead of 0 (see
    # test_masks.test_full_neuron_sparsity_exact_under_jit).
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  m = outside[0]
  assert m["a"]["bias"] is None
  ever = state[1].ever_active
  total = 48 + 24
  want_itop = (
      np.asarray(ever["a"]["kernel"]).sum()
      + np.asarray(ever["b"]["kernel"]).sum()
  ) / total
  assert float(outside[1]) == pytest.approx(want_itop)
  assert float(outside[1]) > 0.5  # rigl explored beyond the initial masks
  diag = outside[2]
  assert float(diag["sparsity"]) == pytest.approx(
      1
      - (
          np.asarray(m["a"]["kernel"]).sum()
          + np.asarray(m["b"]["kernel"]).sum()
      )
      / total
  )
  assert float(diag["changed"]) == float(diag["a/kernel/changed"]) + float(
      diag["b/kernel/changed"]
  )
  assert float(diag["changed"]) > 0
  for key in ("s_min", "s_mean", "s_max", "s_std", "amp_spread", "dead"):
    assert f"a/kernel/{key}" in diag
  with pytest.raises(ValueError, match=r"found 0"):
    sparseopt.get_masks(optax.sgd(0.1).init(params))


def test_skew_diagnostics_vs_reference():
  rng = np.random.default_rng(3)
  conv = rng.random((3, 3, 2, 5)) < 0.3
  conv[..., 1] = False  # a dead neuron
  dense = rng.random((6, 4)) < 0.6
  masks = {
      "conv": jnp.asarray(conv),
      "dense": jnp.asarray(dense),
      "b": None,
      "all_dead": jnp.zeros((3, 2), bool),
      "vec": jnp.ones((4,), bool),
  }  # 1-D sparse leaf: no neurons, skipped
  out = jax.jit(diagnostics.skew_diagnostics)(masks)
  assert not any(k.startswith("vec/") or k.startswith("b/") for k in out)
  for name, m in (
      ("conv", conv),
      ("dense", dense),
      ("all_dead", np.zeros((3, 2), bool)),
  ):
    want = ref.skew_stats(m)
    for key, v in want.items():
      assert float(out[f"{name}/{key}"]) == pytest.approx(v, abs=1e-5), (
          name,
          key,
      )
  assert float(out["conv/dead"]) >= 1 and float(out["conv/amp_spread"]) > 1
  assert float(out["all_dead/amp_spread"]) == 1.0
  # neuron_axis is honoured.
  out0 = diagnostics.skew_diagnostics({"d": jnp.asarray(dense)}, neuron_axis=0)
  assert float(out0["d/s_std"]) == pytest.approx(
      ref.skew_stats(dense, 0)["s_std"], abs=1e-5
  )


def _fan_in_histogram_reference(mask: np.ndarray, axis: int = -1) -> dict:
  """Bins by explicit comparison with powers of two, one neuron at a time."""
  moved = np.moveaxis(mask, axis, -1).reshape(-1, mask.shape[axis])
  fan_in, counts = moved.shape[0], moved.sum(axis=0)
  labels = {"0": lambda k: k == 0}
  width = 1
  while width <= fan_in:
    lo, hi = width, 2 * width
    label = str(lo) if hi == lo + 1 else f"{lo}-{hi - 1}"
    labels[label] = lambda k, lo=lo, hi=hi: lo <= k < hi
    width = hi
  return {
      label: sum(bool(f(int(k))) for k in counts) for label, f in labels.items()
  }


def test_fan_in_histogram_vs_reference():
  rng = np.random.default_rng(5)
  conv = rng.random((3, 3, 4, 7)) < 0.2
  conv[..., 0] = False  # an ablated neuron
  conv[..., 1] = True  # a full one: fan-in 36 lands in the 32-63 bin
  dense = rng.random((8, 5)) < 0.5  # fan-in 8 is a power of two: bin 8-15
  masks = {
      "conv": jnp.asarray(conv),
      "dense": jnp.asarray(dense),
      "b": None,
      "vec": jnp.ones((4,), bool),
  }
  out = jax.jit(diagnostics.fan_in_histogram)(masks)
  assert not any(k.startswith(("vec/", "b/")) for k in out)
  for name, m in (("conv", conv), ("dense", dense)):
    want = _fan_in_histogram_reference(m)
    got = {
        k.split("/fan_in/")[1]: float(v)
        for k, v in out.items()
        if k.startswith(f"{name}/")
    }
    assert got == want, name
    assert sum(got.values()) == m.shape[-1]
  assert out["conv/fan_in/0"] >= 1 and out["conv/fan_in/32-63"] >= 1
  assert "dense/fan_in/8-15" in out and "dense/fan_in/16-31" not in out
  # neuron_axis is honoured.
  out0 = diagnostics.fan_in_histogram({"d": jnp.asarray(dense)}, neuron_axis=0)
  want0 = _fan_in_histogram_reference(dense, 0)
  assert {k.split("/fan_in/")[1]: float(v) for k, v in out0.items()} == want0


# ------------------------------------------------------------------ errors


def test_errors():
  params, masks, grads = mlp_problem()
  inner = optax.sgd(0.1)
  k = jax.random.key(0)
  with pytest.raises(ValueError, match=r"Unknown method 'grasp'"):
    sparseopt.dynamic_sparse(inner, masks, method="grasp", end_step=10, key=k)
  with pytest.raises(ValueError, match=r"Unknown drop_schedule 'linear'"):
    sparseopt.dynamic_sparse(
        inner, masks, drop_schedule="linear", end_step=10, key=k
    )
  with pytest.raises(ValueError, match=r"Unknown grow_with 'grad'"):
    sparseopt.dynamic_sparse(inner, masks, grow_with="grad", end_step=10, key=k)
  for bad in (0, -1):
    with pytest.raises(ValueError, match=r"update_every must be >= 1"):
      sparseopt.dynamic_sparse(
          inner, masks, update_every=bad, end_step=10, key=k
      )
  with pytest.raises(TypeError, match=r"update_every must be an int"):
    sparseopt.dynamic_sparse(inner, masks, update_every=1.5, end_step=10, key=k)
  for bad in (-0.1, 1.5, float("nan")):
    with pytest.raises(ValueError, match=r"drop_fraction must be in \[0, 1\]"):
      sparseopt.dynamic_sparse(
          inner, masks, drop_fraction=bad, end_step=10, key=k
      )
  for bad in (None, 0, "seed", np.zeros(3, np.uint32)):
    with pytest.raises(TypeError, match=r"key must be a PRNG key"):
      sparseopt.dynamic_sparse(inner, masks, end_step=10, key=bad)
  # A legacy uint32[2] key is accepted.
  sparseopt.dynamic_sparse(inner, masks, end_step=10, key=jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match=r"end_step must be >= 0"):
    sparseopt.dynamic_sparse(inner, masks, end_step=-1, key=k)
  bad_masks = jax.tree.map(lambda m: m.astype(jnp.float32), masks)
  with pytest.raises(TypeError, match=r"a/kernel.*boolean"):
    sparseopt.dynamic_sparse(inner, bad_masks, end_step=10, key=k)
  tx = sparseopt.dynamic_sparse(inner, masks, end_step=10, key=k)
  state = tx.init(params)
  with pytest.raises(ValueError, match=r"needs params"):
    tx.update(grads[0], state)
  wrong = {"a": {"kernel": jnp.zeros((6, 8)), "bias": jnp.zeros(8)}}
  with pytest.raises(ValueError, match=r"b/kernel"):
    tx.init(wrong)


# ------------------------------------------------- a whole training loop


def test_flax_linen_mlp_with_batchnorm_trains():
  import flax.linen as nn

  class MLP(nn.Module):

    @nn.compact
    def __call__(self, x, train):
      # Small on purpose: the test's cost is compiling three train steps.
      x = nn.Dense(64, use_bias=False)(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
      x = nn.relu(x)
      return nn.Dense(4)(x)

  rng = np.random.default_rng(0)
  centers = rng.normal(size=(4, 16)) * 0.6
  labels = rng.integers(0, 4, size=512)
  xs = jnp.asarray(centers[labels] + rng.normal(size=(512, 16)), jnp.float32)
  ys = jnp.asarray(labels)
  model = MLP()
  variables = model.init(jax.random.key(0), xs[:2], train=False)
  n_steps = 200

  def train(method):
    params, stats = variables["params"], variables["batch_stats"]
    masks = sparseopt.init_masks(jax.random.key(1), params, 0.8, "erk")
    params = sparseopt.apply_masks(params, masks)
    tx = sparseopt.dynamic_sparse(
        sparseopt.sparseopt(0.05, momentum=0.9, weight_decay=1e-4),
        masks,
        method=method,
        update_every=20,
        end_step=int(0.75 * n_steps),
        key=jax.random.key(2),
    )

    def loss_fn(p, stats, x, y):
      logits, upd = model.apply(
          {"params": p, "batch_stats": stats},
          x,
          train=True,
          mutable=["batch_stats"],
      )
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return loss, upd["batch_stats"]

    def step(carry, idx):
      p, stats, s = carry
      (loss, stats), g = jax.value_and_grad(loss_fn, has_aux=True)(
          p, stats, xs[idx], ys[idx]
      )
      u, s = tx.update(g, s, p)
      return (optax.apply_updates(p, u), stats, s), loss

    idx = jax.random.randint(jax.random.key(3), (n_steps, 64), 0, 512)
    (p, _, s), losses = jax.jit(lambda c, i: jax.lax.scan(step, c, i))(
        (params, stats, tx.init(params)), idx
    )
    return p, s, np.asarray(losses)

  for method in ("rigl", "set", "static"):
    p, s, losses = train(method)
    first, last = losses[:20].mean(), losses[-20:].mean()
    assert np.isfinite(losses).all()
    assert last < 0.5 * first, (method, first, last)
    m = sparseopt.get_masks(s)
    # The kernels really are sparse, at the ERK target.
    assert float(sparseopt.sparsity(m)) == pytest.approx(0.8, abs=0.01)
    for w, mk in zip(jax.tree.leaves(p), jax.tree.leaves(m, is_leaf=IS_NONE)):
      if mk is not None:
        assert np.all(np.asarray(w)[~np.asarray(mk)] == 0)
    itop = float(sparseopt.itop_rate(s))
    if method == "static":
      assert itop == pytest.approx(float(1 - sparseopt.sparsity(m)), abs=1e-6)
    else:
      assert itop > float(1 - sparseopt.sparsity(m)) + 0.01


def test_nan_gradients_never_corrupt_masks():
  # NaN gradients on a mask-update step: alone, dynamic_sparse still keeps
  # exact per-layer counts and zero pruned weights (NaN scores rank last);
  # wrapped in optax.apply_if_finite, the step is skipped entirely.
  params = {
      "w": jax.random.normal(jax.random.key(0), (16, 8)),
      "b": jnp.zeros(8),
  }
  masks = sparseopt.init_masks(jax.random.key(1), params, 0.8, "uniform")
  params = sparseopt.apply_masks(params, masks)
  nan_grads = jax.tree.map(lambda p: jnp.full_like(p, jnp.nan), params)
  nan_grads["w"] = nan_grads["w"].at[0, 0].set(1.0)

  def make():
    return sparseopt.dynamic_sparse(
        optax.chain(sparseopt.scale_by_sparseopt(), optax.sgd(0.1, 0.9)),
        masks,
        method="rigl",
        update_every=1,
        end_step=10,
        key=jax.random.key(2),
    )

  tx = make()
  state = tx.init(params)._replace(count=jnp.int32(1))  # an update step
  updates, state = jax.jit(tx.update)(nan_grads, state, params)
  new_masks = sparseopt.get_masks(state)
  assert int(new_masks["w"].sum()) == int(masks["w"].sum())
  new_params = optax.apply_updates(params, updates)
  assert np.all(np.asarray(new_params["w"])[~np.asarray(new_masks["w"])] == 0)

  guarded = optax.apply_if_finite(make(), max_consecutive_errors=3)
  gstate = guarded.init(params)
  updates, gstate2 = jax.jit(guarded.update)(nan_grads, gstate, params)
  assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))
  np.testing.assert_array_equal(sparseopt.get_masks(gstate2)["w"], masks["w"])
  assert int(gstate2.notfinite_count) == 1


@pytest.mark.parametrize("method", ["rigl", "set"])
def test_non_finite_weights_and_gradients_never_reach_pruned_slots(method):
  # A diverging run: NaN and inf in active weights, in gradients everywhere,
  # and (after an earlier drop) in an inactive slot. Hand-checked on one
  # (2, 4) layer, active {0, 1, 2, 3}, k = floor(0.5 * 4) = 2 per update.
  mask = jnp.array([[1, 1, 1, 1], [0, 0, 0, 0]], bool)
  w = jnp.array([[0.5, jnp.nan, 0.1, jnp.inf], [0.0, jnp.nan, 0.0, 0.0]])
  g = jnp.array([[jnp.nan, 1.0, -jnp.inf, 2.0], [jnp.inf, 9.0, jnp.nan, 3.0]])
  tx = make_tx({"w": mask}, method, inner=optax.sgd(0.1), drop_fraction=0.5)
  state = tx.init({"w": w})._replace(count=jnp.int32(1))  # an update step
  updates, state = jax.jit(tx.update)({"w": g}, state, {"w": w})
  new = np.asarray(sparseopt.get_masks(state)["w"]).reshape(-1)
  # The two non-finite active weights (1: NaN, 3: inf) are dropped first.
  assert not new[1] and not new[3] and new[0] and new[2]
  # Growth: never the NaN slot 5; RigL ranks the inf gradient of slot 4 and
  # the NaN of slot 6 below every finite |g| (9 at 5 is excluded): 7, then 4.
  assert new.sum() == 4 and not new[5]
  if method == "rigl":
    np.testing.assert_array_equal(np.flatnonzero(new), [0, 2, 4, 7])
  raw = np.asarray(optax.apply_updates({"w": w}, updates)["w"]).reshape(-1)
  grown = new & ~np.asarray(mask).reshape(-1)
  assert np.all(raw[grown] == 0)  # Regrown connections start at exactly 0.
  finite_off = ~new & np.isfinite(np.asarray(w).reshape(-1))
  assert np.all(raw[finite_off] == 0)
  # An additive update cannot zero the non-finite dropped weights; the
  # documented re-masking (a jnp.where) does, whatever the gradients held.
  masked = sparseopt.apply_masks(
      optax.apply_updates({"w": w}, updates), sparseopt.get_masks(state)
  )
  out = np.asarray(masked["w"]).reshape(-1)
  assert np.all(out[~new] == 0) and np.all(out[grown] == 0)

  # The next update step from the re-masked params: pruned slots stay 0,
  # regrown ones start at 0, counts stay exact.
  state = state._replace(count=jnp.int32(2))
  updates, state = jax.jit(tx.update)({"w": g}, state, masked)
  new2 = np.asarray(sparseopt.get_masks(state)["w"]).reshape(-1)
  out2 = np.asarray(
      sparseopt.apply_masks(
          optax.apply_updates(masked, updates), sparseopt.get_masks(state)
      )["w"]
  ).reshape(-1)
  assert new2.sum() == 4 and np.all(out2[~new2] == 0)
  assert np.all(out2[new2 & ~new] == 0)


def test_count_along_is_exact_and_sums_wide_counts_in_int32():
  m = jax.random.bernoulli(jax.random.key(1), 0.4, (3, 5, 7))
  for axis in (None, (0,), (1, 2), (0, 2)):
    got = jax.jit(lambda m, axis=axis: tree_lib.count_along(m, axis))(m)
    want = np.sum(np.asarray(m), axis=axis)
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(got, want)
  # A count over 2**24 or more entries is not exact in float32: int32 then.
  wide = jax.ShapeDtypeStruct((2**24, 2), jnp.bool_)
  sums = [
      e.outvars[0].aval.dtype
      for e in jax.make_jaxpr(lambda m: tree_lib.count_along(m, (0,)))(
          wide
      ).jaxpr.eqns
      if e.primitive.name == "reduce_sum"
  ]
  assert sums == [jnp.int32]


def test_itop_count_blocks_do_not_overflow_int32():
  # Numerically, on a small array with a small block: full blocks, a
  # remainder, no remainder, and a block larger than the array.
  m = jax.random.bernoulli(jax.random.key(0), 0.3, (7, 13))
  want = int(np.sum(np.asarray(m)))
  for block in (1, 5, 7, 91, 1000):
    got = tree_lib.count_true(m, block=block)
    assert got.dtype == jnp.float32 and float(got) == want
  assert float(tree_lib.count_true(jnp.zeros((0,), bool))) == 0.0

  # Abstractly, on a layer of more than 2**31 entries (nothing allocated):
  # every int32 reduction covers at most COUNT_BLOCK < 2**31 entries, so no
  # partial count can wrap around; they are added in float32.
  big = jax.ShapeDtypeStruct((2**31 + 5,), jnp.bool_)
  assert jax.eval_shape(tree_lib.count_true, big).dtype == jnp.float32
  jaxpr = jax.make_jaxpr(tree_lib.count_true)(big).jaxpr
  int_sums = [
      e
      for e in jaxpr.eqns
      if e.primitive.name == "reduce_sum"
      and e.outvars[0].aval.dtype == jnp.int32
  ]
  assert int_sums
  for e in int_sums:
    (x,) = e.invars
    per_output = math.prod(x.aval.shape) // max(
        1, math.prod(e.outvars[0].aval.shape)
    )
    assert per_output <= tree_lib.COUNT_BLOCK < 2**31

  # The rate of a state holding such a layer traces to float32 too.
  params = {"w": jnp.zeros((4, 4))}
  tx = make_tx({"w": jnp.ones((4, 4), bool)})
  state = jax.eval_shape(tx.init, params)
  state = state._replace(ever_active={"w": big})
  assert jax.eval_shape(sparseopt.itop_rate, state).dtype == jnp.float32

  # Partial counts whose int32 sum would wrap around add up in float32.
  parts = jnp.full((3,), 2**30, jnp.int32)
  assert int(jnp.sum(parts, dtype=jnp.int32)) < 0  # the bug being avoided
  assert float(jnp.sum(parts.astype(jnp.float32))) == 3 * 2**30


# ------------------------------------------------------ selection by threshold


def _first_k_reference(scores, k):
  """NumPy: the k largest, equal scores lower index first."""
  order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
  out = np.zeros(len(scores), bool)
  out[order[:k]] = True
  return out


@pytest.fixture
def small_selection(monkeypatch):
  # Selection by counting normally starts at 32768 scores; lowered here so
  # the tests run on small vectors through the same code.
  from sparseopt_jax._src import dst

  monkeypatch.setattr(dst, "SELECT_MIN_SIZE", 1024)
  return dst


def _scores(kind, n, rng):
  if kind == "uniform":
    return rng.uniform(size=n)
  if kind == "mostly_excluded":  # RigL's drop: only active entries rank.
    return np.where(rng.uniform(size=n) < 0.9, -np.inf, -rng.uniform(size=n))
  if kind == "tied":  # Zero gradients: long runs of equal scores.
    return np.where(rng.uniform(size=n) < 0.7, 0.0, rng.uniform(size=n))
  if kind == "integers":  # Few distinct values: ties at every threshold.
    return rng.integers(0, 7, size=n).astype(np.float64)
  if kind == "sorted":  # Adversarial for a strided sample.
    return np.sort(rng.uniform(size=n))
  if kind == "signed_zeros":  # -0.0 and 0.0 tie; subnormals rank by value.
    values = np.array([-0.0, 0.0, 1e-45, -1e-45, 1e-40, -1.0, 2.0])
    return rng.choice(values, size=n)
  if kind == "infinities":  # +-inf among finite scores of both signs.
    x = rng.normal(size=n)
    x[rng.uniform(size=n) < 0.05] = np.inf
    x[rng.uniform(size=n) < 0.3] = -np.inf
    return x
  raise ValueError(kind)


_KINDS = [
    "uniform",
    "mostly_excluded",
    "tied",
    "integers",
    "sorted",
    "signed_zeros",
    "infinities",
]


@pytest.mark.parametrize("kind", _KINDS)
@pytest.mark.parametrize("interpolation_steps", [12, 0])
def test_select_top_k_equals_top_k_reference(
    small_selection, monkeypatch, kind, interpolation_steps
):
  # interpolation_steps=0: bisection only, the search's fallback.
  dst = small_selection
  monkeypatch.setattr(dst, "INTERPOLATION_STEPS", interpolation_steps)
  rng = np.random.default_rng(0)
  n = 6000
  for k_max in (900, n):
    select = jax.jit(lambda s, k, k_max=k_max: dst.select_top_k(s, k_max, k))
    for trial in range(3):
      scores = _scores(kind, n, rng).astype(np.float32)
      for k in sorted({0, 1, 17, k_max // 2, k_max - 1, k_max}):
        got = np.asarray(select(jnp.asarray(scores), jnp.int32(k)))
        want = _first_k_reference(scores, k)
        np.testing.assert_array_equal(
            got, want, err_msg=f"{kind} {trial} k_max={k_max} k={k}"
        )


def test_order_key_orders_like_the_floats():
  from sparseopt_jax._src import dst

  x = np.array(
      [-np.inf, -3e38, -1.0, -1e-45, -0.0, 0.0, 1e-45, 1e-38, 1.0, np.inf],
      np.float32,
  )
  keys = np.asarray(jax.jit(dst.order_key)(x)).astype(np.int64)
  assert (np.diff(keys[[0, 1, 2, 3, 4, 6, 7, 8, 9]]) > 0).all()
  assert keys[4] == keys[5]  # -0.0 and 0.0 compare equal.


def test_layer_keys_order_like_their_scores():
  # A mask update's keys: drop scores (-|w|, or +1 for a non-finite weight)
  # below 2**31, growth scores (-inf, -1, then magnitudes) from 2**31 up,
  # each strictly in its scores' order, equal scores equal keys.
  from sparseopt_jax._src import dst

  drop = np.array([-3e38, -1.0, -1e-38, -1e-45, -0.0, 0.0, 1.0], np.float32)
  grow = np.array(
      [-np.inf, -1.0, 0.0, 1e-45, 1e-38, 1.0, 3e38, np.inf], np.float32
  )
  d = np.asarray(jax.jit(dst._drop_key)(drop)).astype(np.int64)
  g = np.asarray(jax.jit(dst._grow_key)(grow)).astype(np.int64)
  assert d.max() < 2**31 <= g.min()
  assert (np.diff(d[[0, 1, 2, 3, 4, 6]]) > 0).all()
  assert d[4] == d[5]  # -0.0 and 0.0: a zero weight either way.
  assert (np.diff(g) > 0).all()
  assert d.min() > 0  # Key 0 is left for entries that are not active.


def test_select_top_k_counting_path_runs(small_selection, monkeypatch):
  # With lax.top_k's path sabotaged, the scores must still come out right:
  # counting, not top_k, produced them.
  dst = small_selection
  monkeypatch.setattr(
      dst, "first_k_of_top", lambda s, k_max, k: jnp.zeros(s.shape, bool)
  )
  rng = np.random.default_rng(1)
  scores = rng.uniform(size=6000).astype(np.float32)
  for k in (20, 450, 900):
    got = jax.jit(lambda s, k: dst.select_top_k(s, 900, k))(
        jnp.asarray(scores), jnp.int32(k)
    )
    np.testing.assert_array_equal(got, _first_k_reference(scores, k))


# (shape, axis, shards): leading axis (pieces contiguous in flat order),
# a non-leading axis (pieces interleaved), a middle axis of a 3-D kernel,
# size-1 axes before the split one, and one piece per entry of the axis.
_SHARD_CASES = [
    ((64, 24), 0, 8),
    ((24, 64), 1, 8),
    ((6, 8, 12), 1, 4),
    ((6, 8, 12), 2, 3),
    ((1, 16, 5), 1, 4),
    ((12, 10), 1, 10),
    ((40,), 0, 8),
]


@pytest.mark.parametrize("shape,axis,shards", _SHARD_CASES)
@pytest.mark.parametrize("kind", ["uniform", "mostly_excluded", "integers"])
def test_select_top_k_sharded_equals_first_k_of_top(kind, shape, axis, shards):
  # Exactly first_k_of_top of the flat scores (ties to the lower ORIGINAL
  # flat index), whatever the split axis, for every k up to k_max, with
  # k_max below, at and above a piece's size.
  from sparseopt_jax._src import dst

  rng = np.random.default_rng(3)
  n = math.prod(shape)
  piece = n // shards
  for k_max in sorted({1, 7, piece, min(n, piece + 5), n}):
    sharded = jax.jit(
        lambda s, k, k_max=k_max: dst.select_top_k_sharded(
            s, k_max, k, axis, shards
        )
    )
    flat = jax.jit(
        lambda s, k, k_max=k_max: dst.first_k_of_top(s.reshape(-1), k_max, k)
    )
    for trial in range(2):
      scores = _scores(kind, n, rng).astype(np.float32).reshape(shape)
      for k in sorted({0, 1, k_max // 2, k_max}):
        got = np.asarray(sharded(jnp.asarray(scores), jnp.int32(k)))
        want = np.asarray(flat(jnp.asarray(scores), jnp.int32(k)))
        msg = f"{kind} k_max={k_max} trial={trial} k={k}"
        assert got.shape == shape, msg
        np.testing.assert_array_equal(got.reshape(-1), want, err_msg=msg)
        np.testing.assert_array_equal(
            got.reshape(-1), _first_k_reference(scores.reshape(-1), k), msg
        )


def test_shard_chunks_rows_are_the_pieces():
  # Row s is the piece along the axis, in its own C order.
  from sparseopt_jax._src import dst

  x = np.arange(6 * 8 * 12).reshape(6, 8, 12)
  rows = np.asarray(dst.shard_chunks(jnp.asarray(x), 1, 4))
  assert rows.shape == (4, 6 * 2 * 12)
  for s in range(4):
    np.testing.assert_array_equal(rows[s], x[:, 2 * s : 2 * s + 2].ravel())
    assert (np.diff(rows[s]) > 0).all()  # Flat order within the piece.


@pytest.mark.parametrize("shape,axis,shards", _SHARD_CASES[:5])
def test_update_layer_per_shard_equals_flat(shape, axis, shards):
  # The whole mask update of a layer (drop and grow, counts) is the same
  # with and without pieces, including tied and non-finite magnitudes.
  from sparseopt_jax._src import dst

  rng = np.random.default_rng(4)
  n = math.prod(shape)
  for trial in range(4):
    mask = rng.uniform(size=shape) < 0.4
    weight = np.where(mask, rng.integers(-3, 4, size=shape), 0.0)
    weight = weight.astype(np.float32)
    grad = rng.integers(0, 5, size=shape).astype(np.float32)
    if trial == 3:
      weight.reshape(-1)[:: max(n // 5, 1)] = np.nan
      grad.reshape(-1)[1 :: max(n // 7, 1)] = np.inf
    k_max = dst._max_changes(mask, 0.5)
    args = (
        jnp.asarray(mask),
        jnp.asarray(weight),
        dst.finite_magnitude(jnp.asarray(grad)),
        jnp.float32(0.5),
        k_max,
    )
    update = jax.jit(dst._update_layer, static_argnums=(4, 5))
    want = update(*args, None)
    got = update(*args, dst.Shard(axis, shards))
    np.testing.assert_array_equal(got[0], want[0], err_msg=str(trial))
    assert int(got[1]) == int(want[1]) > 0
    assert int(got[0].sum()) == int(mask.sum())


def test_sharded_set_scores_equal_random_scores():
  # SET's scores hashed in the layer's shape equal the flat-iota ones.
  from sparseopt_jax._src import dst

  key = jax.random.key(5)
  seed = jax.random.bits(key, (2,), jnp.uint32)
  for shape in [(7,), (6, 10), (3, 4, 5)]:
    np.testing.assert_array_equal(
        dst._hash_scores(seed, dst._flat_index(shape)),
        dst.random_scores(key, shape),
    )


def test_shardings_validation():
  mesh = jax.sharding.AbstractMesh((8,), ("fsdp",))
  named = functools.partial(jax.sharding.NamedSharding, mesh)
  P = jax.sharding.PartitionSpec
  params = {"w": jnp.ones((16, 24)), "b": jnp.ones((24,))}
  masks = {"w": jnp.ones((16, 24), bool), "b": None}
  make = functools.partial(
      sparseopt.dynamic_sparse,
      optax.sgd(0.1),
      masks,
      end_step=10,
      key=jax.random.key(0),
  )
  # Dense leaves are ignored; a replicated or absent leaf is not split.
  for ok in (
      {"w": named(P(None, "fsdp")), "b": named(P("fsdp"))},
      {"w": named(P()), "b": None},
      {"w": None, "b": None},
  ):
    make(shardings=ok).init(params)
  with pytest.raises(TypeError, match=r"shardings\['w'\].*NamedSharding"):
    make(shardings={"w": (1, 8), "b": None})
  with pytest.raises(ValueError, match="shardings must have the structure"):
    make(shardings={"w": named(P("fsdp"))})
  mesh3 = jax.sharding.AbstractMesh((3,), ("fsdp",))
  with pytest.raises(ValueError, match=r"shardings\['w'\].*axis 0 of size 16"):
    make(
        shardings={
            "w": jax.sharding.NamedSharding(mesh3, P("fsdp", None)),
            "b": None,
        }
    )
  with pytest.raises(ValueError, match="more entries than the leaf has axes"):
    make(shardings={"w": named(P(None, None, "fsdp")), "b": None})
  with pytest.raises(ValueError, match="unstructured masks only"):
    structured = sparseopt.init_masks(
        jax.random.key(0), params, 0.5, "uniform", structure="constant_fan_in"
    )
    sparseopt.dynamic_sparse(
        optax.sgd(0.1),
        structured,
        end_step=10,
        key=jax.random.key(0),
        structure="constant_fan_in",
        shardings={"w": named(P(None, "fsdp")), "b": None},
    )


def test_set_growth_is_uniform_over_inactive_entries():
  # SET's hash-based scores: over many keys every inactive entry is grown
  # about equally often (chi-square, 63 degrees of freedom; the 1e-6
  # quantile is about 120), with no drift toward low or high indices.
  from sparseopt_jax._src import dst

  grow = jax.jit(
      jax.vmap(
          lambda key: dst.select_top_k(
              dst.random_scores(key, (64,)), 8, jnp.int32(8)
          )
      )
  )
  picks = np.asarray(grow(jax.random.split(jax.random.key(0), 4000)))
  assert (picks.sum(1) == 8).all()
  counts = picks.sum(0)
  expected = 4000 * 8 / 64
  chi2 = ((counts - expected) ** 2 / expected).sum()
  assert chi2 < 120, (chi2, counts)
  assert abs(counts[:32].sum() - counts[32:].sum()) < 6 * np.sqrt(32000)
  # Neighbouring indices are drawn independently: both of a pair (i, i + 1)
  # are grown as often as any two entries (8 of 64 without replacement).
  both = (picks[:, :-1] & picks[:, 1:]).sum()
  expected_both = 4000 * 63 * (8 * 7) / (64 * 63)
  assert abs(both - expected_both) < 6 * np.sqrt(expected_both), both
  # Different keys, different draws; the same key, the same draw.
  a, b = (dst.random_scores(jax.random.key(i), (1000,)) for i in (1, 2))
  assert not np.array_equal(a, b)
  np.testing.assert_array_equal(
      a, dst.random_scores(jax.random.key(1), (1000,))
  )
  assert len(np.unique(np.asarray(a))) >= 999


@pytest.mark.parametrize("shape", [(), (7,), (3, 5, 11), (65536,)])
def test_count_pair_counts_both_predicates_exactly(shape):
  from sparseopt_jax._src import dst

  rng = np.random.default_rng(3)
  x = rng.uniform(size=shape).astype(np.float32)
  got = jax.jit(lambda x: dst.count_pair(x > 0.3, x > 0.8))(x)
  assert [int(c) for c in got] == [np.sum(x > 0.3), np.sum(x > 0.8)]
  assert all(c.dtype == jnp.int32 for c in got)


_LAYER_KINDS = [
    "gaussian",
    "tied",
    "non_finite",
    "zero_weights",
    "dead_gradients",
    "periodic",
    "set",
]


@pytest.mark.parametrize("kind", _LAYER_KINDS)
def test_update_layer_by_counting_equals_numpy_rigl(small_selection, kind):
  # One RigL update of a layer large enough for the counting path, against
  # NumPy: drop the k smallest |w| among active entries, grow the k largest
  # |g| among inactive entries with a finite weight, ties to the lower flat
  # index, k = floor(fraction * active) capped by what can grow.
  dst = small_selection
  rng = np.random.default_rng(4)
  shape = (40, 60)  # 2400 entries >= the fixture's SELECT_MIN_SIZE.
  update = jax.jit(dst._update_layer, static_argnums=(4,))
  for trial in range(3):
    m = rng.uniform(size=shape) < 0.3
    w = rng.normal(size=shape).astype(np.float32) * m
    g = rng.normal(size=shape).astype(np.float32)
    if kind == "tied":  # Many equal magnitudes on both sides.
      w = np.round(w * 2) / 2 * m
      g = np.round(g)
    if kind == "non_finite":
      w[rng.uniform(size=shape) < 0.02] = np.nan
      g[rng.uniform(size=shape) < 0.05] = np.inf
    if kind == "zero_weights":  # Freshly grown weights: more zeros than k.
      w[rng.uniform(size=shape) < 0.5] = 0.0
      w[0, 0] = -0.0
    if kind == "dead_gradients":  # Fewer nonzero gradients than k.
      g[rng.uniform(size=shape) < 0.97] = 0.0
    if kind == "periodic":  # Misleads the strided samples of both rankings.
      every = np.arange(m.size).reshape(shape) % dst.SAMPLE_STRIDE == 0
      g = np.where(every, g * 1e3, g)
      w = np.where(every, w * 1e-3, w)
    w, g = w.astype(np.float32), g.astype(np.float32)
    fraction = np.float32(0.3)
    if kind == "set":
      score = dst.random_scores(jax.random.key(trial), shape)
      grow_score = np.asarray(score).astype(np.float64)
    else:
      score = dst.finite_magnitude(jnp.asarray(g))
      grow_score = np.where(np.isfinite(g), np.abs(g), -1.0)
    new, k = update(
        jnp.asarray(m), jnp.asarray(w), score, jnp.float32(fraction), m.size
    )

    can_grow = ~m & np.isfinite(w)
    want_k = int(np.floor(fraction * np.float32(m.sum())))
    want_k = min(want_k, int(can_grow.sum()))
    drop_score = np.where(np.isfinite(w), -np.abs(w), 1.0)
    drop = _first_k_reference(
        np.where(m, drop_score, -np.inf).reshape(-1), want_k
    )
    grow = _first_k_reference(
        np.where(can_grow, grow_score, -np.inf).reshape(-1), want_k
    )
    want = ((m.reshape(-1) & ~drop) | grow).reshape(shape)
    assert int(k) == want_k
    np.testing.assert_array_equal(np.asarray(new), want, err_msg=f"{trial}")
    assert np.asarray(new).sum() == m.sum()
