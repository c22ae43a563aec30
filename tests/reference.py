"""Independent NumPy references for the numerical tests.

Written from the method's description (DESIGN.md, the RigL and SparseOpt
papers), never from the library's code, and nothing here imports
``sparseopt_jax``: a test that compares the library with these functions
checks the library against a second, simple implementation.
Everything works on NumPy arrays in float64 and plain Python loops, because
clarity matters more than speed here.
"""

from __future__ import annotations

import math

import numpy as np


def _move_neuron_last(a: np.ndarray, neuron_axis: int) -> np.ndarray:
  return np.moveaxis(np.asarray(a), neuron_axis, -1)


def neuron_sparsity(mask: np.ndarray, neuron_axis: int = -1) -> np.ndarray:
  """s_i = 1 - nnz(M[..., i]) / fan_in_i, one loop per neuron."""
  m = _move_neuron_last(mask, neuron_axis).astype(bool)
  n_out = m.shape[-1]
  flat = m.reshape(-1, n_out)
  fan_in = flat.shape[0]
  return np.array([1.0 - flat[:, i].sum() / fan_in for i in range(n_out)])


def sparseopt_factor(mask: np.ndarray, neuron_axis: int = -1) -> np.ndarray:
  """c_i = sqrt(1 - s_i) / sqrt(1 - s_avg); 0 for a dead neuron or layer."""
  s = neuron_sparsity(mask, neuron_axis)
  s_avg = s.mean()
  if 1.0 - s_avg <= 0:
    return np.zeros_like(s)
  return np.sqrt(1.0 - s) / math.sqrt(1.0 - s_avg)


def norm_factor(
    mask: np.ndarray, param: np.ndarray, neuron_axis: int = -1
) -> np.ndarray:
  """c_i = ||w_i|| / rms_j ||w_j|| over live neurons (norm_scale's docstring).

  Live neuron: nonzero masked incoming norm. Dead (no active weight): 0.
  Active but all-zero weights: 1. No live neuron in the layer: 1 on active
  neurons, 0 on dead ones.
  """
  m = _move_neuron_last(mask, neuron_axis).astype(bool)
  w = _move_neuron_last(param, neuron_axis).astype(np.float64)
  n_out = m.shape[-1]
  m = m.reshape(-1, n_out)
  w = np.where(m, w.reshape(-1, n_out), 0.0)
  norms = np.sqrt((w**2).sum(axis=0))
  active = m.any(axis=0)
  live = norms > 0
  out = np.zeros(n_out)
  if live.any():
    rms = math.sqrt(np.mean(norms[live] ** 2))
    for i in range(n_out):
      if live[i]:
        out[i] = norms[i] / rms
      elif active[i]:
        out[i] = 1.0
  else:
    out[active] = 1.0
  return out


def scale_grad(
    grad: np.ndarray, factor: np.ndarray, neuron_axis: int = -1
) -> np.ndarray:
  """Multiplies neuron i's incoming gradient slice by factor[i]."""
  g = np.moveaxis(np.asarray(grad, np.float64), neuron_axis, -1) * factor
  return np.moveaxis(g, -1, neuron_axis)


def erk_densities(
    shapes: dict[str, tuple[int, ...]], sparsity: float, power: float = 1.0
) -> dict[str, float]:
  """Erdős–Rényi-Kernel densities (Evci et al. 2020, arXiv:1911.11134).

  Density of layer l is eps * ((sum of dims) / (prod of dims)) ** power, eps
  such that sum_l density_l * size_l = (1 - sparsity) * sum_l size_l. A layer
  whose density would exceed 1 is made dense and eps is solved again for the
  remaining layers. Making *every* overflowing layer dense at once is the same
  as doing it one at a time: a dense layer consumes less budget than its
  overflowing density did, so eps only grows and overflowing layers keep
  overflowing.
  """
  size = {n: float(np.prod(s)) for n, s in shapes.items()}
  raw = {n: (sum(s) / np.prod(s)) ** power for n, s in shapes.items()}
  target = (1.0 - sparsity) * sum(size.values())
  dense: set[str] = set()
  while True:
    rest = [n for n in shapes if n not in dense]
    if not rest:
      break
    eps = (target - sum(size[n] for n in dense)) / sum(
        raw[n] * size[n] for n in rest
    )
    over = {n for n in rest if eps * raw[n] > 1.0}
    if not over:
      break
    dense |= over
  return {n: 1.0 if n in dense else eps * raw[n] for n in shapes}


def exact_count(density: float, size: int) -> int:
  """round(density * size), halves rounded up (the library's convention)."""
  return int(math.floor(density * size + 0.5))


