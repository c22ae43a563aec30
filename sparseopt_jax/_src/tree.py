"""Pytree plumbing shared by the mask, transform and DST modules.

A *mask tree* is a pytree with the structure of ``params`` whose leaves are
``bool`` arrays for sparse leaves and ``None`` for dense ones. ``None`` is an
empty subtree to ``jax.tree_util``, so every helper here flattens mask trees
with ``is_leaf=is_none`` to keep them aligned with ``params``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
KeyPath = tuple[Any, ...]
FilterFn = Callable[[KeyPath, Any], bool]
# Which leaves a function applies to: a ``filter_fn(path, leaf) -> bool`` or a
# pytree of Python bools with the structure of ``params``.
LeafFilter = FilterFn | PyTree


def is_none(x: Any) -> bool:
  return x is None


def path_str(path: KeyPath) -> str:
  """Formats a pytree key path as ``"Dense_0/kernel"``.

  This is the string that :func:`exclude_paths`, ``overrides`` and every error
  message use to name a parameter.

  Args:
    path: a key path as given by ``jax.tree_util.tree_flatten_with_path``.

  Returns:
    The keys joined by ``"/"``; the empty path (a single-array pytree) is
    ``"<root>"``.
  """
  parts = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      parts.append(str(k.name))
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
    elif isinstance(k, jax.tree_util.FlattenedIndexKey):
      parts.append(str(k.key))
    else:
      parts.append(str(k))
  return "/".join(parts) if parts else "<root>"


def is_kernel(path: KeyPath, leaf: Any) -> bool:
  """Default sparsity filter: every leaf with ``ndim >= 2`` is sparse.

  Kernels of Dense ``(in, out)`` and Conv ``(H, W, Cin, Cout)`` layers are
  selected; biases and normalization scales/offsets (1-D) stay dense.

  Args:
    path: the leaf's key path (unused; part of the ``filter_fn`` signature).
    leaf: the parameter.

  Returns:
    Whether the leaf is sparse.
  """
  del path
  return np.ndim(leaf) >= 2


def exclude_paths(*patterns: str, base: FilterFn = is_kernel) -> FilterFn:
  """Builds a ``filter_fn`` that is ``base`` minus the leaves matching a regex.

  Paths are formatted by :func:`path_str` (``"Dense_0/kernel"``) and matched
  with :func:`re.search`, so ``exclude_paths("head")`` drops every leaf whose
  path contains ``head`` and ``exclude_paths("^Conv_0/")`` only the stem.

  Args:
    *patterns: regular expressions; a leaf matching any of them is excluded.
    base: the filter to refine; defaults to :func:`is_kernel`.

  Returns:
    A ``filter_fn(path, leaf) -> bool``.

  Examples:
    >>> import sparseopt_jax as sparseopt
    >>> f = sparseopt.exclude_paths("Dense_1")
    >>> import jax.numpy as jnp, jax
    >>> params = {"Dense_0": {"kernel": jnp.ones((3, 4))},
    ...           "Dense_1": {"kernel": jnp.ones((4, 2))}}
    >>> [f(p, x) for p, x in jax.tree_util.tree_leaves_with_path(params)]
    [True, False]
  """
  compiled = [re.compile(p) for p in patterns]

  def filter_fn(path: KeyPath, leaf: Any) -> bool:
    if not base(path, leaf):
      return False
    name = path_str(path)
    return not any(c.search(name) for c in compiled)

  return filter_fn


def resolve_filter(
    leaf_filter: LeafFilter | None,
    tree: PyTree,
    *,
    default: FilterFn = is_kernel,
    argname: str = "filter_fn",
) -> PyTree:
  """Evaluates a filter on ``tree``: a pytree of Python bools like ``tree``."""
  if leaf_filter is None:
    leaf_filter = default
  if callable(leaf_filter):
    return jax.tree_util.tree_map_with_path(
        lambda p, x: bool(leaf_filter(p, x)), tree
    )
  flags = leaf_filter
  if jax.tree.structure(flags) != jax.tree.structure(tree):
    raise ValueError(
        f"{argname}: a pytree filter must have the structure of the params; "
        f"got {jax.tree.structure(flags)}, params have "
        f"{jax.tree.structure(tree)}."
    )
  for path, v in jax.tree_util.tree_leaves_with_path(flags):
    if not isinstance(v, (bool, np.bool_)):
      raise TypeError(
          f"{argname}: leaf {path_str(path)!r} must be a Python "
          f"bool, got {type(v).__name__}."
      )
  return jax.tree.map(bool, flags)


def map_masked(
    f: Callable[..., Any],
    masks: PyTree,
    *trees: PyTree,
    with_path: bool = False,
) -> PyTree:
  """``jax.tree.map`` over a mask tree and params-shaped trees.

  ``f(mask, *leaves)`` is called for every leaf, with ``mask`` ``None`` for
  dense leaves (and ``f(path, mask, *leaves)`` when ``with_path``).
  """
  if with_path:
    return jax.tree_util.tree_map_with_path(f, masks, *trees, is_leaf=is_none)
  return jax.tree.map(f, masks, *trees, is_leaf=is_none)


def mask_leaves_with_path(masks: PyTree) -> list[tuple[KeyPath, Any]]:
  """``(path, mask)`` for the sparse (non-``None``) leaves of a mask tree."""
  return [
      (p, m)
      for p, m in jax.tree_util.tree_leaves_with_path(masks, is_leaf=is_none)
      if m is not None
  ]


def validate_masks(
    params: PyTree, masks: PyTree, *, argname: str = "masks"
) -> None:
  """Checks that ``masks`` is a valid mask tree for ``params``.

  Raises a clear error naming the offending parameter path when the tree
  structure differs, a mask is not boolean, or a mask's shape differs from
  its parameter's. Only static properties (structure, dtype, shape) are
  checked, so this works on tracers inside ``jax.jit``.

  Args:
    params: the parameter pytree (arrays, or anything with shape/dtype).
    masks: the mask tree: ``bool`` arrays for sparse leaves, ``None`` for
      dense ones.
    argname: what to call ``masks`` in error messages.

  Raises:
    ValueError: structure or shape mismatch.
    TypeError: a mask that is not boolean.
  """
  mask_def = jax.tree.structure(masks, is_leaf=is_none)
  param_def = jax.tree.structure(params)
  if mask_def != param_def:
    mask_paths = {
        path_str(p)
        for p, _ in jax.tree_util.tree_leaves_with_path(masks, is_leaf=is_none)
    }
    param_paths = {
        path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)
    }
    only_m = sorted(mask_paths - param_paths)
    only_p = sorted(param_paths - mask_paths)
    detail = []
    if only_p:
      detail.append(f"params have {only_p[:5]} that {argname} lack")
    if only_m:
      detail.append(f"{argname} have {only_m[:5]} that params lack")
    if not detail:
      detail.append(f"{argname}: {mask_def}; params: {param_def}")
    raise ValueError(
        f"{argname} must have the tree structure of the params (use None for "
        f"dense leaves): " + "; ".join(detail) + "."
    )

  def check(path, mask, param):
    if mask is None:
      return
    name = path_str(path)
    dtype = getattr(mask, "dtype", None)
    if dtype is None or jnp.dtype(dtype) != jnp.bool_:
      raise TypeError(
          f"{argname}[{name!r}] must be a boolean array, got dtype {dtype}; "
          f"convert with `m.astype(bool)` or build masks with init_masks."
      )
    if tuple(np.shape(mask)) != tuple(np.shape(param)):
      raise ValueError(
          f"{argname}[{name!r}] has shape {tuple(np.shape(mask))} but the "
          f"parameter has shape {tuple(np.shape(param))}."
      )

  map_masked(check, masks, params, with_path=True)


def normalize_axis(axis: int, ndim: int, name: str) -> int:
  """Returns ``axis`` in ``[0, ndim)`` or raises naming the parameter path."""
  if not is_axis_int(axis):
    raise TypeError(f"neuron_axis must be an int, got {axis!r}.")
  if not -ndim <= axis < ndim:
    raise ValueError(
        f"neuron_axis={axis} is out of range for {name!r} with ndim={ndim} "
        f"(valid: {-ndim}..{ndim - 1})."
    )
  return int(axis) % ndim


# The neuron axes of one leaf: an int, or a tuple of ints when the output unit
# spans several axes (DenseGeneral / attention kernels); ``None`` when the
# leaf has none.
NeuronAxis = int | tuple[int, ...]
# What a ``neuron_axis=`` argument takes: one NeuronAxis for every leaf, a
# pytree of them (``None`` leaves allowed) aligned with the params, or a
# callable ``(path, leaf) -> NeuronAxis | None``.
NeuronAxisSpec = NeuronAxis | PyTree | Callable[[KeyPath, Any], Any]

_SPEC_HELP = (
    "neuron_axis must be an int, a non-empty tuple of ints, a pytree of "
    "them (None for leaves without one) aligned with the params, or a "
    "callable (path, leaf) -> axes"
)


def is_axis_int(x: Any) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def is_axes(x: Any) -> bool:
  """Whether ``x`` is one leaf's neuron axes: an int or a tuple of ints."""
  if is_axis_int(x):
    return True
  return isinstance(x, tuple) and bool(x) and all(is_axis_int(a) for a in x)


