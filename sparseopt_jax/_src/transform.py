"""SparseOpt gradient scaling and mask application as optax transforms."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sparseopt_jax._src import masks as masks_lib
from sparseopt_jax._src import tree as tree_lib
from sparseopt_jax._src.tree import PyTree

# Masks given to a transform's constructor: a mask tree, or a callable that
# builds one from params (like ``optax.masked``'s mask argument).
MaskSource = PyTree | Callable[[PyTree], PyTree]

CORRECTIONS = ("fan_in", "norm", "batch_stats")
# Flax BatchNorm's default epsilon.
BATCH_STATS_EPSILON = 1e-5


def masks_from_params(params: PyTree) -> PyTree:
  """The mask tree implied by params: ``params != 0`` for leaves with ndim >= 2.

  Used when no masks are given: a pruned weight is a zero weight. Leaves with
  ``ndim < 2`` (biases, norm parameters) are dense (``None``). A leaf whose
  entries are all zero is dense too (all ``True``): a zero-initialized kernel
  is not a fully pruned layer, and reading it as one would zero its updates
  forever. Chosen with ``jnp.where``-style arithmetic, so it holds under jit.
  """

  def infer(p):
    if np.ndim(p) < 2:
      return None
    nonzero = p != 0
    return nonzero | ~jnp.any(nonzero)

  return jax.tree.map(infer, params)


def resolve_masks(
    updates: PyTree,
    params: PyTree | None,
    extra_masks: PyTree | None,
    ctor_masks: MaskSource | None,
    *,
    who: str,
) -> PyTree:
  """Picks the masks for one update: extra arg, then constructor, then params."""
  if extra_masks is not None:
    masks, argname = extra_masks, "masks= (update keyword)"
  elif ctor_masks is not None and not callable(ctor_masks):
    masks, argname = ctor_masks, f"{who}(masks=...)"
  else:
    if params is None:
      raise ValueError(
          f"{who}: no masks were given (neither `masks=` to update nor to the "
          f"constructor as a tree), so they are derived from params, but "
          f"update was called with params=None. Pass params or masks."
      )
    if ctor_masks is not None:
      masks, argname = ctor_masks(params), f"{who}(masks=callable)"
    else:
      masks, argname = masks_from_params(params), "masks derived from params"
  tree_lib.validate_masks(updates, masks, argname=argname)
  return masks


def fan_in_scale(
    mask: jax.Array,
    neuron_axis: tree_lib.NeuronAxis = -1,
    *,
    name: str = "mask",
) -> jax.Array:
  """SparseOpt's per-neuron factor ``sqrt(1 - s_i) / sqrt(1 - s_avg)``.

  ``s_i`` is neuron ``i``'s fraction of pruned incoming weights (every axis
  but ``neuron_axis``), ``s_avg`` its mean over the layer's neurons. A dense
  mask gives exactly 1; a fully pruned neuron 0; a fully pruned layer all 0.

  Args:
    mask: boolean mask of one layer.
    neuron_axis: the output-unit axis, or a tuple of axes whose combination
      is the neuron (attention ``(d_model, heads, head_dim)``: ``(1, 2)``).
    name: the parameter path, for error messages.

  Returns:
    A float32 array shaped like the neuron axes (a vector for an int axis),
    one factor per neuron.

  Examples:
    >>> import jax.numpy as jnp
    >>> import sparseopt_jax as sparseopt
    >>> q = jnp.ones((4, 2, 3), bool).at[:2, 0, 0].set(False)  # 2 of 4 in
    >>> sparseopt.diagnostics.fan_in_scale(q, (1, 2)).round(4)
    Array([[0.7385, 1.0445, 1.0445],
           [1.0445, 1.0445, 1.0445]], dtype=float32)
  """
  count, _ = masks_lib.neuron_counts(mask, neuron_axis, name=name)
  return scale_from_counts(count)


def scale_from_counts(count: jax.Array) -> jax.Array:
  """:func:`fan_in_scale` from a layer's active incoming counts per neuron."""
  # scale_i^2 = density_i / mean_j density_j = count_i * n / sum_j count_j,
  # computed from integer counts so that a dense layer gives exactly 1.
  total = jnp.sum(count)
  scaled = count * count.size
  numerator = scaled.astype(jnp.float32)
  denominator = jnp.where(total > 0, total, 1).astype(jnp.float32)
  scale = jnp.where(total > 0, jnp.sqrt(numerator / denominator), 0.0)
  # A neuron exactly as dense as the layer's mean gets exactly 1: a float32
  # division of equal values can be 1 ulp short on some backends (XLA's
  # vectorized CPU division), and equal counts (constant fan-in, N:M) must
  # leave the gradients untouched.
  return jnp.where((scaled == total) & (total > 0), 1.0, scale)


