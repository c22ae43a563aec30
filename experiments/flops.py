r"""A run's FLOPs, counted the way RigL's tables count them.

Evci et al. (2020), "Rigging the Lottery: Making All Tickets Winners"
(https://arxiv.org/abs/1911.11134), report FLOPs per example, as multiples
of the dense model's: inference with the final masks, and training summed
over every step. This module does the same for a run of the harness.

Per-layer dense FLOPs are not hand-written formulas: each layer that owns a
``kernel`` (``nn.Conv``, ``nn.Dense``) is recorded while the model runs on
one example (``nn.intercept_methods``), and XLA's cost analysis of that
layer's jitted call, bias left out, gives its FLOPs :math:`F_l` (a
multiply-add counts 2: ``2 H_out W_out k_h k_w C_in C_out`` for an unpadded
Conv, ``2 d_in d_out`` for a Dense). XLA leaves out the multiply-adds with
a ``SAME`` conv's zero padding, which the textbook count (and RigL's)
includes: about 10% fewer for a 3x3 conv on 28x28, the same fraction for
the dense and the sparse count, so the ratios hardly move. Only these kernels are counted: BatchNorm,
activations, pooling and biases are not (they are a few percent of a conv
net's FLOPs and the same for every method). With :math:`d_l` the density
of layer :math:`l`'s kernel (1 for a dense layer),

.. math:: f_D = \sum_l F_l, \qquad f_S = \sum_l d_l F_l .

Training, per example and step (RigL, Section 3 "the cost of RigL" and its
FLOPs appendix): a forward and a backward pass cost 3 forwards, so a dense
step costs :math:`3 f_D` and a sparse one :math:`3 f_S` (static, SET: sparse
throughout). At a RigL mask update the weight gradient is dense:
:math:`2 f_S + f_D` that step, which over :math:`\Delta T` steps is RigL's
:math:`(3 f_S \Delta T + 2 f_S + f_D) / (\Delta T + 1)`. GMP's density
follows its schedule: step :math:`t` costs :math:`3 f_S(t)` with every
layer's sparsity :math:`r_t` times its final one (Zhu & Gupta's cubic
:math:`r_t` of the last pruning step before :math:`t`; the library rounds
each count, which this ignores). Totals multiply by the batch size.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import sparseopt_jax as sparseopt

# Where the numbers come from, written beside them in summary.json.
METHOD = (
    "XLA cost analysis of each kernel's conv/matmul (bias, BatchNorm and "
    "activations not counted), per example; training as Evci et al. 2020 "
    "(RigL): 3x sparse forward per step, 2 f_S + f_D at RigL mask updates"
)


def kernel_flops(
    model: nn.Module, variables, input_shape: Sequence[int], dtype="float32"
) -> dict[str, float]:
  """Per-example dense FLOPs of each kernel-owning layer, by XLA.

  Args:
    model: a Flax module called as ``model(x, train=False)``.
    variables: its variables (``params`` and any other collection).
    input_shape: one example's shape (no batch axis).
    dtype: the input's dtype.

  Returns:
    ``{kernel path: FLOPs}``, the paths as `sparseopt.path_str` writes
    them (``"head/kernel"``); a layer called twice counts twice.
  """
  calls = []

  def record(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name == "__call__" and module.has_variable(
        "params", "kernel"
    ):
      calls.append((module, args[0]))
    return next_fun(*args, **kwargs)

  # Shapes are all it needs: trace abstractly, never touching the (maybe
  # multi-host) arrays themselves.
  abstract = jax.tree.map(
      lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), variables
  )
  x = jax.ShapeDtypeStruct((1, *input_shape), jnp.dtype(dtype))
  with nn.intercept_methods(record):
    jax.eval_shape(lambda v, x: model.apply(v, x, train=False), abstract, x)
  flops = {}
  for module, inputs in calls:
    name = "/".join(module.path) + "/kernel"
    kernel = module.get_variable("params", "kernel")
    extra = {"use_bias": False} if hasattr(module, "use_bias") else {}
    layer = module.clone(parent=None, **extra)
    cost = (
        jax.jit(
            lambda k, x, layer=layer: layer.apply({"params": {"kernel": k}}, x)
        )
        .lower(
            jax.ShapeDtypeStruct(kernel.shape, kernel.dtype),
            jax.ShapeDtypeStruct(inputs.shape, inputs.dtype),
        )
        .compile()
        .cost_analysis()
    )
    if isinstance(cost, (list, tuple)):  # Older jax: one dict per program.
      cost = cost[0]
    flops[name] = flops.get(name, 0.0) + float(cost["flops"])
  return flops


def densities(masks) -> dict[str, float]:
  """``{path: fraction of True}`` of each sparse leaf of a mask tree."""

  def local(m):  # A replicated array's local copy is the whole of it.
    return m.addressable_data(0) if isinstance(m, jax.Array) else m

  return {
      sparseopt.path_str(path): float(np.mean(np.asarray(local(m))))
      for path, m in jax.tree_util.tree_leaves_with_path(masks)
      if m is not None
  }


def forward_flops(
    layers: Mapping[str, float], density: Mapping[str, float]
) -> float:
  """:math:`\\sum_l d_l F_l`; layers without a density count fully."""
  return float(sum(f * density.get(name, 1.0) for name, f in layers.items()))


def run_flops(
    *,
    method: str,
    layers: Mapping[str, float],
    final_density: Mapping[str, float],
    total_steps: int,
    batch_size: int,
    num_mask_updates: int = 0,
    gmp_steps: tuple[int, int] | None = None,
    update_every: int = 1,
) -> dict[str, Any]:
  """The ``flops`` block of a run's summary.

  Args:
    method: ``dense``, ``static``, ``set``, ``rigl`` or ``gmp``.
    layers: `kernel_flops`.
    final_density: `densities` of the final masks (empty: dense).
    total_steps: training steps.
    batch_size: examples per step.
    num_mask_updates: RigL's mask updates (each computes a dense gradient).
    gmp_steps: GMP's ``(start_step, end_step)``.
    update_every: GMP's steps between pruning steps.

  Returns:
    Per-example inference FLOPs (``inference_dense``, ``inference_sparse``
    with the final masks, their ``inference_ratio``), the run's training
    FLOPs (``training``), dense training's (``training_dense``), their
    ``training_ratio``, the per-layer dense FLOPs (``layers``) and
    ``method``, how they were counted.
  """
  f_dense = forward_flops(layers, {})
  f_sparse = forward_flops(layers, final_density)
  if method == "gmp":
    start, end = gmp_steps
    # The library's own schedule at sparsity 1 is r_t, the fraction of each
    # layer's final sparsity in force at each step.
    progress = sparseopt.pruning_schedule(
        1.0, start_step=start, end_step=end, update_every=update_every
    )
    per_example = 0.0
    for count in range(total_steps):
      r = progress(count)
      now = {k: 1.0 - r * (1.0 - d) for k, d in final_density.items()}
      per_example += 3.0 * forward_flops(layers, now)
  else:
    per_example = 3.0 * f_sparse * total_steps
    if method == "rigl":
      per_example += num_mask_updates * (f_dense - f_sparse)
  training_dense = 3.0 * f_dense * total_steps * batch_size
  training = per_example * batch_size
  return {
      "method": METHOD,
      "inference_dense": f_dense,
      "inference_sparse": f_sparse,
      "inference_ratio": f_sparse / f_dense if f_dense else None,
      "training": training,
      "training_dense": training_dense,
      "training_ratio": training / training_dense if training_dense else None,
      "layers": dict(layers),
  }