def _spec_leaf(x: Any) -> bool:
  return x is None or is_axes(x)


def check_neuron_axis_spec(spec: NeuronAxisSpec) -> None:
  """Raises ``TypeError`` unless ``spec`` is a valid ``neuron_axis=`` value.

  Only the form is checked (at construction); ranges are checked per leaf,
  when the leaf is used, by :func:`normalize_axes`.
  """
  if is_axes(spec) or callable(spec):
    return
  leaves = jax.tree.leaves(spec, is_leaf=_spec_leaf)
  bad = [x for x in leaves if not _spec_leaf(x)]
  if bad or spec is None:
    raise TypeError(f"{_SPEC_HELP}; got {spec!r}.")


def leaves_like(spec: Any, tree: PyTree, requirement: str) -> list[Any]:
  """``spec``'s subtrees at the leaves of ``tree`` (its ``None`` leaves too).

  For per-leaf options given as a pytree shaped like the params.

  Raises:
    ValueError: ``spec`` does not have ``tree``'s structure; the message is
      ``requirement`` followed by what was given.
  """
  treedef = jax.tree.structure(tree, is_leaf=is_none)
  try:
    return treedef.flatten_up_to(spec)
  except (ValueError, TypeError) as e:
    raise ValueError(
        f"{requirement}; got {spec!r} for params {treedef}."
    ) from e