def norm_scale(
    mask: jax.Array,
    param: jax.Array,
    neuron_axis: tree_lib.NeuronAxis = -1,
    *,
    name: str = "mask",
) -> jax.Array:
  """Measured per-neuron factor ``||w_i|| / rms_j ||w_j||`` (float32).

  Norms are of the masked incoming weights. The root-mean-square runs over
  the layer's live neurons (``||w_j|| > 0``). A neuron with no active weight
  gets 0 (it receives no gradient anyway); an active neuron whose weights are
  all zero (e.g. every connection just regrown) gets 1, so it can still
  learn; a layer with no live neuron gets 1 on its active neurons.
  """
  ndim = np.ndim(param)
  axis = tree_lib.normalize_axes(neuron_axis, ndim, name)
  axes = tree_lib.reduce_axes(ndim, axis)
  w = jnp.where(mask, param, 0).astype(jnp.float32)
  sq = jnp.sum(w * w, axis=axes)
  active = jnp.any(mask, axis=axes)
  live = sq > 0
  n_live = jnp.sum(live)
  mean_sq = jnp.sum(jnp.where(live, sq, 0.0)) / jnp.maximum(n_live, 1)
  ratio = jnp.sqrt(sq / jnp.where(mean_sq > 0, mean_sq, 1.0))
  return jnp.where(live, ratio, jnp.where(active, 1.0, 0.0))


def batch_stats_scale(
    mask: jax.Array,
    variance: jax.Array,
    neuron_axis: tree_lib.NeuronAxis = -1,
    *,
    epsilon: float = BATCH_STATS_EPSILON,
    name: str = "mask",
) -> jax.Array:
  """BatchNorm's own per-neuron factor ``sigma_i / rms_j sigma_j`` (float32).

  ``sigma = sqrt(variance + epsilon)`` is the std that the BatchNorm after
  the layer divides neuron ``i``'s output (and so its backward signal) by:
  its running variance, or the current batch's. The root-mean-square runs
  over the layer's active neurons (at least one active incoming weight). A
  neuron with no active weight gets 0 (it receives no gradient anyway), so a
  fully pruned layer gets all zeros, never NaN. Should every active
  ``sigma`` be 0 (``epsilon=0`` and constant outputs), active neurons get 1.

  Args:
    mask: boolean mask of one layer.
    variance: the normalization's per-neuron variance, shaped like the
      neuron axes (``(n_neurons,)`` for an int axis; ``(heads, head_dim)``
      for ``neuron_axis=(1, 2)`` of a ``(d_model, heads, head_dim)`` kernel,
      where the flat ``(heads * head_dim,)`` is accepted too).
    neuron_axis: the output-unit axis of ``mask``, or a tuple of axes.
    epsilon: added to the variance, as BatchNorm does; match the BatchNorm's
      own ``epsilon`` (Flax's default 1e-5).
    name: the parameter path, for error messages.

  Returns:
    A float32 vector, one factor per neuron.
  """
  ndim = np.ndim(mask)
  axis = tree_lib.normalize_axes(neuron_axis, ndim, name)
  shape = tree_lib.neuron_shape(np.shape(mask), axis)
  got = tuple(np.shape(variance))
  if got == (math.prod(shape),) and len(shape) > 1:
    variance = jnp.reshape(variance, shape)
  elif got != shape:
    shown = axis[0] if len(axis) == 1 else axis
    raise ValueError(
        f"batch_stats[{name!r}] has shape {got}, expected {shape}: one "
        f"variance per neuron along neuron_axis={shown}."
    )
  active = jnp.any(mask, axis=tree_lib.reduce_axes(ndim, axis))
  # Rounding can make a computed variance slightly negative; BN clips it too.
  sq = jnp.maximum(jnp.asarray(variance, jnp.float32), 0.0) + epsilon
  n_active = jnp.sum(active)
  mean_sq = jnp.sum(jnp.where(active, sq, 0.0)) / jnp.maximum(n_active, 1)
  ratio = jnp.where(
      mean_sq > 0, jnp.sqrt(sq / jnp.where(mean_sq > 0, mean_sq, 1.0)), 1.0
  )
  return jnp.where(active, ratio, 0.0)


