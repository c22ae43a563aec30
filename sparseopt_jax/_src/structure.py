"""Mask structures: unstructured, constant fan-in, N:M.

A structure says which sets of a kernel's entries share one active count.
Every structure is a view of the kernel as a 2-D array of *groups*, one row
per group, and masks are chosen row by row with the same count in every row:

* ``"unstructured"``: one row, the whole kernel in flat (C) order.
* ``"constant_fan_in"``: one row per neuron (the ``neuron_axis``, last in
  Flax layout), holding its fan-in flattened in C order of the other axes
  (``in`` for Dense ``(in, out)``, ``H*W*Cin`` for Conv ``(H, W, Cin, Cout)``).
  With a tuple of neuron axes a neuron is one combination of them (attention
  ``(d_model, heads, head_dim)`` with ``(1, 2)``: ``heads * head_dim`` rows,
  in C order, each holding ``d_model`` inputs).
* ``(n, m)``: the rows of ``"constant_fan_in"`` cut into groups of ``m``
  consecutive inputs, so a Conv's groups run along ``Cin`` at a fixed
  ``(h, w)`` when ``Cin`` is a multiple of ``m``; each group keeps ``n``.

Both structured options give every neuron of a layer the same number of
active inputs, so SparseOpt's per-neuron factor is 1 on them (every
``s_i`` equals ``s_avg``).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparseopt_jax._src import tree as tree_lib

STRUCTURES = ("unstructured", "constant_fan_in")

Structure = str | tuple[int, int]


def check_structure(structure: Any) -> Structure:
  """Returns ``structure`` normalized (``(n, m)`` as a tuple of ints)."""
  if isinstance(structure, str):
    if structure in STRUCTURES:
      return structure
    raise ValueError(
        f"Unknown structure {structure!r}; expected one of {STRUCTURES} or "
        f"an (n, m) pair for N:M sparsity."
    )
  if (
      isinstance(structure, (tuple, list))
      and len(structure) == 2
      and all(
          isinstance(v, (int, np.integer)) and not isinstance(v, bool)
          for v in structure
      )
  ):
    n, m = (int(v) for v in structure)
    if not 1 <= n <= m:
      raise ValueError(
          f"structure=(n, m) needs 1 <= n <= m, got {structure!r}."
      )
    return (n, m)
  raise TypeError(
      f"structure must be one of {STRUCTURES} or an (n, m) pair of ints, "
      f"got {structure!r}."
  )


def is_unstructured(structure: Structure) -> bool:
  return structure == "unstructured"


def describe(structure: Structure) -> str:
  if isinstance(structure, tuple):
    return f"{structure[0]}:{structure[1]}"
  return structure


def group_shape(
    shape: tuple[int, ...],
    structure: Structure,
    axis: tree_lib.NeuronAxis,
    name: str,
) -> tuple[int, int]:
  """``(number of groups, group size)`` of a kernel under ``structure``.

  Raises:
    ValueError: naming ``name`` when a structured kernel has fewer than two
      axes, or when its fan-in is not a multiple of ``m`` (N:M).
  """
  size = math.prod(shape)
  if is_unstructured(structure):
    return 1, size
  if len(shape) < 2:
    raise ValueError(
        f"{name!r}: structure={describe(structure)!r} needs a kernel with at "
        f"least two axes (a neuron axis and inputs), got shape {shape}."
    )
  axes = tree_lib.normalize_axes(axis, len(shape), name)
  axis = axes[0] if len(axes) == 1 else axes
  n_out = math.prod(tree_lib.neuron_shape(shape, axes))
  fan_in = size // n_out if n_out else 0
  if structure == "constant_fan_in":
    return n_out, fan_in
  m = structure[1]
  if fan_in % m:
    raise ValueError(
        f"{name!r}: N:M structure {describe(structure)} needs a fan-in that "
        f"is a multiple of m={m}; shape {shape} with neuron axis {axis} has "
        f"fan-in {fan_in}. Exclude the leaf with filter_fn or pick another m."
    )
  return n_out * (fan_in // m), m


def _axes(axis: tree_lib.NeuronAxis, ndim: int) -> tuple[int, ...]:
  # Callers have validated the axes (group_shape); only normalize here.
  axes = (axis,) if tree_lib.is_axis_int(axis) else axis
  return tuple(sorted(int(a) % ndim for a in axes))


def to_groups(
    x: jax.Array, structure: Structure, axis: tree_lib.NeuronAxis
) -> jax.Array:
  """The ``(groups, group_size)`` view of a kernel (see module docstring).

  With several neuron axes the neurons are their combinations, in C order.
  """
  if is_unstructured(structure):
    return x.reshape(1, -1)
  axes = _axes(axis, x.ndim)
  n_out = math.prod(x.shape[a] for a in axes)
  last = tuple(range(x.ndim - len(axes), x.ndim))
  rows = jnp.moveaxis(x, axes, last).reshape(-1, n_out).T  # (n_out, fan_in)
  if isinstance(structure, tuple):
    return rows.reshape(-1, structure[1])
  return rows


def from_groups(
    g: jax.Array,
    shape: tuple[int, ...],
    structure: Structure,
    axis: tree_lib.NeuronAxis,
) -> jax.Array:
  """Inverse of :func:`to_groups`."""
  if is_unstructured(structure):
    return g.reshape(shape)
  axes = _axes(axis, len(shape))
  n_out = math.prod(shape[a] for a in axes)
  moved = tuple(d for a, d in enumerate(shape) if a not in axes) + tuple(
      shape[a] for a in axes
  )
  rows = g.reshape(n_out, -1).T.reshape(moved)
  last = tuple(range(len(shape) - len(axes), len(shape)))
  return jnp.moveaxis(rows, last, axes)


def kept_per_group(density: float, size: int, structure: Structure) -> int:
  """Active entries per group for a layer of ``density`` (a Python int).

  ``"unstructured"``: ``round(density * size)`` (one group, the layer).
  ``"constant_fan_in"``: ``max(1, round(density * fan_in))`` per neuron,
  capped at ``fan_in``: every neuron keeps at least one input, so no neuron
  is cut off (densities are always > 0 here, as sparsity is < 1).
  ``(n, m)``: ``n``. Rounding is half up.
  """
  if isinstance(structure, tuple):
    return structure[0]
  k = int(math.floor(density * size + 0.5))
  if structure == "constant_fan_in" and size > 0:
    k = max(1, k)
  return min(max(k, 0), size)


def group_counts(
    mask: Any, structure: Structure, axis: tree_lib.NeuronAxis, name: str
) -> np.ndarray | None:
  """Active count of every group of a concrete mask; ``None`` if traced."""
  try:
    m = np.asarray(mask)
  except (
      jax.errors.ConcretizationTypeError,
      jax.errors.TracerArrayConversionError,
  ):
    return None
  group_shape(m.shape, structure, axis, name)
  return np.asarray(to_groups(jnp.asarray(m), structure, axis)).sum(axis=1)


def check_mask(
    mask: Any, structure: Structure, axis: tree_lib.NeuronAxis, name: str
) -> None:
  """Raises unless a concrete mask has ``structure`` exactly.

  ``"constant_fan_in"``: every neuron has the same number of active inputs;
  ``(n, m)``: every group of ``m`` has exactly ``n``. Traced masks pass.
  """
  if is_unstructured(structure):
    return
  counts = group_counts(mask, structure, axis, name)
  if counts is None or counts.size == 0:
    return
  if isinstance(structure, tuple):
    if not np.all(counts == structure[0]):
      raise ValueError(
          f"masks[{name!r}] is not {describe(structure)}: its groups of "
          f"{structure[1]} inputs hold between {counts.min()} and "
          f"{counts.max()} active entries. Build masks with "
          f"init_masks(..., structure={structure!r})."
      )
  elif counts.min() != counts.max():
    raise ValueError(
        f"masks[{name!r}] does not have a constant fan-in: its neurons have "
        f"between {counts.min()} and {counts.max()} active inputs. Build "
        f"masks with init_masks(..., structure='constant_fan_in')."
    )
