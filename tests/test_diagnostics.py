"""Turning-rate and mask-update diagnostics, and sparse_init, vs NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparseopt_jax as sparseopt
from sparseopt_jax import diagnostics
import reference as ref


def _layer(shape, sparsity, seed, axis=-1):
  """A kernel whose neurons have spread sparsities, and a small step of it."""
  rng = np.random.default_rng(seed)
  n_out = shape[axis]
  moved = list(shape)
  moved.append(moved.pop(axis % len(shape)))
  density = rng.uniform(max(0.05, 1 - sparsity - 0.3), 1.0, size=n_out)
  mask = rng.random(moved) < density
  mask = np.moveaxis(mask, -1, axis % len(shape))
  w = rng.standard_normal(shape).astype(np.float32) * mask
  step = 0.05 * rng.standard_normal(shape).astype(np.float32) * mask
  return mask, w, w - step


@pytest.mark.parametrize(
    "shape,axis",
    [((20, 12), -1), ((3, 3, 8, 6), -1), ((1, 1, 16, 5), -1), ((12, 20), 0)],
)
def test_neuron_turning_matches_reference(shape, axis):
  mask, before, after = _layer(shape, 0.8, seed=len(shape) + axis)
  angle, norm, live = jax.jit(diagnostics.neuron_turning, static_argnums=3)(
      before, after, mask, axis
  )
  r_angle, r_norm, r_live = ref.turning(before, after, mask, axis)
  np.testing.assert_array_equal(live, r_live)
  np.testing.assert_allclose(angle, r_angle, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(norm, r_norm, rtol=1e-5)


def test_tiny_angles_are_accurate():
  # arccos(cos) in float32 rounds angles below ~3e-4 to 0; the atan2 form
  # must resolve them (the reference is float64).
  w = np.random.default_rng(0).standard_normal((64, 4)).astype(np.float32)
  mask = np.ones_like(w, bool)
  after = w.copy()
  after[0] += 1e-5
  angle, _, _ = diagnostics.neuron_turning(w, after, mask)
  r_angle, _, _ = ref.turning(w, after, mask)
  assert np.all(r_angle > 0)
  np.testing.assert_allclose(angle, r_angle, rtol=1e-2)


def test_turning_diagnostics_matches_reference():
  mask, before, after = _layer((30, 16), 0.9, seed=3)
  params_b = {"dense": {"kernel": before, "bias": np.zeros(16, np.float32)}}
  params_a = {"dense": {"kernel": after, "bias": np.ones(16, np.float32)}}
  masks = {"dense": {"kernel": mask, "bias": None}}
  out = jax.jit(diagnostics.turning_diagnostics)(params_b, params_a, masks)
  assert set(out) == {
      "dense/kernel/angle_mean",
      "dense/kernel/imbalance",
      "dense/kernel/norm_mean",
  }
  expected = ref.turning_summary(before, after, mask)
  for k, v in expected.items():
    np.testing.assert_allclose(
        out[f"dense/kernel/{k}"], v, rtol=1e-3, atol=1e-6
    )


def test_imbalance_recovers_the_bn_skew():
  # A step whose per-neuron angle is exactly proportional to (1-s_i)^-1/2
  # has imbalance exponent -1/2; a balanced step has 0.
  rng = np.random.default_rng(1)
  n_in, n_out = 200, 10
  density = np.linspace(0.1, 1.0, n_out)
  mask = rng.random((n_in, n_out)) < density
  w = rng.standard_normal((n_in, n_out)) * mask

  # Rotate each neuron by a chosen angle within the plane of w and a
  # perpendicular direction that respects the mask.
  def rotate(angles):
    out = np.zeros_like(w)
    for i in range(n_out):
      a = w[:, i]
      p = rng.standard_normal(n_in) * mask[:, i]
      p -= (p @ a) / (a @ a) * a
      p *= np.linalg.norm(a) / np.linalg.norm(p)
      out[:, i] = np.cos(angles[i]) * a + np.sin(angles[i]) * p
    return out

  masks = {"k": mask}
  skewed = rotate(0.01 / np.sqrt(mask.mean(0)))
  balanced = rotate(np.full(n_out, 0.01))
  d = diagnostics.turning_diagnostics({"k": w}, {"k": skewed}, masks)
  np.testing.assert_allclose(d["k/imbalance"], -0.5, atol=0.02)
  d = diagnostics.turning_diagnostics({"k": w}, {"k": balanced}, masks)
  np.testing.assert_allclose(d["k/imbalance"], 0.0, atol=0.02)


def test_single_weight_neurons_and_rounding_noise_are_excluded():
  # At high sparsity many neurons keep one weight: its direction cannot
  # change, and float32 rounding gives it "angles" of ~1e-8 whose logs would
  # swamp the slope. Angles below 1e-6 are not resolved either.
  rng = np.random.default_rng(3)
  mask = np.zeros((16, 6), bool)
  for i, k in enumerate([1, 1, 2, 4, 8, 16]):
    mask[:k, i] = True
  w = (rng.standard_normal((16, 6)) * mask).astype(np.float32)
  after = w + (1e-2 * rng.standard_normal((16, 6)) * mask).astype(np.float32)
  after[:, 0] = w[:, 0] * (1 + 1e-7)  # rounding-level change
  after[:, 1] = -w[:, 1]  # a sign flip: angle pi in exact arithmetic
  after[:, 2] = w[:, 2] + 1e-9 * np.abs(w[:, 2])  # unresolved
  out = jax.jit(diagnostics.turning_diagnostics)(
      {"k": w}, {"k": after}, {"k": mask}
  )
  expected = ref.turning_summary(w, after, mask)
  np.testing.assert_allclose(
      out["k/imbalance"], expected["imbalance"], rtol=1e-3, atol=1e-4
  )
  np.testing.assert_allclose(
      out["k/angle_mean"], expected["angle_mean"], rtol=1e-3
  )
  # Only neurons 3, 4, 5 (4, 8, 16 weights) enter the slope: the reference
  # on those alone agrees.
  sub = ref.turning_summary(w[:, 3:], after[:, 3:], mask[:, 3:])
  np.testing.assert_allclose(out["k/imbalance"], sub["imbalance"], rtol=1e-3)


def test_dead_neurons_and_zero_layers_are_not_nan():
  mask = np.ones((8, 4), bool)
  mask[:, 0] = False  # a dead neuron
  w = np.ones((8, 4), np.float32) * mask
  out = diagnostics.turning_diagnostics({"k": w}, {"k": w * 1.5}, {"k": mask})
  assert all(np.isfinite(v) for v in jax.tree.leaves(out))
  # Scaling a neuron does not turn it.
  np.testing.assert_allclose(out["k/angle_mean"], 0.0, atol=1e-6)
  zeros = np.zeros((8, 4), np.float32)
  out = diagnostics.turning_diagnostics({"k": zeros}, {"k": zeros}, {"k": mask})
  assert all(np.isfinite(v) for v in jax.tree.leaves(out))
  assert float(out["k/angle_mean"]) == 0.0


def test_mask_update_jump_matches_reference():
  rng = np.random.default_rng(2)
  m0 = rng.random((40, 8)) < 0.2
  m1 = m0.copy()
  m1[:5, 0] = True  # neuron 0 gains inputs ...
  m1[:, 1] = False
  m1[:3, 1] = True  # ... neuron 1 changes its topology
  m0[:, 2] = False
  m1[:2, 2] = True  # neuron 2 comes back to life ...
  m1[:, 3] = False  # ... and neuron 3 dies
  w0 = rng.standard_normal((40, 8)).astype(np.float32) * m0
  w1 = np.where(m1 & ~m0, 0.0, w0).astype(np.float32) * m1
  out = jax.jit(diagnostics.mask_update_jump)(
      {"k": w0}, {"k": w1}, {"k": m0}, {"k": m1}
  )

  def norms(w, m):
    return np.linalg.norm(np.asarray(w, np.float64) * m, axis=0)

  def mean_abs_log(a, b):
    ok = (a > 0) & (b > 0)
    return np.mean(np.abs(np.log(b[ok] / a[ok])))

  np.testing.assert_allclose(
      out["k/norm_jump"], mean_abs_log(norms(w0, m0), norms(w1, m1)), rtol=1e-4
  )
  np.testing.assert_allclose(
      out["k/factor_jump"],
      mean_abs_log(ref.sparseopt_factor(m0), ref.sparseopt_factor(m1)),
      rtol=1e-4,
  )
  live0, live1 = m0.any(axis=0), m1.any(axis=0)
  assert out["k/died"] == np.sum(live0 & ~live1) == 1
  assert out["k/revived"] == np.sum(~live0 & live1) == 1


@pytest.mark.parametrize("shape", [(400, 6), (5, 5, 16, 6)])
def test_sparse_init_variance_follows_active_fan_in(shape):
  params = {"k": jnp.zeros(shape), "b": jnp.zeros(shape[-1])}
  masks = sparseopt.init_masks(jax.random.key(0), params, 0.9, "uniform")
  # Spread the neurons' fan-ins: neuron 0 keeps many more inputs.
  m = np.asarray(masks["k"]).copy()
  m[..., 0] = True
  masks = {"k": jnp.asarray(m), "b": None}
  out = jax.jit(sparseopt.sparse_init)(jax.random.key(1), params, masks)
  w = np.asarray(out["k"]).reshape(-1, shape[-1])
  fan_in = m.reshape(-1, shape[-1]).sum(0)
  assert np.all(w[~m.reshape(-1, shape[-1])] == 0)  # pruned entries are 0
  np.testing.assert_array_equal(out["b"], params["b"])  # dense leaf kept
  # Sum of squares per neuron ~ scale (=2) whatever the fan-in: a
  # chi-square with fan_in degrees of freedom, scaled by 2 / fan_in.
  ss = (w**2).sum(0)
  tol = 6 * 2 * np.sqrt(2.0 / fan_in)
  assert np.all(np.abs(ss - 2.0) < tol), (ss, tol)


def test_sparse_init_rejects_bad_input():
  params = {"k": jnp.zeros((4, 3))}
  with pytest.raises(ValueError, match="scale"):
    sparseopt.sparse_init(
        jax.random.key(0), params, {"k": jnp.ones((4, 3), bool)}, scale=0.0
    )
  with pytest.raises(ValueError, match="'k'"):
    sparseopt.sparse_init(
        jax.random.key(0), params, {"k": jnp.ones((3, 4), bool)}
    )
