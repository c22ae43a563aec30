"""Pytree plumbing shared by the mask, transform and DST modules.

A *mask tree* is a pytree with the structure of ``params`` whose leaves are
``bool`` arrays for sparse leaves and ``None`` for dense ones. ``None`` is an
empty subtree to ``jax.tree_util``, so every helper here flattens mask trees
with ``is_leaf=is_none`` to keep them aligned with ``params``.
"""

from __future__ import annotations

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
  if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool):
    raise TypeError(f"neuron_axis must be an int, got {axis!r}.")
  if not -ndim <= axis < ndim:
    raise ValueError(
        f"neuron_axis={axis} is out of range for {name!r} with ndim={ndim} "
        f"(valid: {-ndim}..{ndim - 1})."
    )
  return int(axis) % ndim


def reduce_axes(ndim: int, axis: int) -> tuple[int, ...]:
  return tuple(a for a in range(ndim) if a != axis)


def broadcast_neuron(v: jax.Array, ndim: int, axis: int) -> jax.Array:
  """Reshapes a per-neuron vector to broadcast along ``axis`` of an array."""
  shape = [1] * ndim
  shape[axis] = v.shape[0]
  return v.reshape(shape)


def zero_masked(masks: PyTree, tree: PyTree) -> PyTree:
  """Zeroes a params-shaped ``tree`` where masks are False (no validation)."""
  return map_masked(
      lambda m, x: x if m is None else jnp.where(m, x, jnp.zeros_like(x)),
      masks,
      tree,
  )
