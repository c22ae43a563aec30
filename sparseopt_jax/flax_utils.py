"""Flax helpers: the ``batch_stats=`` tree of SparseOpt's BatchNorm correction.

``scale_by_sparseopt(correction="batch_stats")`` scales each kernel's neurons
by the std of the BatchNorm that normalizes the kernel's output. These
functions find that BatchNorm for every kernel of a ``flax.linen`` or
``flax.nnx`` model, by data flow, and build the tree of variances the
transform takes.

This module imports flax, an optional dependency; ``import sparseopt_jax``
never loads it. Import it explicitly::

  from sparseopt_jax import flax_utils

  pairs = flax_utils.pair_batchnorms(model, images, train=True)  # once
  variances = flax_utils.running_variances(pairs, params, batch_stats)
  updates, opt_state = tx.update(grads, opt_state, params,
                                 batch_stats=variances)

or, for the current batch's variances from the training forward itself
(linen), :func:`apply_with_batch_variances` inside the loss function.
"""

from sparseopt_jax._src.flax_utils import apply_with_batch_variances
from sparseopt_jax._src.flax_utils import pair_batchnorms
from sparseopt_jax._src.flax_utils import running_variances

__all__ = (
    "apply_with_batch_variances",
    "pair_batchnorms",
    "running_variances",
)