def _check_batch_stats(reference: PyTree, batch_stats: PyTree) -> None:
  """``batch_stats`` must have the structure of ``reference`` (None leaves)."""
  stats_def = jax.tree.structure(batch_stats, is_leaf=tree_lib.is_none)
  ref_def = jax.tree.structure(reference, is_leaf=tree_lib.is_none)
  if stats_def != ref_def:
    stat_paths = {
        tree_lib.path_str(p)
        for p, _ in jax.tree_util.tree_leaves_with_path(
            batch_stats, is_leaf=tree_lib.is_none
        )
    }
    ref_paths = {
        tree_lib.path_str(p)
        for p, _ in jax.tree_util.tree_leaves_with_path(
            reference, is_leaf=tree_lib.is_none
        )
    }
    detail = (
        sorted(ref_paths - stat_paths)[:5],
        sorted(stat_paths - ref_paths)[:5],
    )
    raise ValueError(
        "batch_stats must have the tree structure of the params, with a "
        "variance vector at each corrected kernel and None elsewhere; "
        f"missing: {detail[0]}, unexpected: {detail[1]}."
    )


def batch_stats_flags(
    filter_fn: tree_lib.LeafFilter | None,
    masks: PyTree,
    reference: PyTree,
    batch_stats: PyTree,
) -> PyTree:
  """Which leaves ``correction="batch_stats"`` corrects (internal).

  With the default filter, every masked leaf that has statistics: a layer
  with no BatchNorm after it (a classifier head) is not skewed, and the
  pairing helper leaves it ``None``. A filter is a promise instead: a leaf it
  selects without statistics is an error naming the path.
  """
  _check_batch_stats(reference, batch_stats)
  flags = correction_flags(filter_fn, masks, reference)
  if filter_fn is None:
    return tree_lib.map_masked(
        lambda m, f, v: m is not None and f and v is not None,
        masks,
        flags,
        batch_stats,
    )
  missing = []

  def check(path, m, f, v):
    if m is not None and f and v is None:
      missing.append(tree_lib.path_str(path))

  tree_lib.map_masked(check, masks, flags, batch_stats, with_path=True)
  if missing:
    raise ValueError(
        f"correction='batch_stats': filter_fn selects {missing} but "
        "batch_stats has None there. Give their BatchNorm variances, or "
        "exclude them from filter_fn (filter_fn=None corrects exactly the "
        "masked leaves that have statistics)."
    )
  return flags


def correction_flags(
    filter_fn: tree_lib.LeafFilter | None, masks: PyTree, reference: PyTree
) -> PyTree:
  """Which masked leaves get the correction, aligned with ``masks``.

  ``filter_fn`` is evaluated on ``reference`` (params, gradients or the masks
  themselves); the result has ``None`` for dense leaves.
  """
  if filter_fn is None:
    return tree_lib.map_masked(lambda m, _: m is not None, masks, reference)
  if callable(filter_fn):
    return tree_lib.map_masked(
        lambda path, m, r: m is not None and bool(filter_fn(path, r)),
        masks,
        reference,
        with_path=True,
    )
  flags = filter_fn
  if jax.tree.structure(flags) != jax.tree.structure(
      masks, is_leaf=tree_lib.is_none
  ):
    raise ValueError(
        "filter_fn: a pytree filter must have the structure of "
        "the params (one Python bool per leaf)."
    )
  return tree_lib.map_masked(
      lambda m, f: m is not None and bool(f), masks, flags
  )


def scales_from_flags(
    masks: PyTree,
    flags: PyTree,
    params: PyTree | None,
    neuron_axis: tree_lib.NeuronAxisSpec,
    correction: str,
    *,
    batch_stats: PyTree | None = None,
    epsilon: float = BATCH_STATS_EPSILON,
) -> PyTree:
  """Per-neuron factors for the leaves ``flags`` selects (internal).

  A leaf whose ``neuron_axis`` spec is ``None`` has no neuron: not corrected.
  """
  reference = masks if params is None else params
  axes = tree_lib.resolve_neuron_axes(neuron_axis, masks)
  if correction == "batch_stats":
    return tree_lib.map_masked(
        lambda path, mask, flag, var, ax: None
        if mask is None or not flag or np.ndim(mask) < 2 or ax is None
        else batch_stats_scale(
            mask,
            var,
            ax,
            epsilon=epsilon,
            name=tree_lib.path_str(path),
        ),
        masks,
        flags,
        batch_stats,
        axes,
        with_path=True,
    )

  def scale(path, mask, flag, param, ax):
    if mask is None or not flag or np.ndim(mask) < 2 or ax is None:
      return None
    name = tree_lib.path_str(path)
    if correction == "norm":
      return norm_scale(mask, param, ax, name=name)
    return fan_in_scale(mask, ax, name=name)

  return tree_lib.map_masked(
      scale, masks, flags, reference, axes, with_path=True
  )


