"""On-device diagnostics of sparsity-induced gradient skew, for logging.

Every function returns a flat ``{name: scalar}`` dict of device arrays, so a
training step can return it without a host sync and a logger can fetch it
every N steps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from sparseopt_jax._src import dst
from sparseopt_jax._src import masks as masks_lib
from sparseopt_jax._src import transform
from sparseopt_jax._src import tree as tree_lib
from sparseopt_jax._src.tree import PyTree


def skew_diagnostics(
    masks: PyTree, *, neuron_axis: tree_lib.NeuronAxisSpec = -1
) -> dict[str, jax.Array]:
  r"""Per-layer neuron-sparsity statistics and BatchNorm amplification spread.

  For every sparse leaf with ``ndim >= 2`` (path ``L``), over its neurons'
  sparsities :math:`s_i`:

  * ``L/s_min``, ``L/s_mean``, ``L/s_max``, ``L/s_std``;
  * ``L/amp_spread``: :math:`\max_i (1-s_i)^{-1/2} / \min_i (1-s_i)^{-1/2}`
    over live neurons (:math:`s_i < 1`), the ratio of the largest to the
    smallest BatchNorm gradient amplification; 1 when balanced or when no
    neuron is live;
  * ``L/dead``: number of neurons with every incoming weight pruned.

  Args:
    masks: a mask tree.
    neuron_axis: the output-unit axis, a tuple of axes (attention kernels),
      or a per-leaf pytree or callable (leaves it gives ``None`` are skipped).

  Returns:
    A flat dict of float32 scalars.
  """
  out: dict[str, jax.Array] = {}
  for path, mask, ax in tree_lib.masked_leaves_with_axes(masks, neuron_axis):
    if mask.ndim < 2 or ax is None:
      continue
    name = tree_lib.path_str(path)
    density = masks_lib.neuron_density(mask, ax, name=name)
    s = 1.0 - density
    live = density > 0
    d_max = jnp.max(density)
    d_min_live = jnp.min(jnp.where(live, density, jnp.inf))
    spread = jnp.where(
        jnp.any(live),
        jnp.sqrt(d_max / jnp.where(jnp.any(live), d_min_live, 1.0)),
        1.0,
    )
    out[f"{name}/s_min"] = jnp.min(s)
    out[f"{name}/s_mean"] = jnp.mean(s)
    out[f"{name}/s_max"] = jnp.max(s)
    out[f"{name}/s_std"] = jnp.std(s)
    out[f"{name}/amp_spread"] = spread
    out[f"{name}/dead"] = jnp.sum(~live).astype(jnp.float32)
  return out


def _bin_label(lo: int, hi: int) -> str:
  return str(lo) if hi == lo + 1 else f"{lo}-{hi - 1}"


def fan_in_histogram(
    masks: PyTree, *, neuron_axis: tree_lib.NeuronAxisSpec = -1
) -> dict[str, jax.Array]:
  r"""Per-layer histogram of neurons' active fan-in, in power-of-two bins.

  For every sparse leaf with ``ndim >= 2`` (path ``L``) and fan-in ``F``,
  each neuron's active incoming weight count :math:`k_i` falls in one bin:
  ``L/fan_in/0`` (ablated neurons), ``L/fan_in/1``, ``L/fan_in/2-3``,
  ``L/fan_in/4-7``, ... up to the bin holding ``F``: bin ``b >= 1`` counts
  :math:`2^{b-1} \le k_i < 2^b`. The bins are fixed by the shape, so the
  keys are the same at every step and the counts of a layer sum to its
  number of neurons.

  Args:
    masks: a mask tree.
    neuron_axis: the output-unit axis, a tuple of axes (attention kernels),
      or a per-leaf pytree or callable (leaves it gives ``None`` are skipped).

  Returns:
    A flat dict of float32 scalars (neuron counts).
  """
  out: dict[str, jax.Array] = {}
  for path, mask, ax in tree_lib.masked_leaves_with_axes(masks, neuron_axis):
    if mask.ndim < 2 or ax is None:
      continue
    name = tree_lib.path_str(path)
    count, fan_in = masks_lib.neuron_counts(mask, ax, name=name)
    edges = [0, 1]
    while edges[-1] <= fan_in:
      edges.append(2 * edges[-1])
    for lo, hi in zip(edges[:-1], edges[1:]):
      in_bin = (count >= lo) & (count < hi)
      out[f"{name}/fan_in/{_bin_label(lo, hi)}"] = jnp.sum(
          in_bin, dtype=jnp.int32
      ).astype(jnp.float32)
  return out


def dst_diagnostics(
    state: optax.OptState, *, neuron_axis: tree_lib.NeuronAxisSpec = -1
) -> dict[str, jax.Array]:
  """:func:`skew_diagnostics` of the live masks, plus topology statistics.

  Adds ``L/changed`` (connections regrown at the last mask update, per sparse
  leaf), ``changed`` (their sum), ``sparsity`` and ``itop``
  (:func:`itop_rate`).

  Args:
    state: a :class:`DynamicSparseState` or an optimizer state containing one.
    neuron_axis: the output-unit axis, a tuple of axes (attention kernels),
      or a per-leaf pytree or callable (leaves it gives ``None`` are skipped).

  Returns:
    A flat dict of float32 scalars.
  """
  ds = dst.find_state(state)
  out = skew_diagnostics(ds.masks, neuron_axis=neuron_axis)
  total = jnp.float32(0.0)
  for path, num in tree_lib.mask_leaves_with_path(ds.num_changed):
    out[f"{tree_lib.path_str(path)}/changed"] = num.astype(jnp.float32)
    total = total + num
  out["changed"] = total
  out["sparsity"] = masks_lib.sparsity(ds.masks)
  out["itop"] = dst.itop_rate(ds)
  return out


def neuron_turning(
    before: jax.Array,
    after: jax.Array,
    mask: jax.Array,
    neuron_axis: tree_lib.NeuronAxis = -1,
    *,
    name: str = "param",
) -> tuple[jax.Array, jax.Array, jax.Array]:
  r"""Angle each neuron's incoming weight vector turned, and its norm.

  With :math:`a_i, b_i` the masked incoming weights of neuron :math:`i`
  before and after a step, the angle is computed in the well-conditioned
  form :math:`2\,\mathrm{atan2}(\lVert \hat a - \hat b\rVert,
  \lVert \hat a + \hat b\rVert)` (exact for tiny angles, unlike ``acos``).

  Args:
    before: a kernel before the step.
    after: the same kernel after the step.
    mask: its boolean mask (``after``'s topology).
    neuron_axis: the output-unit axis, or a tuple of axes (attention
      kernels); the outputs are then shaped like the neuron axes.
    name: the parameter path, for error messages.

  Returns:
    ``(angle, norm, live)``: float32 angles in radians, float32 masked norms
    of ``after``, and a bool vector of neurons with nonzero weights before and
    after (angles of other neurons are 0 and must be ignored).
  """
  ndim = before.ndim
  axis = tree_lib.normalize_axes(neuron_axis, ndim, name)
  axes = tree_lib.reduce_axes(ndim, axis)
  a = jnp.where(mask, before, 0).astype(jnp.float32)
  b = jnp.where(mask, after, 0).astype(jnp.float32)
  na = jnp.sqrt(jnp.sum(a * a, axis=axes))
  nb = jnp.sqrt(jnp.sum(b * b, axis=axes))
  live = (na > 0) & (nb > 0)
  ua = a / tree_lib.broadcast_neuron(jnp.where(live, na, 1.0), ndim, axis)
  ub = b / tree_lib.broadcast_neuron(jnp.where(live, nb, 1.0), ndim, axis)
  diff = jnp.sqrt(jnp.sum((ua - ub) ** 2, axis=axes))
  summ = jnp.sqrt(jnp.sum((ua + ub) ** 2, axis=axes))
  angle = jnp.where(live, 2.0 * jnp.arctan2(diff, summ), 0.0)
  return angle, nb, live


def _slope(x: jax.Array, y: jax.Array, valid: jax.Array) -> jax.Array:
  """Least-squares slope of y on x over valid points; 0 if x has no spread."""
  w = valid.astype(jnp.float32)
  n = jnp.maximum(jnp.sum(w), 1.0)
  xm = jnp.sum(w * x) / n
  ym = jnp.sum(w * y) / n
  sxx = jnp.sum(w * (x - xm) ** 2)
  sxy = jnp.sum(w * (x - xm) * (y - ym))
  # A relative floor on sxx: when every valid neuron has the same density the
  # slope is undefined, and we report 0 (balanced) rather than noise or NaN.
  ok = sxx > 1e-12 * jnp.maximum(jnp.sum(w * x * x), 1e-30)
  return jnp.where(ok, sxy / jnp.where(ok, sxx, 1.0), 0.0)


# Angles below this are not resolved by float32 weights (a few ulps of the
# unit direction): such "turns" are rounding noise and would dominate a
# regression on log angle.
RESOLVED_ANGLE = 1e-6


def turning_diagnostics(
    params_before: PyTree,
    params_after: PyTree,
    masks: PyTree,
    *,
    neuron_axis: tree_lib.NeuronAxisSpec = -1,
) -> dict[str, jax.Array]:
  r"""How fast each sparse layer's neurons turn, and how unevenly.

  Under BatchNorm a neuron's incoming weights are scale invariant, so what a
  step changes is their direction. For every sparse leaf ``L`` (ndim >= 2):

  * ``L/angle_mean``: mean angle turned (radians) over the neurons that can
    turn: live, with at least 2 active weights;
  * ``L/imbalance``: the least-squares slope of :math:`\log \theta_i` on
    :math:`\log(1 - s_i)` over those neurons whose angle is resolved
    (:math:`\theta_i > 10^{-6}`, above float32 rounding).
    :math:`-1/2` is the paper's skew (sparse neurons turn faster by
    :math:`(1-s_i)^{-1/2}`), 0 is balanced; 0 also when all of them have
    the same density;
  * ``L/norm_mean``: mean masked norm of the live neurons after the step.

  Neurons with no active weight are excluded; so are neurons with a single
  one, whose direction is fixed (a 1-D weight vector cannot turn: its
  "angle" is rounding noise, which at high sparsity would dominate the
  regression). Nothing is NaN.

  Args:
    params_before: params before a step.
    params_after: params after it.
    masks: the mask tree (of ``params_after``).
    neuron_axis: the output-unit axis, a tuple of axes (attention kernels),
      or a per-leaf pytree or callable (leaves it gives ``None`` are skipped).

  Returns:
    A flat dict of float32 scalars.

  References:
    van Laarhoven. L2 Regularization versus Batch and Weight Normalization.
    2017. https://arxiv.org/abs/1706.05350
  """
  tree_lib.validate_masks(params_after, masks)
  out: dict[str, jax.Array] = {}
  leaf_axes = tree_lib.resolve_neuron_axes(neuron_axis, masks)

  def visit(path, mask, before, after, ax):
    if mask is None or mask.ndim < 2 or ax is None:
      return
    name = tree_lib.path_str(path)
    angle, norm, live = neuron_turning(before, after, mask, ax, name=name)
    count, fan_in = masks_lib.neuron_counts(mask, ax, name=name)
    density = masks_lib.density_from_counts(count, fan_in)
    n_live = jnp.maximum(jnp.sum(live), 1)
    can_turn = live & (count >= 2)
    n_turn = jnp.maximum(jnp.sum(can_turn), 1)
    valid = can_turn & (angle > RESOLVED_ANGLE)
    x = jnp.log(jnp.where(valid, density, 1.0))
    y = jnp.log(jnp.where(valid, angle, 1.0))
    out[f"{name}/angle_mean"] = (
        jnp.sum(jnp.where(can_turn, angle, 0.0)) / n_turn
    )
    out[f"{name}/imbalance"] = _slope(x, y, valid)
    out[f"{name}/norm_mean"] = jnp.sum(jnp.where(live, norm, 0.0)) / n_live

  tree_lib.map_masked(
      visit, masks, params_before, params_after, leaf_axes, with_path=True
  )
  return out


def mask_update_jump(
    params_before: PyTree,
    params_after: PyTree,
    masks_before: PyTree,
    masks_after: PyTree,
    *,
    neuron_axis: tree_lib.NeuronAxisSpec = -1,
) -> dict[str, jax.Array]:
  r"""Across a mask update: how much neuron norms jump vs the SparseOpt factor.

  For every sparse leaf ``L``:

  * ``L/norm_jump``: mean :math:`|\log(\lVert w_i^+\rVert /
    \lVert w_i^-\rVert)|` over neurons with nonzero norm before and after;
  * ``L/factor_jump``: mean :math:`|\log(c_i^+ / c_i^-)|` of the fan-in
    factor :math:`c_i = \sqrt{1-s_i}/\sqrt{1-\bar s}` over neurons with
    nonzero factor before and after;
  * ``L/died``: neurons with an active incoming weight before and none after;
  * ``L/revived``: neurons with no active incoming weight before and some
    after (``dead`` of `skew_diagnostics` only shows the net of the two).

  BatchNorm's amplification follows the norm; if the factor jumps much more
  than the norm, the paper's correction over-reacts to mask updates.

  Args:
    params_before: params before the mask-update step.
    params_after: params after it.
    masks_before: masks before.
    masks_after: masks after.
    neuron_axis: the output-unit axis, a tuple of axes (attention kernels),
      or a per-leaf pytree or callable (leaves it gives ``None`` are skipped).

  Returns:
    A flat dict of float32 scalars.
  """
  tree_lib.validate_masks(params_before, masks_before)
  tree_lib.validate_masks(params_after, masks_after)
  out: dict[str, jax.Array] = {}

  def log_jump(before, after):
    ok = (before > 0) & (after > 0)
    safe_b = jnp.where(ok, before, 1.0)
    safe_a = jnp.where(ok, after, 1.0)
    return jnp.sum(jnp.where(ok, jnp.abs(jnp.log(safe_a / safe_b)), 0.0)) / (
        jnp.maximum(jnp.sum(ok), 1)
    )

  leaf_axes = tree_lib.resolve_neuron_axes(neuron_axis, masks_before)

  def visit(path, mb, ma, pb, pa, ax):
    if mb is None or mb.ndim < 2 or ax is None:
      return
    name = tree_lib.path_str(path)
    axis = tree_lib.normalize_axes(ax, pb.ndim, name)
    axes = tree_lib.reduce_axes(pb.ndim, axis)

    def norm(p, m):
      w = jnp.where(m, p, 0).astype(jnp.float32)
      return jnp.sqrt(jnp.sum(w * w, axis=axes))

    live_b, live_a = jnp.any(mb, axis=axes), jnp.any(ma, axis=axes)
    out[f"{name}/died"] = jnp.sum(live_b & ~live_a).astype(jnp.float32)
    out[f"{name}/revived"] = jnp.sum(~live_b & live_a).astype(jnp.float32)
    out[f"{name}/norm_jump"] = log_jump(norm(pb, mb), norm(pa, ma))
    out[f"{name}/factor_jump"] = log_jump(
        transform.fan_in_scale(mb, axis, name=name),
        transform.fan_in_scale(ma, axis, name=name),
    )

  tree_lib.map_masked(
      visit,
      masks_before,
      masks_after,
      params_before,
      params_after,
      leaf_axes,
      with_path=True,
  )
  return out
