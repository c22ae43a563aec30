"""Gradual magnitude pruning (Zhu & Gupta 2017) as an optax wrapper.

The masks start dense and live in the wrapper's state (a
:class:`~sparseopt_jax.DynamicSparseState`, so :func:`get_masks`,
:func:`masks_updated`, :func:`itop_rate` and the diagnostics read it). Every
count is computed on the host from static shapes, so each pruning step keeps
an exact, precomputed number of weights; on device a pruning step runs in
the gated loop body of ``dst.sparse_step``, skipped on other steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sparseopt_jax._src import dst
from sparseopt_jax._src import masks as masks_lib
from sparseopt_jax._src import structure as structure_lib
from sparseopt_jax._src import tree as tree_lib

SCHEDULES = ("cubic",)
SCOPES = ("layer", "global")

SparsitySchedule = str | Callable[[int], float]


def _check_step(value, name: str) -> int:
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
    raise TypeError(f"{name} must be an int, got {value!r}.")
  return int(value)


def _progress(
    sparsity: float,
    steps: list[int],
    start_step: int,
    end_step: int,
    schedule: SparsitySchedule,
) -> np.ndarray:
  """``r_t = s_t / s_f`` at each pruning step: float64, clipped, monotone."""
  if callable(schedule):
    r = [float(schedule(t)) / sparsity if sparsity > 0 else 0.0 for t in steps]
  else:
    span = end_step - start_step
    r = [
        1.0 if span == 0 else 1.0 - (1.0 - (t - start_step) / span) ** 3
        for t in steps
    ]
  # Pruned weights never come back: a schedule that dips holds its maximum.
  return np.maximum.accumulate(np.clip(np.asarray(r, np.float64), 0.0, 1.0))


def _kept(size: int, kept_final: int, r: float) -> int:
  # floor(r * pruned_final) pruned: nondecreasing in r, exact at r = 1.
  return size - math.floor(r * (size - kept_final))


def pruning_schedule(
    sparsity: float,
    *,
    start_step: int,
    end_step: int,
    update_every: int,
    schedule: SparsitySchedule = "cubic",
) -> Callable[[int], float]:
  r"""The target sparsity :func:`gradual_pruning` trains with at each step.

  Returns ``step -> r_t * s_f``, with the cubic schedule

  .. math:: r_t = 1 - \left(1 - \frac{t_j - t_0}{t_{end} - t_0}\right)^3,

  :math:`t_j` the last pruning step :math:`t_0 + j\,\Delta t` before
  ``step`` (or ``schedule(t_j) / s_f`` for a callable): the target (before
  rounding to whole counts) of the masks in force during the update with
  step counter ``step``, which are those set at that pruning step (a
  pruning step's own update still uses the masks from before it). It is 0
  up to ``start_step`` and ``sparsity`` after ``end_step``; ``r_t`` is
  exactly :func:`gradual_pruning`'s, clipped and nondecreasing. Use it for
  FLOPs accounting or to log the schedule; the wrapper itself keeps the
  exact per-layer counts in its compiled step.

  Args:
    sparsity, start_step, end_step, update_every, schedule: as in
      :func:`gradual_pruning`.

  Returns:
    A Python function of an int step, returning a float.

  Examples:
    >>> import sparseopt_jax as sparseopt
    >>> at = sparseopt.pruning_schedule(
    ...     0.9, start_step=10, end_step=40, update_every=10)
    >>> [round(at(t), 4) for t in (10, 11, 21, 31, 41)]
    [0.0, 0.0, 0.6333, 0.8667, 0.9]

  References:
    Zhu & Gupta. To prune, or not to prune: exploring the efficacy of pruning
    for model compression. 2017. https://arxiv.org/abs/1710.01878
  """
  start_step = _check_step(start_step, "start_step")
  end_step = _check_step(end_step, "end_step")
  update_every = _check_step(update_every, "update_every")
  if (
      update_every < 1
      or end_step < start_step
      or ((end_step - start_step) % update_every)
  ):
    raise ValueError(
        f"pruning_schedule: need update_every >= 1 and end_step - start_step "
        f"a nonnegative multiple of update_every; got start_step="
        f"{start_step}, end_step={end_step}, update_every={update_every}."
    )
  steps = list(range(start_step, end_step + 1, update_every))
  r = _progress(sparsity, steps, start_step, end_step, schedule)

  def at(step: int) -> float:
    if step <= start_step:
      return 0.0
    j = min((step - 1 - start_step) // update_every, len(steps) - 1)
    return float(r[j] * sparsity)

  return at


def gradual_pruning(
    inner: optax.GradientTransformation,
    sparsity: float,
    *,
    start_step: int,
    end_step: int,
    update_every: int,
    distribution: str = "erk",
    schedule: SparsitySchedule = "cubic",
    scope: str = "layer",
    filter_fn: tree_lib.LeafFilter | None = None,
    structure: str | tuple[int, int] = "unstructured",
    neuron_axis: tree_lib.NeuronAxisSpec = -1,
) -> optax.GradientTransformationExtraArgs:
  r"""Gradual magnitude pruning (GMP) around any optax optimizer.

  The masks start dense. At the pruning steps
  :math:`t = t_0 + j\,\Delta t`, :math:`j = 0, \dots, n`, with
  :math:`t_0 + n\,\Delta t = t_{end}` (``start_step``, ``update_every``,
  ``end_step``), the target sparsity is Zhu & Gupta's cubic

  .. math:: s_t = s_f + (s_0 - s_f)
            \left(1 - \frac{t - t_0}{t_{end} - t_0}\right)^3,
            \qquad s_0 = 0,

  or ``schedule(t)`` when ``schedule`` is a callable ``step -> sparsity``
  (evaluated once per pruning step, on the host, at construction). Let
  :math:`r_t = s_t / s_f`, clipped to :math:`[0, 1]` and made
  nondecreasing (the running maximum over pruning steps; :math:`r = 0` when
  :math:`s_f = 0`). Each group of a sparse leaf (the whole leaf when
  unstructured, a neuron under ``"constant_fan_in"``, ``m`` inputs under
  ``(n, m)``) of size :math:`R` with final kept count :math:`K` (the counts
  of :func:`init_masks` at ``sparsity`` and ``distribution``:
  ``round(density * R)``, ``max(1, round(density * fan_in))`` or ``n``)
  keeps exactly

  .. math:: k_t = R - \lfloor r_t\,(R - K) \rfloor

  of its currently active weights, those of largest :math:`|w|` (ties:
  the lower flat index goes first; a non-finite weight is pruned first).
  So a layer's sparsity at :math:`t` is :math:`r_t` times its final
  sparsity, with the pruned count rounded down. The counts are monotone:
  :math:`r_t` is nondecreasing and :math:`x \mapsto \lfloor x (R - K)
  \rfloor` is nondecreasing, so :math:`k_t` never grows, pruned weights stay
  pruned, and :math:`k_{t_{end}} = K` exactly. With ``scope="global"`` all
  sparse leaves form one group of :math:`R = \sum_l |W_l|` with
  :math:`K = \mathrm{round}((1 - s_f) R)`, ranked by one magnitude ordering
  (ties: tree order, then flat index); ``distribution`` is then not used.

  Every step, gradients at pruned positions are zeroed, ``inner`` is updated
  with ``masks=`` and ``masks_updated=`` as in :func:`dynamic_sparse`, and the
  updates keep every pruned weight at exactly 0 (``-params`` there at the
  first step and where a pruning step prunes, 0 otherwise); at a
  pruning step every params-shaped moment of the inner state is reset where
  weights were pruned (:func:`reset_changed_moments`). Pruning runs on
  device, gated by the step counter, with the counts a host-computed table
  (one int32 per pruning step and sparse leaf, a constant of the compiled
  step): no host sync, no retrace.

  Structure: under ``"constant_fan_in"`` and ``(n, m)`` every neuron of a
  layer keeps the same number of inputs at every step, so SparseOpt's factor
  is 1 (``s_i == s_avg``). ``(n, m)`` needs ``sparsity == 1 - n / m`` and a
  fan-in (the flattened non-neuron axes in C order, ``H*W*Cin`` for a Conv,
  groups running along ``Cin``) divisible by ``m``; before ``end_step`` a
  group keeps ``k_t`` of its ``m`` (between ``n`` and ``m``), from
  ``end_step`` on exactly ``n``. Structured options need ``scope="layer"``.

  Args:
    inner: any optax transformation.
    sparsity: final sparsity :math:`s_f` in ``[0, 1)`` over the sparse leaves.
    start_step: :math:`t_0`, the first pruning step (:math:`s = 0` there).
    end_step: :math:`t_{end}`, the last pruning step, where the final
      sparsity is reached; ``end_step - start_step`` must be a multiple of
      ``update_every``.
    update_every: :math:`\Delta t`, steps between pruning steps.
    distribution: ``"erk"`` or ``"uniform"``: per-layer final densities
      (:func:`layer_densities`).
    schedule: ``"cubic"`` or a callable ``step -> sparsity``.
    scope: ``"layer"`` (per-layer targets) or ``"global"`` (one ranking).
    filter_fn: which leaves are sparse (see :func:`init_masks`).
    structure: ``"unstructured"``, ``"constant_fan_in"`` or ``(n, m)``.
    neuron_axis: the output-unit axis of structured leaves (Flax: ``-1``),
      a tuple of axes (attention kernels), or a per-leaf pytree or callable,
      as in :func:`init_masks` (ERK reads it too).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` requires
    ``params`` and whose state is a :class:`DynamicSparseState`
    (``num_changed``: weights pruned at the last pruning step).

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import sparseopt_jax as sparseopt
    >>> params = {"w": jax.random.normal(jax.random.key(0), (16, 8))}
    >>> tx = sparseopt.gradual_pruning(
    ...     optax.sgd(0.1), 0.75, start_step=0, end_step=4, update_every=2,
    ...     distribution="uniform")
    >>> state, step = tx.init(params), jax.jit(tx.update)
    >>> kept = []
    >>> for _ in range(5):
    ...   updates, state = step(params, state, params)
    ...   params = optax.apply_updates(params, updates)
    ...   kept.append(int(sparseopt.get_masks(state)["w"].sum()))
    >>> kept  # 128 - floor(r_t * 96), r = 0, 7/8, 1 at steps 0, 2, 4
    [128, 128, 44, 44, 32]

  References:
    Zhu & Gupta. To prune, or not to prune: exploring the efficacy of pruning
    for model compression. 2017. https://arxiv.org/abs/1710.01878

    Lasby et al. Dynamic Sparse Training with Structured Sparsity (SRigL).
    ICLR 2024. https://arxiv.org/abs/2305.02299
  """
  sparsity = masks_lib.check_sparsity(sparsity, "sparsity")
  start_step = _check_step(start_step, "start_step")
  end_step = _check_step(end_step, "end_step")
  update_every = _check_step(update_every, "update_every")
  if update_every < 1:
    raise ValueError(f"update_every must be >= 1, got {update_every}.")
  if not 0 <= start_step <= end_step:
    raise ValueError(
        f"Need 0 <= start_step <= end_step, got start_step={start_step}, "
        f"end_step={end_step}."
    )
  if (end_step - start_step) % update_every:
    raise ValueError(
        f"end_step - start_step = {end_step - start_step} must be a multiple "
        f"of update_every={update_every}, so that end_step is a pruning step."
    )
  if distribution not in masks_lib.DISTRIBUTIONS:
    raise ValueError(
        f"Unknown distribution {distribution!r}; expected one of "
        f"{masks_lib.DISTRIBUTIONS}."
    )
  if not callable(schedule) and schedule not in SCHEDULES:
    raise ValueError(
        f"Unknown schedule {schedule!r}; expected one of {SCHEDULES} or a "
        f"callable step -> sparsity."
    )
  if scope not in SCOPES:
    raise ValueError(f"Unknown scope {scope!r}; expected one of {SCOPES}.")
  structure = structure_lib.check_structure(structure)
  if scope == "global" and not structure_lib.is_unstructured(structure):
    raise ValueError(
        f"scope='global' ranks all layers together and cannot keep "
        f"structure={structure!r}; use scope='layer'."
    )
  masks_lib.check_nm_sparsity(structure, sparsity)
  steps = list(range(start_step, end_step + 1, update_every))
  progress = _progress(sparsity, steps, start_step, end_step, schedule)
  inner = optax.with_extra_args_support(inner)

  def plan(params):
    """Host-side, from static shapes: sparse leaves and the kept-count table.

    Returns ``(flags, sizes, table, axes)``: the sparse-leaf flags,
    ``sizes[i] = (groups, group_size, final_kept)`` per sparse leaf (one entry for the whole tree when
    global), ``table[j, i]`` the kept count per group at pruning step ``j``,
    ``axes[i]`` the neuron axes of sparse leaf ``i``.
    """
    flags = tree_lib.resolve_filter(filter_fn, params)
    all_axes = jax.tree.structure(params).flatten_up_to(
        tree_lib.resolve_neuron_axes(neuron_axis, params)
    )
    axes = [a for a, f in zip(all_axes, jax.tree.leaves(flags)) if f]
    leaves = [
        (tree_lib.path_str(p), tuple(int(d) for d in np.shape(x)))
        for (p, x), f in zip(
            jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(flags)
        )
        if f
    ]
    if scope == "global":
      total = sum(math.prod(s) for _, s in leaves)
      final = int(math.floor((1.0 - sparsity) * total + 0.5))
      sizes = [(1, total, final)]
    else:
      densities = masks_lib.layer_densities(
          params,
          sparsity,
          distribution,
          filter_fn=filter_fn,
          neuron_axis=neuron_axis,
      )
      sizes = []
      for (name, shape), ax in zip(leaves, axes):
        groups, size = structure_lib.group_shape(shape, structure, ax, name)
        final = structure_lib.kept_per_group(densities[name], size, structure)
        sizes.append((groups, size, final))
    largest = max((size for _, size, _ in sizes), default=0)
    if largest >= 2**31:
      raise ValueError(
          f"gradual_pruning(scope={scope!r}): a group of {largest} weights; "
          "its kept counts are int32, which holds at most 2**31 - 1. Prune "
          "such a model with scope='layer'."
      )
    table = np.asarray(
        [[_kept(r_size, k, r) for _, r_size, k in sizes] for r in progress],
        np.int32,
    ).reshape(len(progress), len(sizes))
    return flags, sizes, table, axes

  def init_fn(params):
    leaves = jax.tree.leaves(params)
    if not (leaves and all(hasattr(x, "shape") for x in leaves)):
      # optax.tree.map_params calls init with a placeholder: no shapes, so no
      # masks; a scalar leaf marks the mask fields as not params-like.
      unknown = jnp.zeros([], bool)
      return dst.DynamicSparseState(
          count=jnp.zeros([], jnp.int32),
          key=jax.random.key(0),
          masks=unknown,
          ever_active=jnp.zeros([], bool),
          num_changed=jnp.zeros([], bool),
          masks_updated=jnp.zeros([], bool),
          inner_state=inner.init(params),
      )
    flags, _, _, _ = plan(params)  # validates shapes and the structure
    dense = jax.tree.map(
        lambda f, x: jnp.ones(np.shape(x), bool) if f else None, flags, params
    )
    return dst.DynamicSparseState(
        count=jnp.zeros([], jnp.int32),
        # Unused (pruning is deterministic); DynamicSparseState has a key.
        key=jax.random.key(0),
        masks=dense,
        ever_active=jax.tree.map(jnp.copy, dense),
        num_changed=jax.tree.map(lambda _: jnp.zeros([], jnp.int32), dense),
        masks_updated=jnp.zeros([], bool),
        inner_state=inner.init(params),
    )

  def is_update_at(count):
    return (
        (count >= start_step)
        & (count <= end_step)
        & ((count - start_step) % update_every == 0)
    )

  def drop_scores(m, w):
    # Smallest magnitudes first, non-finite weights before all; inactive
    # entries never. Every zero weight scores -0.0, so zeros tie.
    return jnp.where(m, -dst.finite_magnitude(w), -jnp.inf)

  def prune(count, old, params, grads, key):
    del grads
    _, sizes, table, axes = plan(params)
    j = jnp.clip((count - start_step) // update_every, 0, len(steps) - 1)
    kept = jnp.asarray(table)[j]
    paths = [p for p, _ in tree_lib.mask_leaves_with_path(old)]
    old_leaves = [m for _, m in tree_lib.mask_leaves_with_path(old)]
    flat_params = {
        tree_lib.path_str(p): x
        for p, x in jax.tree_util.tree_leaves_with_path(params)
    }
    weights = [flat_params[tree_lib.path_str(p)] for p in paths]
    if scope == "global":
      _, total, final = sizes[0]
      scores = jnp.concatenate(
          [drop_scores(m, w).reshape(-1) for m, w in zip(old_leaves, weights)]
          or [jnp.zeros([0])]
      )
      active = sum(jnp.sum(m, dtype=jnp.int32) for m in old_leaves)
      k_max = total - final
      n_drop = jnp.clip(active - kept[0], 0, k_max)
      dropped = (
          dst.select_top_k(scores, k_max, n_drop)
          if k_max
          else jnp.zeros(scores.shape, bool)
      )
      offsets = np.cumsum([0] + [m.size for m in old_leaves])
      new_leaves = [
          m & ~dropped[a:b].reshape(m.shape)
          for m, a, b in zip(old_leaves, offsets[:-1], offsets[1:])
      ]
    else:
      new_leaves = []
      for i, (m, w) in enumerate(zip(old_leaves, weights)):
        _, size, final = sizes[i]
        k_max = size - final
        if k_max == 0:
          new_leaves.append(m)
          continue
        ax = axes[i]
        rows = structure_lib.to_groups(drop_scores(m, w), structure, ax)
        active = jnp.sum(
            structure_lib.to_groups(m, structure, ax), axis=1, dtype=jnp.int32
        )
        n_drop = jnp.clip(active - kept[i], 0, k_max)
        if rows.shape[0] == 1:  # Unstructured: one group, the whole layer.
          dropped = dst.select_top_k(rows[0], k_max, n_drop[0])[None]
        else:
          dropped = jax.vmap(
              lambda s, k, k_max=k_max: dst.first_k_of_top(s, k_max, k)
          )(rows, n_drop)
        dropped = structure_lib.from_groups(dropped, m.shape, structure, ax)
        new_leaves.append(m & ~dropped)
    by_name = {
        tree_lib.path_str(p): n for p, n in zip(paths, new_leaves, strict=True)
    }
    new = tree_lib.map_masked(
        lambda p, m: None if m is None else by_name[tree_lib.path_str(p)],
        old,
        with_path=True,
    )
    num = tree_lib.map_masked(
        lambda o, n: None if o is None else jnp.sum(o & ~n, dtype=jnp.int32),
        old,
        new,
    )
    return new, num, key

  def update_fn(grads, state, params=None, **extra_args):
    return dst.sparse_step(
        inner,
        grads,
        state,
        params,
        extra_args,
        who="gradual_pruning",
        is_update_at=is_update_at,
        change_topology=prune,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