def _check_correction(correction: str) -> None:
  if correction not in CORRECTIONS:
    raise ValueError(
        f"Unknown correction {correction!r}; expected one of " f"{CORRECTIONS}."
    )


def sparseopt_scales(
    masks: PyTree,
    params: PyTree | None = None,
    *,
    neuron_axis: tree_lib.NeuronAxisSpec = -1,
    filter_fn: tree_lib.LeafFilter | None = None,
    correction: str = "fan_in",
    batch_stats: PyTree | None = None,
    epsilon: float = BATCH_STATS_EPSILON,
) -> PyTree:
  """Per-neuron SparseOpt factors for every corrected leaf of a mask tree.

  Args:
    masks: a mask tree.
    params: the current params; needed for ``correction="norm"``.
    neuron_axis: the output-unit axes: an int or tuple of ints for every
      leaf, or a per-leaf pytree or callable (see :func:`scale_by_sparseopt`).
    filter_fn: which masked leaves are corrected (default: every masked leaf
      with ``ndim >= 2``, and with ``correction="batch_stats"`` only those
      that have statistics); evaluated on ``params`` when given, else on the
      masks.
    correction: ``"fan_in"`` (the paper's), ``"norm"`` (measured) or
      ``"batch_stats"`` (BatchNorm's variances, see
      :func:`batch_stats_scale`).
    batch_stats: for ``correction="batch_stats"``, a tree like the params
      with each corrected kernel's BatchNorm variance vector, ``None``
      elsewhere.
    epsilon: added to the variances (``correction="batch_stats"``).

  Returns:
    A tree like ``masks`` with a float32 vector (one factor per neuron) for
    corrected leaves and ``None`` elsewhere.
  """
  _check_correction(correction)
  if correction == "norm" and params is None:
    raise ValueError("correction='norm' needs params (the current weights).")
  if params is not None:
    tree_lib.validate_masks(params, masks)
  reference = masks if params is None else params
  if correction == "batch_stats":
    if batch_stats is None:
      raise ValueError("correction='batch_stats' needs batch_stats.")
    flags = batch_stats_flags(filter_fn, masks, reference, batch_stats)
  else:
    flags = correction_flags(filter_fn, masks, reference)
  return scales_from_flags(
      masks,
      flags,
      params,
      neuron_axis,
      correction,
      batch_stats=batch_stats,
      epsilon=epsilon,
  )


def apply_scales(
    updates: PyTree,
    scales: PyTree,
    *,
    neuron_axis: tree_lib.NeuronAxisSpec = -1,
) -> PyTree:
  """Multiplies each leaf's neuron slices by its factor; keeps dtypes."""
  axes = tree_lib.resolve_neuron_axes(neuron_axis, updates)

  def apply(path, scale, u, ax):
    if scale is None:
      return u
    ax = tree_lib.normalize_axes(ax, u.ndim, tree_lib.path_str(path))
    s = tree_lib.broadcast_neuron(scale, u.ndim, ax)
    # Multiply in float32 so bf16 gradients lose nothing to the factor.
    return (u.astype(jnp.float32) * s).astype(u.dtype)

  return tree_lib.map_masked(apply, scales, updates, axes, with_path=True)


class ScaleBySparseOptState(NamedTuple):
  """State of :func:`scale_by_sparseopt`: its cached per-neuron factors.

  Attributes:
    scales: a tree like the params with a float32 array, one fan-in factor
      per neuron (shaped like the leaf's neuron axes), for every leaf with
      ``ndim >= 2`` and valid neuron axes (``None`` elsewhere): the factors of the masks seen last. The vectors
      of leaves that are not corrected are kept but unused. ``None`` with
      ``correction="norm"`` or ``"batch_stats"``, whose factors follow the
      weights or the statistics at every step.
      (Built from params without leaves, such as the placeholder
      ``optax.tree.map_params`` passes to ``init``, it is a float32 scalar.)
    valid: bool scalar, ``False`` until ``scales`` have been computed once.
  """

  scales: PyTree
  valid: jax.Array