def resolve_neuron_axes(spec: NeuronAxisSpec, tree: PyTree) -> PyTree:
  """Each leaf's neuron axes under a ``neuron_axis=`` spec (see below).

  This is the one place where a spec is read. ``spec`` is

  * an int or a non-empty tuple of ints: the same axes for every leaf. A
    tuple makes the neuron the combination of those axes: for an attention
    query kernel ``(d_model, heads, head_dim)``, ``(1, 2)`` has
    ``heads * head_dim`` neurons with fan-in ``d_model``. A tuple of ints is
    always read as axes, never as a pytree;
  * a pytree with the structure of ``tree`` whose leaves are ints, tuples of
    ints or ``None`` (the leaf has no neuron axis);
  * a callable ``(path, leaf) -> int | tuple | None``.

  Args:
    spec: the ``neuron_axis=`` argument.
    tree: params, or a mask tree (its ``None`` leaves resolve to ``None``).

  Returns:
    A list-free tree aligned with ``tree`` (``None`` leaves kept) whose leaves
    are the raw per-leaf axes (int, tuple or ``None``), not yet normalized:
    pass it as a *secondary* tree to ``jax.tree.map`` (its tuples are leaves
    there only by position) and normalize each with :func:`normalize_axes`.

  Raises:
    TypeError: a malformed spec, or a callable returning something else.
    ValueError: a pytree spec whose structure differs from ``tree``'s.
  """
  if is_axes(spec):
    return jax.tree.map(
        lambda x: None if x is None else spec, tree, is_leaf=is_none
    )
  if callable(spec):

    def call(path, x):
      if x is None:
        return None
      v = spec(path, x)
      if not _spec_leaf(v):
        raise TypeError(
            f"neuron_axis callable returned {v!r} for {path_str(path)!r}; "
            "expected an int, a non-empty tuple of ints or None."
        )
      return v

    return jax.tree_util.tree_map_with_path(call, tree, is_leaf=is_none)
  check_neuron_axis_spec(spec)
  treedef = jax.tree.structure(tree, is_leaf=is_none)
  leaves = leaves_like(
      spec,
      tree,
      "neuron_axis: a pytree spec must have the structure of the params "
      "(an int, a tuple of ints or None at each leaf)",
  )
  for (path, _), v in zip(
      jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_none), leaves
  ):
    if not _spec_leaf(v):
      raise TypeError(
          f"neuron_axis[{path_str(path)!r}] must be an int, a non-empty tuple "
          f"of ints or None, got {v!r}."
      )
  flat = jax.tree.leaves(tree, is_leaf=is_none)
  leaves = [None if x is None else v for x, v in zip(flat, leaves)]
  return jax.tree.unflatten(treedef, leaves)