def topk_flat(scores: np.ndarray, k: int) -> np.ndarray:
  """Flat indices of the k largest scores, ties to the lower index."""
  flat = np.asarray(scores, np.float64).reshape(-1)
  order = sorted(range(flat.size), key=lambda i: (-flat[i], i))
  return np.array(order[:k], dtype=int)


def cosine_fraction(f: float, t: int, end_step: int) -> float:
  """RigL's drop fraction f/2 (1 + cos(pi t / T_end))."""
  return f / 2.0 * (1.0 + math.cos(math.pi * min(t / end_step, 1.0)))


def drop_grow(
    mask: np.ndarray,
    weight: np.ndarray,
    grow_score: np.ndarray,
    fraction: float,
) -> tuple[np.ndarray, int]:
  """One RigL/SET update of one layer.

  k = floor(fraction * active), capped at the inactive count. Drop the k
  active entries of smallest |w|; grow the k inactive entries (inactive
  before this update, so nothing dropped now is regrown) of largest score.
  Ties go to the lower flat index in both rankings.

  Returns:
    The new mask and k.
  """
  m = np.asarray(mask, bool).reshape(-1)
  w = np.abs(np.asarray(weight, np.float64)).reshape(-1)
  g = np.asarray(grow_score, np.float64).reshape(-1)
  active = [i for i in range(m.size) if m[i]]
  inactive = [i for i in range(m.size) if not m[i]]
  k = min(int(math.floor(fraction * len(active))), len(inactive))
  drop = sorted(active, key=lambda i: (w[i], i))[:k]
  grow = sorted(inactive, key=lambda i: (-g[i], i))[:k]
  new = m.copy()
  new[drop] = False
  new[grow] = True
  return new.reshape(np.shape(mask)), k


def skew_stats(mask: np.ndarray, neuron_axis: int = -1) -> dict[str, float]:
  """min/mean/max/std of s_i, amplification spread and dead-neuron count."""
  s = neuron_sparsity(mask, neuron_axis)
  d = 1.0 - s
  live = d > 0
  if live.any():
    amp = d[live] ** -0.5
    spread = amp.max() / amp.min()
  else:
    spread = 1.0
  return {
      "s_min": s.min(),
      "s_mean": s.mean(),
      "s_max": s.max(),
      "s_std": s.std(),
      "amp_spread": spread,
      "dead": float((~live).sum()),
  }


def turning(
    before: np.ndarray,
    after: np.ndarray,
    mask: np.ndarray,
    neuron_axis: int = -1,
):
  """Per-neuron angle (arccos of the cosine, float64), norm after, liveness."""
  m = _move_neuron_last(mask, neuron_axis).astype(bool)
  a = _move_neuron_last(before, neuron_axis).astype(np.float64) * m
  b = _move_neuron_last(after, neuron_axis).astype(np.float64) * m
  n_out = m.shape[-1]
  a, b = a.reshape(-1, n_out), b.reshape(-1, n_out)
  angle, norm, live = np.zeros(n_out), np.zeros(n_out), np.zeros(n_out, bool)
  for i in range(n_out):
    na, nb = np.linalg.norm(a[:, i]), np.linalg.norm(b[:, i])
    norm[i] = nb
    if na > 0 and nb > 0:
      live[i] = True
      cos = np.clip(a[:, i] @ b[:, i] / (na * nb), -1.0, 1.0)
      angle[i] = math.acos(cos)
  return angle, norm, live


def turning_summary(before, after, mask, neuron_axis: int = -1):
  """angle_mean, imbalance (slope of log angle on log density), norm_mean."""
  angle, norm, live = turning(before, after, mask, neuron_axis)
  density = 1.0 - neuron_sparsity(mask, neuron_axis)
  count = (
      _move_neuron_last(mask, neuron_axis)
      .astype(bool)
      .reshape(-1, mask.shape[neuron_axis])
      .sum(0)
  )
  can_turn = live & (count >= 2)  # one weight: its direction is fixed
  valid = can_turn & (angle > 1e-6)  # below: float32 rounding
  out = {
      "angle_mean": angle[can_turn].mean() if can_turn.any() else 0.0,
      "norm_mean": norm[live].mean() if live.any() else 0.0,
  }
  x, y = np.log(density[valid]), np.log(angle[valid])
  if valid.sum() >= 2 and np.ptp(x) > 0:
    out["imbalance"] = np.polyfit(x, y, 1)[0]
  else:
    out["imbalance"] = 0.0
  return out


# ------------------------------------------- neurons spanning several axes
# An attention kernel's output unit is a combination of axes: a query kernel
# (d_model, heads, head_dim) has heads * head_dim neurons, each with the
# d_model entries at one (head, j). These loop over neuron indices and slice.


