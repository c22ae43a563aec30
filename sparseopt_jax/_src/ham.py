"""HAM (hyperbolic aware minimization) and update renormalization.

HAM is a wrapper around any optax transformation: after the inner update it
takes a multiplicative, hyperbolic mirror step on the weight kernels.
:func:`normalize_updates` is the ablation that keeps only a gradient's
direction (the SparseOpt paper's renormalized runs).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from sparseopt_jax._src import tree as tree_lib

NORMALIZE_SCOPES = ("global", "layer")


class HamState(NamedTuple):
  """State of :func:`ham`.

  Attributes:
    count: int32 number of updates taken; the learning rate schedule is
      evaluated at it (before the increment, as in ``optax.sgd``).
    inner_state: the wrapped optimizer's state.
  """

  count: jax.Array
  inner_state: optax.OptState


def _is_python_number(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def ham(
    inner: optax.GradientTransformation,
    learning_rate: optax.ScalarOrSchedule,
    *,
    alpha: float = 200.0,
    beta: float = 1e-3,
    clip: float = 5.0,
    filter_fn: tree_lib.LeafFilter | None = None,
    max_norm: float | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""HAM: a hyperbolic mirror step after any optax optimizer's step.

  With :math:`w` the params, :math:`g` the gradient that ``ham`` receives and
  :math:`u` the update of ``inner`` (computed from the same :math:`g`), HAM
  first takes the inner step, :math:`h = w + u`, then rescales every
  nonzero weight of the selected leaves multiplicatively:

  .. math::
    w' = \begin{cases}
      h \exp\!\big(\operatorname{clip}(-\eta_t\,(\alpha \operatorname{sign}(h)
        \, g + \beta),\, -c,\, c)\big) & h \neq 0 \\
      0 & h = 0
    \end{cases}

  and emits :math:`w' - w`. Other leaves emit :math:`u`. The
  :math:`\alpha` term is a mirror step whose effective learning rate scales
  with :math:`|w|`: the sparsity-friendly implicit bias of the ``m * w``
  reparameterization, taken as a separate step so that the inner optimizer
  keeps its own learning rate (the paper reports faster sign learning).
  :math:`\beta` is a constant multiplicative decay, a mild sparsity
  bias. A zero weight stays zero unless the inner step moves it, so pruned
  weights stay pruned.

  Pass the inner optimizer's learning rate (the same float or schedule):
  :math:`\eta_t` is ``learning_rate(count)``, as the reference
  implementation reads the inner optimizer's current learning rate.

  With ``max_norm`` :math:`\rho`, every leaf (selected or not: kernels,
  biases, normalization scales) is then capped,
  :math:`w'' = w' \min(1, \rho / \lVert w' \rVert_2)` with the norm of the
  whole leaf, and :math:`w'' - w` is emitted. This is the reference
  wrapper's per-tensor weight-norm clip (``max_weight_norm=1000``), a guard
  against blow-ups; ``None`` (default) turns it off. Two other safeguards of
  the reference are not reproduced: its gradient-norm clip runs after the
  step and so never changes an update (put ``optax.clip_by_global_norm``
  first if you want one), and its NaN checks are ``optax.apply_if_finite``'s
  job.

  Where SparseOpt sits matters. In
  ``chain(scale_by_sparseopt(), ham(sgd(lr), lr))`` the corrected gradient
  reaches both the inner SGD and HAM's exponent; in
  ``ham(chain(scale_by_sparseopt(), sgd(lr)), lr)`` only the inner update is
  corrected and the exponent sees the raw gradient. Extra ``update``
  keywords (``masks=``, ``masks_updated=``) are forwarded to ``inner``, so
  both placements work inside :func:`dynamic_sparse`.

  Args:
    inner: any optax transformation, e.g. ``optax.sgd(lr, momentum=0.9)``.
    learning_rate: :math:`\eta`, a float or an optax schedule: the inner
      optimizer's learning rate.
    alpha: :math:`\alpha`, the gradient-sign coupling (reference: 200).
    beta: :math:`\beta`, the constant decay (reference: 1e-3).
    clip: :math:`c`, the bound on the exponent (reference: 5).
    filter_fn: which leaves take the HAM step, as a ``filter_fn(path, leaf)``
      or a pytree of bools; default :func:`is_kernel` (``ndim >= 2``). Under
      ``optax.inject_hyperparams`` name a callable filter in ``static_args``
      (it would be taken for a schedule).
    max_norm: :math:`\rho`, the per-leaf weight-norm cap (reference: 1000),
      or ``None`` for no cap.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` requires
    ``params``; its state is a :class:`HamState`.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import sparseopt_jax as sparseopt
    >>> params = {"w": jnp.array([[1.0, -2.0], [0.0, 0.5]]), "b": jnp.ones(2)}
    >>> tx = sparseopt.ham(optax.sgd(0.1), 0.1, alpha=1.0, beta=0.0)
    >>> grads = {"w": jnp.full((2, 2), 0.5), "b": jnp.ones(2)}
    >>> updates, state = tx.update(grads, tx.init(params), params)
    >>> optax.apply_updates(params, updates)["w"]  # (w - 0.05) * exp(-0.05 sign)
    Array([[ 0.903668  , -2.1551056 ],
           [-0.05256356,  0.42805323]], dtype=float32)
    >>> updates["b"]  # not a kernel: plain SGD
    Array([-0.1, -0.1], dtype=float32)

  References:
    Jacobs, Gadhikar, Rubio-Madrigal, Burkholz. Hyperbolic Aware
    Minimization: Implicit Bias for Sparsity. ICLR 2026.
    https://arxiv.org/abs/2506.02630 (code:
    https://github.com/TomJacobs05/HAM)
  """
  # Under optax.inject_hyperparams the numbers arrive traced: check only
  # Python numbers.
  if _is_python_number(clip) and not clip > 0:
    raise ValueError(f"clip must be > 0, got {clip}.")
  if _is_python_number(alpha) and not alpha >= 0:
    raise ValueError(f"alpha must be >= 0, got {alpha}.")
  if max_norm is not None and _is_python_number(max_norm) and not max_norm > 0:
    raise ValueError(f"max_norm must be > 0 or None, got {max_norm}.")
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    return HamState(
        count=jnp.zeros([], jnp.int32), inner_state=inner.init(params)
    )

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError(
          "ham needs params in update(grads, state, params): its step "
          "multiplies the weights."
      )
    inner_updates, inner_state = inner.update(
        updates, state.inner_state, params, **extra_args
    )
    lr = (
        learning_rate(state.count) if callable(learning_rate) else learning_rate
    )
    flags = tree_lib.resolve_filter(filter_fn, params)

    def step(flag, u, g, w):
      if not flag and max_norm is None:
        return u
      # float32 at least, so bf16 weights lose nothing but the final cast.
      dtype = jnp.promote_types(u.dtype, jnp.float32)
      w = w.astype(dtype)
      h = w + u.astype(dtype)
      delta = u
      if flag:
        exponent = jnp.clip(
            -lr * (alpha * jnp.sign(h) * g.astype(dtype) + beta), -clip, clip
        )
        # where, not a product with the sign: inf * 0 must not turn into NaN.
        h = jnp.where(h != 0, h * jnp.exp(exponent), jnp.zeros_like(h))
        delta = h - w
      if max_norm is not None:
        norm = jnp.sqrt(jnp.sum(h * h))
        capped = h * (max_norm / jnp.where(norm > max_norm, norm, 1.0))
        # Below the cap the update is left exactly as it was.
        delta = jnp.where(norm > max_norm, capped - w, delta)
      return jnp.asarray(delta).astype(u.dtype)

    out = jax.tree.map(step, flags, inner_updates, updates, params)
    return out, HamState(
        count=optax.safe_int32_increment(state.count), inner_state=inner_state
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def normalize_updates(
    scope: str = "global", eps: float = 1e-6
) -> optax.GradientTransformationExtraArgs:
  r"""Rescales updates to unit norm, globally or per layer (leaf).

  .. math::
    \text{global: } u \leftarrow \frac{u}{\lVert u \rVert_2 + \epsilon},
    \qquad
    \text{layer: } u_l \leftarrow \frac{u_l}{\lVert u_l \rVert_2 + \epsilon}
    \text{ for every leaf } l.

  It serves the renormalization ablation: put in front of an optimizer,
  ``chain(scale_by_sparseopt(), normalize_updates(), add_decayed_weights(wd),
  sgd(lr, momentum))`` keeps only the direction of the corrected gradient,
  so a difference to ``chain(normalize_updates(), add_decayed_weights(wd),
  sgd(lr, momentum))`` cannot come from a change of gradient norm.
  ``scope="global"`` *is* ``optax.normalize_by_update_norm(eps=eps)``
  (returned as it is, with extra-argument support); this function exists
  for ``scope="layer"``, which optax lacks (``optax.clip_by_global_norm``
  and ``optax.clip_by_block_rms`` cap instead of rescaling): it also
  removes the per-layer norms, leaving only the direction within each
  layer, where SparseOpt's per-neuron factors act. An all-zero leaf (a
  fully pruned layer) stays zero. Norms are taken in float32 at least and
  every leaf keeps its dtype.

  Args:
    scope: ``"global"`` (one norm over all leaves) or ``"layer"`` (one norm
      per leaf: a kernel, a bias...).
    eps: :math:`\epsilon`, added to each norm.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (extra ``update`` keywords
    are ignored) with an empty state.

  Examples:
    >>> import jax.numpy as jnp
    >>> import sparseopt_jax as sparseopt
    >>> grads = {"w": jnp.array([[3.0, 4.0]]), "b": jnp.array([0.0, 2.0])}
    >>> tx = sparseopt.normalize_updates("layer", eps=0.0)
    >>> updates, _ = tx.update(grads, tx.init(grads))
    >>> updates["w"], updates["b"]
    (Array([[0.6, 0.8]], dtype=float32), Array([0., 1.], dtype=float32))

  References:
    Adnan et al. SparseOpt: Addressing Normalization-induced Gradient Skew in
    Sparse Training. ICML 2026 (the renormalized runs).
    https://arxiv.org/abs/2605.27541
  """
  if scope not in NORMALIZE_SCOPES:
    raise ValueError(
        f"Unknown scope {scope!r}; expected one of {NORMALIZE_SCOPES}."
    )
  if scope == "global":
    return optax.with_extra_args_support(
        optax.normalize_by_update_norm(eps=eps)
    )

  def unit(u):
    dtype = jnp.promote_types(u.dtype, jnp.float32)
    u32 = u.astype(dtype)
    norm = jnp.sqrt(jnp.sum(u32 * u32))
    # A zero leaf stays zero even with eps=0 (no 0/0).
    return (u32 / jnp.where(norm > 0, norm + eps, 1.0)).astype(u.dtype)

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    return jax.tree.map(unit, updates), state

  return optax.GradientTransformationExtraArgs(
      optax.init_empty_state, update_fn
  )