def flat_neuron_axes(spec: NeuronAxisSpec, tree: PyTree) -> list[Any]:
  """:func:`resolve_neuron_axes` as a list aligned with ``tree``'s leaves.

  The leaves are those of ``jax.tree.leaves(tree, is_leaf=is_none)``, so a
  mask tree's ``None`` leaves have an entry (``None``).
  """
  treedef = jax.tree.structure(tree, is_leaf=is_none)
  return treedef.flatten_up_to(resolve_neuron_axes(spec, tree))


def masked_leaves_with_axes(
    masks: PyTree, spec: NeuronAxisSpec
) -> list[tuple[KeyPath, Any, Any]]:
  """``(path, mask, axes)`` for the sparse leaves of a mask tree."""
  return [
      (p, m, ax)
      for (p, m), ax in zip(
          jax.tree_util.tree_leaves_with_path(masks, is_leaf=is_none),
          flat_neuron_axes(spec, masks),
      )
      if m is not None
  ]


def normalize_axes(axes: Any, ndim: int, name: str) -> tuple[int, ...]:
  """One leaf's neuron axes as a sorted tuple in ``[0, ndim)``.

  An int ``a`` gives ``(a % ndim,)``, with the errors of
  :func:`normalize_axis`. Per-neuron arrays (counts, factors, variances)
  have the shape of the neuron axes in increasing order.

  Raises:
    TypeError: ``axes`` is neither an int nor a non-empty tuple of ints.
    ValueError: naming ``name``: an axis out of range, a repeated axis, or
      ``None`` (the spec gives the leaf no neuron axis).
  """
  if is_axis_int(axes):
    return (normalize_axis(axes, ndim, name),)
  if axes is None:
    raise ValueError(
        f"{name!r} has no neuron axis (neuron_axis gives None for it) but is "
        "used where one is needed."
    )
  if not is_axes(axes):
    raise TypeError(f"{_SPEC_HELP}; got {axes!r} for {name!r}.")
  for a in axes:
    if not -ndim <= a < ndim:
      raise ValueError(
          f"neuron_axis={axes}: axis {a} is out of range for {name!r} with "
          f"ndim={ndim} (valid: {-ndim}..{ndim - 1})."
      )
  out = tuple(sorted(int(a) % ndim for a in axes))
  if len(set(out)) != len(out):
    raise ValueError(
        f"neuron_axis={axes} names an axis of {name!r} (ndim={ndim}) twice."
    )
  return out