def _empty_cache(
    params: PyTree, neuron_axis: tree_lib.NeuronAxisSpec
) -> PyTree:
  """One float32 array per leaf with ``ndim >= 2``, shaped by its neurons."""
  axes = tree_lib.resolve_neuron_axes(neuron_axis, params)

  def slot(p, ax):
    ndim = np.ndim(p)
    if ndim < 2 or ax is None:
      return None  # Never corrected.
    try:
      ax = tree_lib.normalize_axes(ax, ndim, "")
    except ValueError:
      return None  # Corrected with an axis error naming the leaf.
    return jnp.ones(tree_lib.neuron_shape(np.shape(p), ax), jnp.float32)

  return jax.tree.map(slot, params, axes)


def scale_by_sparseopt(
    masks: MaskSource | None = None,
    *,
    neuron_axis: tree_lib.NeuronAxisSpec = -1,
    filter_fn: tree_lib.LeafFilter | None = None,
    correction: str = "fan_in",
    epsilon: float = BATCH_STATS_EPSILON,
) -> optax.GradientTransformationExtraArgs:
  r"""SparseOpt: undo BatchNorm's gradient skew across a sparse layer's neurons.

  BatchNorm after a sparse layer divides neuron :math:`i`'s backward signal by
  a batch std that scales like :math:`\sqrt{1 - s_i}`, where :math:`s_i` is
  the neuron's fraction of pruned incoming weights, so its gradient is
  amplified by :math:`(1 - s_i)^{-1/2}`. SparseOpt multiplies every incoming
  gradient of neuron :math:`i` by

  .. math::
    c_i = \frac{\sqrt{1 - s_i}}{\sqrt{1 - \bar s}}, \qquad
    \bar s = \operatorname{mean}_i s_i,

  which cancels the skew while keeping the layer's gradient norm roughly
  unchanged. A dense layer gets :math:`c_i = 1` exactly; a fully pruned
  neuron 0; a fully pruned layer all zeros (never NaN).

  With ``correction="norm"`` the factor is measured instead:
  :math:`c_i = \lVert w_i \rVert / \operatorname{rms}_j \lVert w_j \rVert`
  over the layer's live neurons (masked norms of the current params). Under
  BatchNorm a neuron's weights are scale invariant and its gradient scales
  like :math:`1/\lVert w_i \rVert`, so this targets the actual amplification
  whatever the initialization or training state (see ``docs``).

  With ``correction="batch_stats"`` it is BatchNorm's own std:
  :math:`c_i = \sigma_i / \operatorname{rms}_j \sigma_j` over the layer's
  active neurons, :math:`\sigma = \sqrt{\mathrm{var} + \epsilon}`, where
  ``var`` is the variance of the BatchNorm that normalizes the layer's output
  (its running variance, or the current batch's), given at every step as
  the ``batch_stats=`` keyword of ``update``: a tree like the params with
  that vector at each kernel and ``None`` elsewhere.
  ``sparseopt_jax.flax_utils`` builds it for Flax models by pairing every
  kernel with the BatchNorm its output feeds. By default exactly the masked
  kernels that have statistics are corrected (a head with no BatchNorm is
  left alone); a leaf that an explicit ``filter_fn`` selects but that has no
  statistics is an error naming its path. Active neurons are those with an
  active incoming weight; the others get 0. Not cached: the statistics
  change at every step.

  Place it first, on the loss gradient, and add weight decay after it:
  ``chain(scale_by_sparseopt(), add_decayed_weights(wd), sgd(lr, momentum))``.
  Optimizers that normalize per coordinate (Adam, AdamW, Lion's sign) cancel a
  per-neuron constant factor up to epsilon, so SparseOpt changes little in
  front of them.

  Masks come, in this order, from the ``masks=`` keyword of ``update``
  (``optax.chain`` and :func:`dynamic_sparse` forward it), from ``masks``
  given here (a mask tree or a callable of params), or from ``params != 0``.
  Inferred from params, a leaf whose entries are all zero counts as dense
  (all ``True``), never as a fully pruned layer: a zero-initialized kernel
  must still learn.

  The fan-in factors change only when the masks do, so they are cached in
  the state (:class:`ScaleBySparseOptState`) and recomputed, under
  ``jax.lax.cond``, only when ``update`` gets ``masks_updated=True`` (a bool
  scalar: the masks differ from those of the previous call) or the cache is
  not yet filled. :func:`dynamic_sparse` passes it. Without
  ``masks_updated=`` the factors are recomputed at every call (correct, and
  slower: counting a mask costs several times more than scaling the
  gradients). A transformation that skips calls to this one, or drops their
  state (``optax.MultiSteps``, ``optax.apply_if_finite``), must therefore sit
  outside :func:`dynamic_sparse`, not between it and this transform, or the
  flag can be lost. ``correction="norm"`` and ``"batch_stats"`` recompute at
  every call.

  Args:
    masks: a mask tree (``bool`` arrays, ``None`` for dense leaves) or a
      callable ``params -> mask tree``; ``None`` to rely on the ``masks=``
      update keyword or on ``params != 0``.
    neuron_axis: the output-unit axis of corrected leaves; ``-1`` for Flax
      Dense ``(in, out)`` and Conv ``(H, W, Cin, Cout)`` kernels. A tuple of
      ints makes the neuron the combination of those axes, with fan-in over
      the others: Flax ``DenseGeneral`` / attention query, key and value
      kernels ``(d_model, heads, head_dim)`` take ``(1, 2)``, the output
      kernel ``(heads, head_dim, d_model)`` takes ``-1`` (fan-in
      ``heads * head_dim``). Per-neuron factors, cached factors and
      ``batch_stats`` variances are then shaped like the neuron axes (in
      increasing axis order). One model mixing conv, dense and attention
      kernels gives a per-leaf spec: a pytree like the params with an int,
      a tuple or ``None`` (no neuron: not corrected) at each leaf, or a
      callable ``(path, leaf) -> int | tuple | None``. An axis out of range
      or repeated is an error naming the leaf.
    filter_fn: which masked leaves to correct, as a ``filter_fn(path, leaf)``
      or a pytree of bools; default all masked leaves with ``ndim >= 2``
      (with ``correction="batch_stats"``: those that have statistics).
      A layer with no normalization after it (a final classifier) is not
      skewed: ``filter_fn=sparseopt.exclude_paths("head")``.
    correction: ``"fan_in"`` (the paper's factor), ``"norm"`` or
      ``"batch_stats"``.
    epsilon: with ``correction="batch_stats"``, added to the variances as
      BatchNorm does; match the BatchNorm's ``epsilon`` (Flax's default).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes the
    keywords ``masks=`` (a mask tree), ``masks_updated=`` (a bool scalar)
    and, for ``correction="batch_stats"``, ``batch_stats=``; its state is a
    :class:`ScaleBySparseOptState`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import sparseopt_jax as sparseopt
    >>> params = {"w": jnp.ones((4, 2)), "b": jnp.zeros(2)}
    >>> masks = {"w": jnp.array([[1, 1], [1, 0], [1, 0], [1, 0]], bool),
    ...          "b": None}
    >>> tx = optax.chain(sparseopt.scale_by_sparseopt(), optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, state, params, masks=masks)
    >>> updates["w"][0]  # scales sqrt(1)/sqrt(5/8) and sqrt(1/4)/sqrt(5/8)
    Array([-0.12649111, -0.06324556], dtype=float32)

  References:
    Adnan, Jain, Jacobs, Sharma, Krishnan, Burkholz, Ioannou. SparseOpt:
    Addressing Normalization-induced Gradient Skew in Sparse Training. ICML
    2026. https://arxiv.org/abs/2605.27541
  """
  _check_correction(correction)
  tree_lib.check_neuron_axis_spec(neuron_axis)
  if not epsilon >= 0:
    raise ValueError(f"epsilon must be >= 0, got {epsilon!r}.")
  ctor_masks = masks

  def init_fn(params):
    if correction in ("norm", "batch_stats"):
      return ScaleBySparseOptState(scales=None, valid=jnp.zeros([], bool))
    # optax.tree.map_params calls init with a placeholder that has no leaves.
    # The cache is not params-like, so one leaf stands for all of it there
    # (a leaf is a prefix of any subtree: map_params then leaves it alone).
    if not jax.tree.leaves(params):
      return ScaleBySparseOptState(
          scales=jnp.zeros([], jnp.float32), valid=jnp.zeros([], bool)
      )
    return ScaleBySparseOptState(
        scales=_empty_cache(params, neuron_axis), valid=jnp.zeros([], bool)
    )

  def update_fn(
      updates,
      state,
      params=None,
      *,
      masks=None,
      masks_updated=None,
      batch_stats=None,
      **extra_args,
  ):
    del extra_args
    if not jax.tree.leaves(updates):
      return updates, state  # Nothing to scale (and no cache to fill).
    live = resolve_masks(
        updates, params, masks, ctor_masks, who="scale_by_sparseopt"
    )
    if correction == "batch_stats":
      if batch_stats is None:
        raise ValueError(
            "scale_by_sparseopt(correction='batch_stats') needs the update "
            "keyword batch_stats= (each corrected kernel's BatchNorm "
            "variances; sparseopt_jax.flax_utils builds it for Flax models)."
        )
      flags = batch_stats_flags(filter_fn, live, updates, batch_stats)
      scales = scales_from_flags(
          live,
          flags,
          None,
          neuron_axis,
          correction,
          batch_stats=batch_stats,
          epsilon=epsilon,
      )
      return apply_scales(updates, scales, neuron_axis=neuron_axis), state
    flags = correction_flags(filter_fn, live, updates)
    if correction == "norm":
      if params is None:
        raise ValueError(
            "scale_by_sparseopt(correction='norm') needs params "
            "in update (the current weights)."
        )
      tree_lib.validate_masks(params, live)
      scales = scales_from_flags(live, flags, params, neuron_axis, correction)
      return apply_scales(updates, scales, neuron_axis=neuron_axis), state

    def recount():
      fresh = scales_from_flags(live, flags, None, neuron_axis, correction)
      # Uncorrected leaves keep a slot of ones, so the cache's structure is
      # fixed by the shapes alone (and a state=None call needs no state).
      return jax.tree.map(
          lambda slot, new: slot if new is None else new,
          _empty_cache(updates, neuron_axis),
          fresh,
          is_leaf=tree_lib.is_none,
      )

    if masks_updated is None:
      cache = recount()
    else:
      if state is None:
        raise ValueError(
            "scale_by_sparseopt: update(..., masks_updated=...) "
            "needs the state returned by init (its cache)."
        )
      stale = jnp.logical_or(jnp.asarray(masks_updated, bool), ~state.valid)
      # float32 again in case the state was cast (cond needs equal types).
      cache = jax.lax.cond(
          stale,
          recount,
          lambda: jax.tree.map(lambda c: c.astype(jnp.float32), state.scales),
      )
    scales = jax.tree.map(
        lambda c, f: None if c is None or not f else c,
        cache,
        flags,
        is_leaf=tree_lib.is_none,
    )
    return (
        apply_scales(updates, scales, neuron_axis=neuron_axis),
        ScaleBySparseOptState(scales=cache, valid=jnp.ones([], bool)),
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def zero_masked_updates(
    masks: MaskSource | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Zeroes updates at masked-out positions, so pruned weights stay put.

  Put it last in a chain: ``chain(..., sgd(lr), zero_masked_updates())``.
  With params whose pruned entries are zero (see :func:`apply_masks`), they
  stay exactly zero. Masks come from the ``masks=`` update keyword, then the
  constructor, then ``params != 0``, as in :func:`scale_by_sparseopt`.
  Inferred from params, a leaf whose entries are all zero counts as dense
  (all ``True``): a zero-initialized kernel is not a pruned layer, and
  freezing it would keep it at zero forever.

  Args:
    masks: a mask tree, a callable ``params -> mask tree``, or ``None``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with an
    ``optax.EmptyState``.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import sparseopt_jax as sparseopt
    >>> masks = {"w": jnp.array([[True, False], [True, True]])}
    >>> tx = optax.chain(optax.sgd(1.0), sparseopt.zero_masked_updates())
    >>> params = {"w": jnp.ones((2, 2))}
    >>> updates, _ = tx.update(params, tx.init(params), params, masks=masks)
    >>> updates["w"]
    Array([[-1.,  0.],
           [-1., -1.]], dtype=float32)
  """
  ctor_masks = masks

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, *, masks=None, **extra_args):
    del extra_args
    live = resolve_masks(
        updates, params, masks, ctor_masks, who="zero_masked_updates"
    )
    return tree_lib.zero_masked(live, updates), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
