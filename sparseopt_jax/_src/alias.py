"""Ready-made optimizers."""

from __future__ import annotations

import optax

from sparseopt_jax._src import transform
from sparseopt_jax._src import tree as tree_lib


def sparseopt(
    learning_rate: optax.ScalarOrSchedule,
    momentum: float | None = 0.9,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    *,
    masks: transform.MaskSource | None = None,
    neuron_axis: tree_lib.NeuronAxisSpec | None = None,
    filter_fn: tree_lib.LeafFilter | None = None,
    correction: str = "fan_in",
) -> optax.GradientTransformationExtraArgs:
  r"""SGD with momentum on SparseOpt-corrected gradients.

  The update is

  .. math::
    g'_{\cdot i} = c_i\, g_{\cdot i} + \lambda w_{\cdot i}, \quad
    m \leftarrow \mu m + g', \quad
    w \leftarrow w - \eta\, m,

  with :math:`c_i = \sqrt{1 - s_i} / \sqrt{1 - \bar s}` the per-neuron
  SparseOpt factor of :func:`scale_by_sparseopt`. Weight decay
  :math:`\lambda` is added *after* the correction, as PyTorch's
  ``SGD(weight_decay=...)`` adds it to the already-corrected gradient; scaling
  the decay too would leave sparse neurons permanently turning slower. It is
  ``optax.chain(scale_by_sparseopt(...), add_decayed_weights(weight_decay),
  sgd(learning_rate, momentum, nesterov))``.

  Args:
    learning_rate: a float or an optax schedule.
    momentum: momentum coefficient, or ``None``/``0`` for plain SGD.
    nesterov: whether to use Nesterov momentum.
    weight_decay: L2 coefficient added to the corrected gradient.
    masks: mask tree or callable for :func:`scale_by_sparseopt`; usually left
      ``None`` and given to ``update(..., masks=...)`` or supplied by
      :func:`dynamic_sparse`.
    neuron_axis: the output-unit axis of corrected leaves, a tuple of axes
      or a per-leaf spec (see :func:`scale_by_sparseopt`); ``None`` means
      ``-1`` (a non-numeric default, so ``optax.inject_hyperparams`` does not
      trace it).
    filter_fn: which masked leaves get the correction.
    correction: ``"fan_in"`` or ``"norm"`` (see :func:`scale_by_sparseopt`).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import sparseopt_jax as sparseopt
    >>> params = {"w": jnp.ones((4, 2))}
    >>> masks = {"w": jnp.array([[1, 1], [1, 0], [1, 0], [1, 0]], bool)}
    >>> params = sparseopt.apply_masks(params, masks)
    >>> tx = sparseopt.sparseopt(0.1, momentum=0.9, weight_decay=5e-4)
    >>> state = tx.init(params)
    >>> grads = {"w": jnp.ones((4, 2))}
    >>> updates, state = tx.update(grads, state, params, masks=masks)
    >>> params = optax.apply_updates(params, updates)

  References:
    Adnan et al. SparseOpt: Addressing Normalization-induced Gradient Skew in
    Sparse Training. ICML 2026. https://arxiv.org/abs/2605.27541
  """
  # Under optax.inject_hyperparams the numbers arrive traced: check only
  # Python numbers, and always chain the decay (adding 0 * w is exact).
  if isinstance(weight_decay, (int, float)) and weight_decay < 0:
    raise ValueError(f"weight_decay must be >= 0, got {weight_decay}.")
  return optax.chain(
      transform.scale_by_sparseopt(
          masks,
          neuron_axis=-1 if neuron_axis is None else neuron_axis,
          filter_fn=filter_fn,
          correction=correction,
      ),
      optax.add_decayed_weights(weight_decay),
      optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov),
  )