def reduce_axes(ndim: int, axis: int | tuple[int, ...]) -> tuple[int, ...]:
  """The fan-in axes: every axis that is not a (normalized) neuron axis."""
  axes = (axis,) if is_axis_int(axis) else axis
  return tuple(a for a in range(ndim) if a not in axes)


def neuron_shape(
    shape: tuple[int, ...], axis: int | tuple[int, ...]
) -> tuple[int, ...]:
  """The shape of a per-neuron array for (normalized) neuron axes."""
  axes = (axis,) if is_axis_int(axis) else axis
  return tuple(int(shape[a]) for a in axes)


def broadcast_neuron(
    v: jax.Array, ndim: int, axis: int | tuple[int, ...]
) -> jax.Array:
  """Reshapes a per-neuron array to broadcast along the (normalized) axes."""
  axes = (axis,) if is_axis_int(axis) else axis
  shape = [1] * ndim
  for i, a in enumerate(axes):
    shape[a] = v.shape[i]
  return v.reshape(shape)


def zero_masked(masks: PyTree, tree: PyTree) -> PyTree:
  """Zeroes a params-shaped ``tree`` where masks are False (no validation)."""
  return map_masked(
      lambda m, x: x if m is None else jnp.where(m, x, jnp.zeros_like(x)),
      masks,
      tree,
  )


def count_along(
    mask: jax.Array, axis: tuple[int, ...] | None = None
) -> jax.Array:
  """int32 numbers of ``True`` entries of ``mask`` along ``axis`` (default all).

  Summed in float32 when every count covers fewer than 2**24 entries (exact
  there): XLA's CPU backend runs an int32 sum as a materialized int32 copy
  and a tree of reduce-windows, about 12x slower on a 2.4M-entry mask. Wider
  counts sum in int32 (exact below 2**31 entries; see :func:`count_true`).
  """
  axes = tuple(range(mask.ndim)) if axis is None else axis
  if math.prod(mask.shape[a] for a in axes) < 1 << 24:
    return jnp.sum(jnp.asarray(mask, jnp.float32), axis=axes).astype(jnp.int32)
  return jnp.sum(mask, axis=axes, dtype=jnp.int32)


# Largest number of entries one int32 partial count covers; 2**30 < 2**31.
COUNT_BLOCK = 2**30


def count_true(mask: jax.Array, block: int = COUNT_BLOCK) -> jax.Array:
  """Number of ``True`` entries of a bool array, as float32, without overflow.

  ``jnp.sum(mask, dtype=jnp.int32)`` wraps around past 2**31 - 1 entries.
  Here the flat mask is counted in int32 per block of at most ``block``
  entries (exact, :func:`count_along`), and the partial counts are added in
  float32: exact while the total is below 2**24, and within float32's
  relative precision (about 6e-8 per addition) above, for layers of any
  size.

  Args:
    mask: a bool array.
    block: entries per int32 partial count (``< 2**31``); a parameter only so
      that tests can exercise the blocking on small arrays.

  Returns:
    A float32 scalar.
  """
  if mask.size <= block:
    # No reshape: flattening a kernel sharded on a non-leading axis would
    # gather it onto every device.
    return count_along(mask).astype(jnp.float32)
  flat = mask.reshape(-1)
  n = flat.size
  full = n // block  # >= 1 here.
  parts = [
      count_along(flat[: full * block].reshape(full, block), (1,)).astype(
          jnp.float32
      )
  ]
  if n > full * block:
    parts.append(
        count_along(flat[full * block :]).astype(jnp.float32).reshape(1)
    )
  return jnp.sum(jnp.concatenate(parts))
