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
from sparseopt_jax._src import tree as tree_lib
from sparseopt_jax._src.tree import PyTree


def skew_diagnostics(masks: PyTree, *, neuron_axis: int = -1
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
    neuron_axis: the output-unit axis.

  Returns:
    A flat dict of float32 scalars.
  """
  out: dict[str, jax.Array] = {}
  for path, mask in tree_lib.mask_leaves_with_path(masks):
    if mask.ndim < 2:
      continue
    name = tree_lib.path_str(path)
    density = masks_lib.neuron_density(mask, neuron_axis, name=name)
    s = 1.0 - density
    live = density > 0
    d_max = jnp.max(density)
    d_min_live = jnp.min(jnp.where(live, density, jnp.inf))
    spread = jnp.where(jnp.any(live),
                       jnp.sqrt(d_max / jnp.where(jnp.any(live),
                                                  d_min_live, 1.0)), 1.0)
    out[f"{name}/s_min"] = jnp.min(s)
    out[f"{name}/s_mean"] = jnp.mean(s)
    out[f"{name}/s_max"] = jnp.max(s)
    out[f"{name}/s_std"] = jnp.std(s)
    out[f"{name}/amp_spread"] = spread
    out[f"{name}/dead"] = jnp.sum(~live).astype(jnp.float32)
  return out


def dst_diagnostics(state: optax.OptState, *, neuron_axis: int = -1
                    ) -> dict[str, jax.Array]:
  """:func:`skew_diagnostics` of the live masks, plus topology statistics.

  Adds ``L/changed`` (connections regrown at the last mask update, per sparse
  leaf), ``changed`` (their sum), ``sparsity`` and ``itop``
  (:func:`itop_rate`).

  Args:
    state: a :class:`DynamicSparseState` or an optimizer state containing one.
    neuron_axis: the output-unit axis.

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
