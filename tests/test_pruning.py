"""Gradual magnitude pruning: schedule, exact kept sets, zeros, moments."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparseopt_jax as sparseopt
from sparseopt_jax import diagnostics

SHAPES = {"conv": (3, 3, 4, 8), "dense": (16, 10), "head": (10, 3)}


def make_params(seed=0, ties=False):
  rng = np.random.default_rng(seed)
  params = {}
  for name, shape in SHAPES.items():
    w = rng.standard_normal(shape)
    if ties:  # few distinct magnitudes: ties everywhere
      w = np.round(w * 2) / 2
    params[name] = {"kernel": jnp.asarray(w, jnp.float32)}
  params["dense"]["bias"] = jnp.zeros(10)
  return params


def grads_at(params, t):
  keys = jax.random.split(jax.random.key(100 + t), len(jax.tree.leaves(params)))
  return jax.tree.unflatten(
      jax.tree.structure(params),
      [
          jax.random.normal(k, p.shape, p.dtype)
          for k, p in zip(keys, jax.tree.leaves(params))
      ],
  )


def run(tx, params, n_steps):
  """Jitted steps; [(count, params_in, state_after, params_after)]."""
  step = jax.jit(tx.update)
  state = tx.init(params)
  out = []
  for t in range(n_steps):
    updates, state = step(grads_at(params, t), state, params)
    new = optax.apply_updates(params, updates)
    out.append((t, params, state, new))
    params = new
  return out


def kernels(tree):
  return {
      sparseopt.path_str(p): np.asarray(x)
      for p, x in jax.tree_util.tree_leaves_with_path(
          tree, is_leaf=lambda x: x is None
      )
      if x is not None and np.ndim(x) >= 2
  }


# ---------------------------------------------------------------- reference


def ref_progress(t, sparsity, t0, t1, schedule="cubic"):
  """r_t = s_t / s_f (Zhu & Gupta's cubic with s_0 = 0), float64."""
  if callable(schedule):
    s = float(schedule(t))
    return min(max(s / sparsity, 0.0), 1.0) if sparsity > 0 else 0.0
  if t1 == t0:
    return 1.0
  return 1.0 - (1.0 - (t - t0) / (t1 - t0)) ** 3


def ref_keep(mask, w, kept):
  """Among active entries, the ``kept`` largest |w|; ties to lower index."""
  flat_m, flat_w = mask.reshape(-1), np.abs(w.reshape(-1)).astype(np.float64)
  idx = np.flatnonzero(flat_m)
  order = idx[np.lexsort((idx, -flat_w[idx]))]
  new = np.zeros_like(flat_m)
  new[order[:kept]] = True
  return new.reshape(mask.shape)


def final_counts(params, sparsity, distribution):
  dens = sparseopt.layer_densities(params, sparsity, distribution)
  return {
      n: int(math.floor(d * math.prod(SHAPES[n.split("/")[0]]) + 0.5))
      for n, d in dens.items()
  }


# -------------------------------------------------------------- the tests


@pytest.mark.parametrize("distribution", ["erk", "uniform"])
@pytest.mark.parametrize("ties", [False, True])
def test_layer_scope_matches_reference(distribution, ties):
  s_f, t0, t1, every = 0.8, 2, 14, 3
  params = make_params(1, ties)
  inner = optax.sgd(0.05, momentum=0.9)
  tx = sparseopt.gradual_pruning(
      inner,
      s_f,
      start_step=t0,
      end_step=t1,
      update_every=every,
      distribution=distribution,
  )
  final = final_counts(params, s_f, distribution)
  masks = {n: np.ones(SHAPES[n.split("/")[0]], bool) for n in final}
  for t, p_in, state, p_out in run(tx, params, 18):
    is_update = t0 <= t <= t1 and (t - t0) % every == 0
    assert bool(sparseopt.masks_updated(state)) == is_update
    if is_update:
      r = ref_progress(t, s_f, t0, t1)
      w_in = kernels(p_in)
      for n, k_final in final.items():
        size = masks[n].size
        kept = size - math.floor(r * (size - k_final))
        new = ref_keep(masks[n], w_in[n], kept)
        assert new.sum() == kept
        assert not np.any(new & ~masks[n])  # once pruned, stays pruned
        masks[n] = new
    got = kernels(sparseopt.get_masks(state))
    for n in final:
      np.testing.assert_array_equal(got[n], masks[n], err_msg=f"{n} t={t}")
      # Pruned weights are exactly zero after every step.
      assert np.all(kernels(p_out)[n][~masks[n]] == 0.0)
  # The final step reaches the counts of init_masks exactly.
  assert {n: int(m.sum()) for n, m in masks.items()} == final
  assert np.asarray(p_out["dense"]["bias"]).shape == (10,)


def test_global_scope_exact_total_and_reference():
  s_f, t0, t1, every = 0.7, 0, 8, 2
  params = make_params(2)
  tx = sparseopt.gradual_pruning(
      optax.sgd(0.05),
      s_f,
      start_step=t0,
      end_step=t1,
      update_every=every,
      scope="global",
  )
  names = list(kernels(params))
  total = sum(math.prod(SHAPES[n.split("/")[0]]) for n in names)
  k_final = int(math.floor((1 - s_f) * total + 0.5))
  masks = np.ones(total, bool)
  for t, p_in, state, p_out in run(tx, params, 10):
    if t0 <= t <= t1 and (t - t0) % every == 0:
      r = ref_progress(t, s_f, t0, t1)
      kept = total - math.floor(r * (total - k_final))
      w = np.concatenate([kernels(p_in)[n].reshape(-1) for n in names])
      new = ref_keep(masks, w, kept)
      assert not np.any(new & ~masks)
      masks = new
    got = np.concatenate(
        [kernels(sparseopt.get_masks(state))[n].reshape(-1) for n in names]
    )
    np.testing.assert_array_equal(got, masks, err_msg=f"t={t}")
    out = np.concatenate([kernels(p_out)[n].reshape(-1) for n in names])
    assert np.all(out[~masks] == 0.0)
  assert masks.sum() == k_final


def test_docstring_counts_and_schedule_values():
  # 16x8 uniform at 0.75: K = 32; r = 0, 7/8, 1 at steps 0, 2, 4.
  params = {"w": jax.random.normal(jax.random.key(0), (16, 8))}
  tx = sparseopt.gradual_pruning(
      optax.sgd(0.1),
      0.75,
      start_step=0,
      end_step=4,
      update_every=2,
      distribution="uniform",
  )
  got = [int(s.masks["w"].sum()) for _, _, s, _ in run(tx, params, 6)]
  assert got == [128, 128, 44, 44, 32, 32]


def test_callable_schedule_is_made_monotone():
  # A schedule that dips: the masks hold the running maximum.
  sched = {0: 0.5, 2: 0.25, 4: 0.75, 6: 0.6}
  params = {"w": jax.random.normal(jax.random.key(3), (8, 8))}
  tx = sparseopt.gradual_pruning(
      optax.sgd(0.0),
      0.75,
      start_step=0,
      end_step=6,
      update_every=2,
      distribution="uniform",
      schedule=lambda t: sched[int(t)],
  )
  got = [int(s.masks["w"].sum()) for _, _, s, _ in run(tx, params, 8)]
  # K = 16, R - K = 48: r = 2/3, (2/3), 1, (1) -> kept 64 - 32, 32, 16, 16.
  assert got == [32, 32, 32, 32, 16, 16, 16, 16]


def test_moments_reset_at_pruned_positions():
  params = make_params(4)
  tx = sparseopt.gradual_pruning(
      optax.adam(1e-2),
      0.5,
      start_step=3,
      end_step=3,
      update_every=1,
      distribution="uniform",
  )
  hist = run(tx, params, 5)
  before = hist[2][2]  # after count 2: dense, moments nonzero
  after = hist[3][2]  # after count 3: the single pruning step
  adam = after.inner_state[0]
  pruned = {
      n: kernels(before.masks)[n] & ~kernels(after.masks)[n]
      for n in kernels(params)
  }
  for n, p in pruned.items():
    assert p.sum() == math.prod(SHAPES[n.split("/")[0]]) // 2
    assert np.all(kernels(before.inner_state[0].mu)[n][p] != 0)
    assert np.all(kernels(adam.mu)[n][p] == 0)
    assert np.all(kernels(adam.nu)[n][p] == 0)
    # Kept positions keep their moments.
    assert np.all(kernels(adam.nu)[n][~p] != 0)
  assert int(after.num_changed["dense"]["kernel"]) == 80


def test_accessors_and_diagnostics_read_its_state():
  params = make_params(5)
  tx = optax.chain(
      sparseopt.gradual_pruning(
          optax.sgd(0.1), 0.9, start_step=0, end_step=2, update_every=1
      ),
      optax.scale(1.0),
  )
  state = run(tx, params, 3)[-1][2]
  assert abs(float(sparseopt.sparsity(sparseopt.get_masks(state))) - 0.9) < 0.01
  assert float(sparseopt.itop_rate(state)) == 1.0  # GMP never regrows
  metrics = diagnostics.dst_diagnostics(state)
  assert "sparsity" in metrics and "changed" in metrics
  assert bool(sparseopt.masks_updated(state))


def test_sparsity_zero_and_filter():
  params = make_params(6)
  tx = sparseopt.gradual_pruning(
      optax.sgd(0.1),
      0.0,
      start_step=0,
      end_step=4,
      update_every=2,
      filter_fn=sparseopt.exclude_paths("head"),
  )
  state = run(tx, params, 5)[-1][2]
  masks = sparseopt.get_masks(state)
  assert masks["head"]["kernel"] is None
  assert masks["dense"]["bias"] is None
  assert bool(jnp.all(masks["conv"]["kernel"]))


def test_errors():
  sgd = optax.sgd(0.1)
  kw = dict(start_step=0, end_step=10, update_every=5)
  with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
    sparseopt.gradual_pruning(sgd, 1.0, **kw)
  with pytest.raises(ValueError, match=r"multiple of update_every"):
    sparseopt.gradual_pruning(
        sgd, 0.5, start_step=0, end_step=10, update_every=3
    )
  with pytest.raises(ValueError, match=r"start_step <= end_step"):
    sparseopt.gradual_pruning(
        sgd, 0.5, start_step=5, end_step=0, update_every=5
    )
  with pytest.raises(TypeError, match=r"end_step must be an int"):
    sparseopt.gradual_pruning(
        sgd, 0.5, start_step=0, end_step=1.0, update_every=1
    )
  with pytest.raises(ValueError, match=r"update_every must be >= 1"):
    sparseopt.gradual_pruning(
        sgd, 0.5, start_step=0, end_step=0, update_every=0
    )
  with pytest.raises(ValueError, match=r"Unknown schedule 'linear'"):
    sparseopt.gradual_pruning(sgd, 0.5, schedule="linear", **kw)
  with pytest.raises(ValueError, match=r"Unknown scope 'net'"):
    sparseopt.gradual_pruning(sgd, 0.5, scope="net", **kw)
  with pytest.raises(ValueError, match=r"Unknown distribution"):
    sparseopt.gradual_pruning(sgd, 0.5, distribution="er", **kw)
  with pytest.raises(ValueError, match=r"scope='global'"):
    sparseopt.gradual_pruning(
        sgd, 0.5, scope="global", structure="constant_fan_in", **kw
    )
  with pytest.raises(ValueError, match=r"1 - 2/4"):
    sparseopt.gradual_pruning(sgd, 0.75, structure=(2, 4), **kw)
  tx = sparseopt.gradual_pruning(sgd, 0.5, **kw)
  params = make_params()
  with pytest.raises(ValueError, match=r"needs params"):
    tx.update(params, tx.init(params))
  tx = sparseopt.gradual_pruning(sgd, 1 - 1 / 3, structure=(1, 3), **kw)
  with pytest.raises(ValueError, match=r"'dense/kernel'.*multiple of m=3"):
    tx.init(params)


def test_pruning_schedule_refuses_steps_off_the_grid():
  with pytest.raises(ValueError, match="multiple of update_every"):
    sparseopt.pruning_schedule(0.9, start_step=0, end_step=10, update_every=3)
  with pytest.raises(TypeError, match="end_step must be an int"):
    sparseopt.pruning_schedule(0.9, start_step=0, end_step=1.5, update_every=1)


def test_global_pruning_refuses_int32_overflowing_totals():
  # Shapes only (jax.eval_shape): 3 x 2**30 weights would wrap an int32.
  params = {
      f"w{i}": jax.ShapeDtypeStruct((2**15, 2**15), jnp.float32)
      for i in range(3)
  }
  tx = sparseopt.gradual_pruning(
      optax.sgd(0.1),
      0.9,
      start_step=0,
      end_step=10,
      update_every=10,
      scope="global",
  )
  with pytest.raises(ValueError, match="2\\*\\*31 - 1"):
    jax.eval_shape(tx.init, params)
