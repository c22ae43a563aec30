"""Sparsity masks: creation (random, magnitude), distributions, measurement.

Masks are data: a pytree shaped like ``params`` with ``bool`` arrays for
sparse leaves and ``None`` for dense leaves. Creation happens once, outside
the training step; every count is a Python int derived from static shapes,
so each layer keeps *exactly* its number of active weights.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparseopt_jax._src import structure as structure_lib
from sparseopt_jax._src import tree as tree_lib
from sparseopt_jax._src.tree import PyTree

DISTRIBUTIONS = ("erk", "uniform")


def check_sparsity(value: Any, name: str) -> float:
  try:
    s = float(value)
  except (TypeError, ValueError):
    raise TypeError(
        f"{name} must be a number in [0, 1), got {value!r}."
    ) from None
  if not 0.0 <= s < 1.0 or math.isnan(s):
    raise ValueError(f"{name} must be in [0, 1), got {value!r}.")
  return s


def _erk_raw_density(shape: tuple[int, ...], axes: object = None) -> float:
  """ERK's unnormalized density of a kernel (see :func:`layer_densities`).

  With an int (or no) neuron axis: Evci et al.'s per-dimension formula,
  ``sum(shape) / prod(shape)`` (Conv ``(H, W, Cin, Cout)``: ``(H + W + Cin +
  Cout) / (H W Cin Cout)``; Dense: ``(in + out) / (in out)``). With a tuple
  of (normalized) neuron axes the kernel is a ``DenseGeneral``: the 2-D
  matrix it computes, ``fan_in x fan_out`` with ``fan_out`` the product of
  the neuron axes and ``fan_in`` of the others, gets the Dense formula
  ``(fan_in + fan_out) / (fan_in fan_out)``.
  """
  if isinstance(axes, tuple):
    fan_out = math.prod(shape[a] for a in axes)
    fan_in = math.prod(shape) // max(fan_out, 1)
    return (fan_in + fan_out) / (fan_in * fan_out)
  # Erdős–Rényi-Kernel: density ∝ (sum of kernel dims) / (product of dims).
  return sum(shape) / math.prod(shape)


def layer_densities(
    params: PyTree,
    sparsity: float,
    distribution: str = "erk",
    *,
    filter_fn: tree_lib.LeafFilter | None = None,
    overrides: Mapping[str, float] | None = None,
    erk_power_scale: float = 1.0,
    neuron_axis: tree_lib.NeuronAxisSpec = -1,
) -> dict[str, float]:
  """Per-layer densities (``1 - sparsity``) of a sparsity distribution.

  ``uniform`` gives every sparse leaf density ``1 - sparsity``. ``erk``
  (Evci et al. 2020) gives leaf ``l`` density
  ``eps * (sum(shape_l) / prod(shape_l)) ** erk_power_scale``, with ``eps``
  chosen so that the sparse leaves together keep ``(1 - sparsity)`` of their
  weights; a leaf whose density would exceed 1 is made dense and the budget
  is redistributed over the rest. Leaves matched by ``overrides`` get their
  given sparsity and are left out of the budget: the other sparse leaves
  together hit ``sparsity``.

  Args:
    params: the parameter pytree (only shapes are read).
    sparsity: target sparsity in ``[0, 1)``.
    distribution: ``"erk"`` or ``"uniform"``.
    filter_fn: which leaves are sparse: a ``filter_fn(path, leaf) -> bool`` or
      a pytree of bools; defaults to :func:`is_kernel` (``ndim >= 2``).
    overrides: ``{path_regex: sparsity}``; the first regex that
      :func:`re.search`-matches a sparse leaf's path string wins.
    erk_power_scale: exponent on the ERK raw density (1.0 in RigL).
    neuron_axis: only read by ``erk``, per leaf (an int, a tuple, a pytree
      or a callable, as in :func:`scale_by_sparseopt`). An int (the default)
      or ``None`` keeps the per-dimension raw density
      ``sum(shape) / prod(shape)`` above, Evci et al.'s definition for Conv
      ``(H, W, Cin, Cout)`` kernels. A tuple of axes declares a
      ``DenseGeneral`` kernel (attention ``(d_model, heads, head_dim)`` with
      ``(1, 2)``, output ``(heads, head_dim, d_model)`` with ``(2,)``): its
      raw density is that of the equivalent Dense ``(fan_in, fan_out)``
      matrix, ``(fan_in + fan_out) / (fan_in * fan_out)`` with ``fan_out``
      the product of the neuron axes and ``fan_in`` of the rest. For 2-D
      kernels both are the same; for a 3-D attention kernel the
      per-dimension formula would treat ``heads`` and ``head_dim`` as
      separate dimensions (as if a convolution's window) and give it a lower
      density than the Dense layer it is.

  Returns:
    ``{path_string: density}`` for every sparse leaf, in tree order.

  Examples:
    >>> import jax.numpy as jnp
    >>> import sparseopt_jax as sparseopt
    >>> params = {"q": jnp.ones((8, 2, 4)), "out": jnp.ones((2, 4, 8))}
    >>> d = sparseopt.layer_densities(params, 0.5,
    ...                               neuron_axis={"q": (1, 2), "out": (2,)})
    >>> d == {"out": 0.5, "q": 0.5}  # both an (8, 8) Dense: equal densities
    True

  References:
    Evci et al., Rigging the Lottery: Making All Tickets Winners, 2020.
    https://arxiv.org/abs/1911.11134
  """
  sparsity = check_sparsity(sparsity, "sparsity")
  if distribution not in DISTRIBUTIONS:
    raise ValueError(
        f"Unknown distribution {distribution!r}; expected one of "
        f"{DISTRIBUTIONS}."
    )
  flags = tree_lib.resolve_filter(filter_fn, params)
  treedef = jax.tree.structure(params)
  leaf_axes = treedef.flatten_up_to(
      tree_lib.resolve_neuron_axes(neuron_axis, params)
  )
  shapes: dict[str, tuple[int, ...]] = {}
  erk_axes: dict[str, object] = {}
  for (path, leaf), flag, ax in zip(
      jax.tree_util.tree_leaves_with_path(params),
      jax.tree.leaves(flags),
      leaf_axes,
  ):
    if flag:
      name = tree_lib.path_str(path)
      shapes[name] = tuple(int(d) for d in np.shape(leaf))
      if isinstance(ax, tuple):
        erk_axes[name] = tree_lib.normalize_axes(ax, len(shapes[name]), name)

  fixed: dict[str, float] = {}
  for pattern, value in (overrides or {}).items():
    value = check_sparsity(value, f"overrides[{pattern!r}]")
    regex = re.compile(pattern)
    matched = [n for n in shapes if regex.search(n) and n not in fixed]
    if not any(regex.search(n) for n in shapes):
      raise ValueError(
          f"overrides[{pattern!r}] matches no sparse leaf; "
          f"sparse leaves are {list(shapes)}."
      )
    for n in matched:
      fixed[n] = 1.0 - value
  free = [n for n in shapes if n not in fixed]

  densities = dict(fixed)
  if distribution == "uniform":
    densities.update({n: 1.0 - sparsity for n in free})
  else:
    size = {n: math.prod(shapes[n]) for n in free}
    budget = (1.0 - sparsity) * sum(size.values())
    raw = {
        n: _erk_raw_density(shapes[n], erk_axes.get(n)) ** erk_power_scale
        for n in free
    }
    dense: set[str] = set()
    while True:
      remaining = budget - sum(size[n] for n in dense)
      weighted = sum(raw[n] * size[n] for n in free if n not in dense)
      eps = remaining / weighted if weighted > 0 else 0.0
      over = [n for n in free if n not in dense and eps * raw[n] > 1.0]
      if not over:
        break
      # Densest first, one at a time, as in the RigL reference code.
      dense.add(max(over, key=lambda n: raw[n]))
    for n in free:
      densities[n] = 1.0 if n in dense else eps * raw[n]
  return {n: densities[n] for n in shapes}


def _topk_mask(scores: jax.Array, k: int) -> jax.Array:
  """Boolean mask of the ``k`` largest scores; ties go to the lower index."""
  flat = scores.reshape(-1)
  order = jnp.argsort(-flat, stable=True)
  keep = jnp.zeros(flat.shape, bool).at[order[:k]].set(True)
  return keep.reshape(scores.shape)


def _topk_groups(scores: jax.Array, k: int) -> jax.Array:
  """Per row of ``scores``, a mask of its ``k`` largest; ties to lower index."""
  if k == 0:
    return jnp.zeros(scores.shape, bool)
  _, idx = jax.lax.top_k(scores, k)
  rows = jnp.arange(scores.shape[0])[:, None]
  return jnp.zeros(scores.shape, bool).at[rows, idx].set(True)


def check_nm_sparsity(
    structure: structure_lib.Structure, sparsity: float
) -> None:
  """N:M fixes the density at ``n / m``: ``sparsity`` must say the same."""
  if not isinstance(structure, tuple):
    return
  n, m = structure
  if abs(sparsity - (1.0 - n / m)) > 1e-9:
    raise ValueError(
        f"structure={structure!r} keeps {n} of every {m} inputs, so the "
        f"sparsity must be 1 - {n}/{m} = {1.0 - n / m}, got {sparsity}."
    )


def _build_masks(
    params,
    sparsity,
    distribution,
    filter_fn,
    overrides,
    erk_power_scale,
    score_fn,
    structure="unstructured",
    neuron_axis=-1,
) -> PyTree:
  structure = structure_lib.check_structure(structure)
  if isinstance(structure, tuple):
    check_nm_sparsity(structure, check_sparsity(sparsity, "sparsity"))
    if overrides:
      raise ValueError(
          f"overrides cannot be combined with N:M structure {structure!r}: "
          f"every sparse leaf keeps {structure[0]} of every {structure[1]}."
      )
  densities = layer_densities(
      params,
      sparsity,
      distribution,
      filter_fn=filter_fn,
      overrides=overrides,
      erk_power_scale=erk_power_scale,
      neuron_axis=neuron_axis,
  )
  index = {name: i for i, name in enumerate(densities)}

  def make(path, leaf, neuron_axis):
    name = tree_lib.path_str(path)
    if name not in densities:
      return None
    if structure_lib.is_unstructured(structure):
      size = int(np.size(leaf))
      k = int(math.floor(densities[name] * size + 0.5))
      return _topk_mask(score_fn(index[name], leaf), k)
    shape = tuple(int(d) for d in np.shape(leaf))
    _, size = structure_lib.group_shape(shape, structure, neuron_axis, name)
    k = structure_lib.kept_per_group(densities[name], size, structure)
    scores = structure_lib.to_groups(
        score_fn(index[name], leaf), structure, neuron_axis
    )
    return structure_lib.from_groups(
        _topk_groups(scores, k), shape, structure, neuron_axis
    )

  return jax.tree_util.tree_map_with_path(
      make, params, tree_lib.resolve_neuron_axes(neuron_axis, params)
  )


def init_masks(
    key: jax.Array,
    params: PyTree,
    sparsity: float,
    distribution: str = "erk",
    *,
    filter_fn: tree_lib.LeafFilter | None = None,
    overrides: Mapping[str, float] | None = None,
    erk_power_scale: float = 1.0,
    structure: str | tuple[int, int] = "unstructured",
    neuron_axis: tree_lib.NeuronAxisSpec = -1,
) -> PyTree:
  """Random sparsity masks for ``params``.

  Each sparse leaf keeps exactly ``round(density * size)`` entries, chosen as
  the top-k of uniform random scores drawn from ``key`` (ties broken by
  index), with per-leaf densities from :func:`layer_densities`.

  ``structure`` constrains where the active entries lie (the neuron is the
  ``neuron_axis``, last in Flax layout; its fan-in is every other axis,
  flattened in C order: ``in`` for Dense, ``H*W*Cin`` for Conv):

  * ``"unstructured"`` (default): the top-k over the whole leaf, as above.
  * ``"constant_fan_in"`` (SRigL): every neuron keeps exactly
    ``k = max(1, round(density * fan_in))`` inputs, the top-k of its own
    scores; the layer keeps ``k * neurons`` (close to, not always equal to,
    ``round(density * size)``), and no neuron is left without inputs.
  * ``(n, m)`` (N:M): every group of ``m`` consecutive inputs of a neuron
    (along the flattened fan-in, so along ``Cin`` for a Conv) keeps exactly
    ``n``. The density of every sparse leaf is ``n / m``: ``sparsity`` must
    equal ``1 - n / m`` (else ``ValueError``), ``distribution`` and
    ``erk_power_scale`` are not used, ``overrides`` are refused, and a leaf
    whose fan-in is not a multiple of ``m`` raises a ``ValueError`` naming it.

  Under both structured options every neuron of a layer has the same number
  of active inputs, so SparseOpt's factor
  (:func:`sparseopt_jax.diagnostics.fan_in_scale`) is 1 on them: every
  neuron's sparsity equals the layer's (``s_i == s_avg``).

  Args:
    key: a PRNG key.
    params: the parameter pytree.
    sparsity: target fraction of pruned weights over the sparse leaves, in
      ``[0, 1)``.
    distribution: ``"erk"`` (Erdős–Rényi-Kernel, the RigL default) or
      ``"uniform"``.
    filter_fn: which leaves are sparse: ``filter_fn(path, leaf) -> bool`` or
      a pytree of bools; default :func:`is_kernel` (``ndim >= 2``), so
      biases and norm parameters stay dense. See :func:`exclude_paths`.
    overrides: ``{path_regex: sparsity}`` for per-layer sparsities.
    erk_power_scale: exponent on the ERK raw density.
    structure: ``"unstructured"``, ``"constant_fan_in"`` or ``(n, m)``.
    neuron_axis: the output-unit axis of structured leaves (Flax: ``-1``),
      a tuple of axes whose combination is the neuron (attention
      ``(d_model, heads, head_dim)``: ``(1, 2)``), or a per-leaf pytree or
      callable (see :func:`scale_by_sparseopt`). ERK reads it too: see
      :func:`layer_densities`.

  Returns:
    A mask tree: ``bool`` arrays for sparse leaves, ``None`` for dense ones.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import sparseopt_jax as sparseopt
    >>> params = {"w": jnp.ones((8, 4)), "b": jnp.zeros(4)}
    >>> masks = sparseopt.init_masks(jax.random.key(0), params, 0.75,
    ...                              "uniform")
    >>> int(masks["w"].sum()), masks["b"]
    (8, None)
    >>> nm = sparseopt.init_masks(jax.random.key(0), params, 0.5,
    ...                           structure=(2, 4))
    >>> nm["w"].reshape(2, 4, 4).sum(axis=1).tolist()  # 2 of each 4 inputs
    [[2, 2, 2, 2], [2, 2, 2, 2]]

  References:
    Evci et al., Rigging the Lottery: Making All Tickets Winners, 2020.
    https://arxiv.org/abs/1911.11134

    Lasby et al., Dynamic Sparse Training with Structured Sparsity (SRigL),
    ICLR 2024. https://arxiv.org/abs/2305.02299

    Mishra et al., Accelerating Sparse Deep Neural Networks, 2021.
    https://arxiv.org/abs/2104.08378
  """

  def score(i, leaf):
    return jax.random.uniform(jax.random.fold_in(key, i), np.shape(leaf))

  return _build_masks(
      params,
      sparsity,
      distribution,
      filter_fn,
      overrides,
      erk_power_scale,
      score,
      structure,
      neuron_axis,
  )


def magnitude_masks(
    params: PyTree,
    sparsity: float,
    distribution: str = "erk",
    *,
    filter_fn: tree_lib.LeafFilter | None = None,
    overrides: Mapping[str, float] | None = None,
    erk_power_scale: float = 1.0,
    structure: str | tuple[int, int] = "unstructured",
    neuron_axis: tree_lib.NeuronAxisSpec = -1,
) -> PyTree:
  """Masks keeping the largest-magnitude weights of each sparse leaf.

  Same densities, exact counts and ``structure`` options as
  :func:`init_masks`, with ``|w|`` as the score (ties broken by index):
  one-shot magnitude pruning, or pruning at initialization. With a structure,
  each neuron (``"constant_fan_in"``) or each group of ``m`` inputs
  (``(n, m)``) keeps its own largest magnitudes.

  Args:
    params: the parameter pytree whose magnitudes are ranked.
    sparsity: target sparsity in ``[0, 1)``.
    distribution: ``"erk"`` or ``"uniform"``.
    filter_fn: which leaves are sparse (see :func:`init_masks`).
    overrides: ``{path_regex: sparsity}`` for per-layer sparsities.
    erk_power_scale: exponent on the ERK raw density.
    structure: ``"unstructured"``, ``"constant_fan_in"`` or ``(n, m)``.
    neuron_axis: the output-unit axis of structured leaves (Flax: ``-1``),
      a tuple of axes whose combination is the neuron (attention
      ``(d_model, heads, head_dim)``: ``(1, 2)``), or a per-leaf pytree or
      callable (see :func:`scale_by_sparseopt`). ERK reads it too: see
      :func:`layer_densities`.

  Returns:
    A mask tree.
  """
  return _build_masks(
      params,
      sparsity,
      distribution,
      filter_fn,
      overrides,
      erk_power_scale,
      lambda _, leaf: jnp.abs(leaf),
      structure,
      neuron_axis,
  )


def apply_masks(params: PyTree, masks: PyTree) -> PyTree:
  """Zeroes the masked-out entries of ``params``; dense leaves unchanged.

  Args:
    params: a params-shaped pytree (params, gradients or updates).
    masks: a mask tree for it.

  Returns:
    ``params`` with ``0`` wherever the mask is ``False``.
  """
  tree_lib.validate_masks(params, masks)
  return tree_lib.zero_masked(masks, params)


def neuron_counts(
    mask: jax.Array,
    neuron_axis: tree_lib.NeuronAxis = -1,
    *,
    name: str = "mask",
) -> tuple[jax.Array, int]:
  """Active incoming weights per neuron (int32) and the fan-in (static int).

  The counts are shaped like the neuron axes (a vector for an int axis); the
  fan-in is the product of the other axes.
  """
  ndim = np.ndim(mask)
  if ndim < 1:
    raise ValueError(f"{name!r}: a mask must have at least one axis.")
  axis = tree_lib.normalize_axes(neuron_axis, ndim, name)
  rest = tree_lib.reduce_axes(ndim, axis)
  fan_in = math.prod(np.shape(mask)[a] for a in rest)
  return tree_lib.count_along(jnp.asarray(mask), rest), fan_in


def neuron_density(
    mask: jax.Array,
    neuron_axis: tree_lib.NeuronAxis = -1,
    *,
    name: str = "mask",
) -> jax.Array:
  """Fraction of active incoming weights per neuron, ``1 - s_i`` (float32).

  Exactly 1 for a full neuron, also under ``jit`` (where XLA turns division
  by the constant fan-in into a multiplication by its rounded reciprocal).
  """
  return density_from_counts(*neuron_counts(mask, neuron_axis, name=name))


def density_from_counts(count: jax.Array, fan_in: int) -> jax.Array:
  """:func:`neuron_density` from counts already taken (float32)."""
  return jnp.where(
      count == fan_in, 1.0, count.astype(jnp.float32) / max(fan_in, 1)
  )


def neuron_sparsity(
    mask: jax.Array, neuron_axis: tree_lib.NeuronAxis = -1
) -> jax.Array:
  """Per-neuron sparsity ``s_i = 1 - nnz(M[..., i]) / fan_in``.

  Args:
    mask: a boolean mask, e.g. Dense ``(in, out)``, Conv
      ``(H, W, Cin, Cout)`` or an attention kernel.
    neuron_axis: the output-unit axis (Flax layout: ``-1``), or a tuple of
      axes whose combination is the neuron.

  Returns:
    A float32 array shaped like the neuron axes (a vector for an int axis);
    exactly 0 for full neurons.

  Examples:
    >>> import jax.numpy as jnp
    >>> import sparseopt_jax as sparseopt
    >>> q = jnp.ones((4, 2, 3), bool).at[:, 1, 2].set(False)
    >>> sparseopt.neuron_sparsity(q, (1, 2))  # (heads, head_dim) neurons
    Array([[0., 0., 0.],
           [0., 0., 1.]], dtype=float32)
  """
  count, fan_in = neuron_counts(mask, neuron_axis)
  return (fan_in - count).astype(jnp.float32) / max(fan_in, 1)


def sparsity(masks: PyTree) -> jax.Array:
  """Overall sparsity of a mask tree: pruned / total over the sparse leaves.

  Dense (``None``) leaves are not counted. Returns ``0.0`` when there are no
  sparse leaves.
  """
  leaves = [m for _, m in tree_lib.mask_leaves_with_path(masks)]
  total = sum(int(np.size(m)) for m in leaves)
  if total == 0:
    return jnp.float32(0.0)
  # Counted in float32 via int32 blocks: no overflow past 2**31 entries.
  active = sum(tree_lib.count_true(m) for m in leaves)
  return 1.0 - active / total


def layer_sparsity(masks: PyTree) -> dict[str, jax.Array]:
  """``{path_string: sparsity}`` for each sparse leaf of a mask tree."""
  return {
      tree_lib.path_str(p): 1.0 - tree_lib.count_true(m) / m.size
      for p, m in tree_lib.mask_leaves_with_path(masks)
  }


def sparse_init(
    key: jax.Array,
    params: PyTree,
    masks: PyTree,
    *,
    scale: float = 2.0,
    neuron_axis: tree_lib.NeuronAxisSpec = -1,
) -> PyTree:
  r"""Fan-in-aware re-initialization of sparse leaves (Evci et al. 2022).

  Every active weight of neuron :math:`i` is drawn from
  :math:`\mathcal N(0, \text{scale} / \text{fan\_in}_i)`, where
  :math:`\text{fan\_in}_i` is the neuron's number of *active* incoming
  weights, instead of the dense fan-in. Each neuron's pre-activation then has
  the same variance whatever its sparsity (He init for ``scale=2``), which
  removes the :math:`\sqrt{1 - s_i}` factor that masking a dense
  initialization puts on neuron norms. Pruned entries are 0; dense leaves,
  1-D leaves and neurons with no active weight are left as they are.

  Args:
    key: a PRNG key.
    params: the parameter pytree.
    masks: its mask tree.
    scale: variance numerator (2.0: He / ReLU).
    neuron_axis: the output-unit axis, a tuple of axes (attention kernels),
      or a per-leaf pytree or callable (see :func:`scale_by_sparseopt`); a
      leaf it gives ``None`` is left as it is.

  Returns:
    params with re-drawn sparse leaves.

  References:
    Evci, Ioannou, Keskin, Dauphin. Gradient Flow in Sparse Neural Networks
    and How Lottery Tickets Win. AAAI 2022. https://arxiv.org/abs/2010.03533
  """
  tree_lib.validate_masks(params, masks)
  if not scale > 0:
    raise ValueError(f"scale must be > 0, got {scale}.")
  leaves = tree_lib.mask_leaves_with_path(masks)
  index = {tree_lib.path_str(p): i for i, (p, _) in enumerate(leaves)}

  axes = tree_lib.resolve_neuron_axes(neuron_axis, masks)

  def draw(path, mask, param, ax):
    if mask is None or mask.ndim < 2 or ax is None:
      return param
    name = tree_lib.path_str(path)
    axis = tree_lib.normalize_axes(ax, mask.ndim, name)
    fan_in = jnp.sum(
        mask, axis=tree_lib.reduce_axes(mask.ndim, axis), dtype=jnp.int32
    )
    std = jnp.sqrt(scale / jnp.maximum(fan_in, 1).astype(jnp.float32))
    z = jax.random.normal(jax.random.fold_in(key, index[name]), mask.shape)
    w = z * tree_lib.broadcast_neuron(std, mask.ndim, axis)
    return jnp.where(mask, w, 0).astype(param.dtype)

  return tree_lib.map_masked(draw, masks, params, axes, with_path=True)