def _neuron_slices(shape: tuple[int, ...], axes) -> list:
  """[(neuron index, index tuple selecting its incoming entries)]."""
  ndim = len(shape)
  axes = sorted(
      {a % ndim for a in (axes if isinstance(axes, tuple) else (axes,))}
  )
  out = []
  for idx in np.ndindex(*[shape[a] for a in axes]):
    sel = [slice(None)] * ndim
    for a, i in zip(axes, idx):
      sel[a] = i
    out.append((idx, tuple(sel)))
  return out


def multi_neuron_counts(mask: np.ndarray, axes) -> tuple[np.ndarray, int]:
  """Active incoming entries per neuron (shaped like the neuron axes)."""
  m = np.asarray(mask, bool)
  slices = _neuron_slices(m.shape, axes)
  n_shape = tuple(np.max([i for i, _ in slices], axis=0) + 1)
  counts = np.zeros(n_shape, int)
  fan_in = 0
  for idx, sel in slices:
    counts[idx] = m[sel].sum()
    fan_in = m[sel].size
  return counts, fan_in


def multi_factor(mask: np.ndarray, axes) -> np.ndarray:
  """c_i = sqrt(1 - s_i) / sqrt(1 - s_avg) over multi-axis neurons."""
  counts, fan_in = multi_neuron_counts(mask, axes)
  density = counts / fan_in
  if density.mean() <= 0:
    return np.zeros(density.shape)
  return np.sqrt(density) / math.sqrt(density.mean())


def multi_norm_factor(mask: np.ndarray, param: np.ndarray, axes) -> np.ndarray:
  """norm_factor (above) over multi-axis neurons."""
  m = np.asarray(mask, bool)
  w = np.where(m, np.asarray(param, np.float64), 0.0)
  slices = _neuron_slices(m.shape, axes)
  norms = np.array([math.sqrt((w[sel] ** 2).sum()) for _, sel in slices])
  active = np.array([m[sel].any() for _, sel in slices])
  live = norms > 0
  out = np.zeros(len(slices))
  if live.any():
    rms = math.sqrt(np.mean(norms[live] ** 2))
    out[live] = norms[live] / rms
    out[active & ~live] = 1.0
  else:
    out[active] = 1.0
  return out.reshape(multi_neuron_counts(mask, axes)[0].shape)


def multi_batch_stats_factor(
    mask: np.ndarray, variance: np.ndarray, axes, epsilon: float = 1e-5
) -> np.ndarray:
  """sigma_i / rms_j sigma_j over active neurons; 0 on dead neurons."""
  counts, _ = multi_neuron_counts(mask, axes)
  active = counts > 0
  sq = np.maximum(np.asarray(variance, np.float64), 0.0) + epsilon
  out = np.zeros(counts.shape)
  if active.any():
    out[active] = np.sqrt(sq[active] / sq[active].mean())
  return out


def multi_scale_grad(grad: np.ndarray, factor: np.ndarray, axes) -> np.ndarray:
  """Multiplies each neuron's incoming slice by its factor."""
  g = np.asarray(grad, np.float64).copy()
  for idx, sel in _neuron_slices(g.shape, axes):
    g[sel] = g[sel] * factor[idx]
  return g


def dense_general_erk_raw(shape: tuple[int, ...], axes) -> float:
  """ERK raw density of the (fan_in, fan_out) matrix a DenseGeneral computes."""
  fan_out = int(np.prod([shape[a] for a in axes]))
  fan_in = int(np.prod(shape)) // fan_out
  return (fan_in + fan_out) / (fan_in * fan_out)


def erk_from_raw(
    sizes: dict[str, int], raw: dict[str, float], sparsity: float
) -> dict[str, float]:
  """erk_densities (above) with given raw densities."""
  target = (1.0 - sparsity) * sum(sizes.values())
  dense: set[str] = set()
  while True:
    rest = [n for n in sizes if n not in dense]
    eps = (target - sum(sizes[n] for n in dense)) / sum(
        raw[n] * sizes[n] for n in rest
    )
    over = {n for n in rest if eps * raw[n] > 1.0}
    if not over:
      break
    dense |= over
  return {n: 1.0 if n in dense else eps * raw[n] for n in sizes}


def multi_drop_grow_per_neuron(
    mask: np.ndarray, weight: np.ndarray, score: np.ndarray, fraction, axes
) -> np.ndarray:
  """drop_grow (above) within each neuron's incoming slice (constant fan-in)."""
  new = np.asarray(mask, bool).copy()
  for _, sel in _neuron_slices(new.shape, axes):
    new[sel], _ = drop_grow(
        new[sel], np.asarray(weight)[sel], np.asarray(score)[sel], fraction
    )
  return new
