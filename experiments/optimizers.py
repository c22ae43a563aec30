"""The optimizer a config names: learning-rate schedule, transforms, filters.

`create_optimizer` builds the optax transformation of one run from its
config: the base optimizer (SGD with momentum or AdamW), optionally inside
``sparseopt.ham``, SparseOpt's correction, the renormalization ablation or
the dense grad-scale control in front of it, and, for sparse
methods, ``sparseopt.dynamic_sparse`` (or, for ``method="gmp"``,
``sparseopt.gradual_pruning``) around the whole chain. Which kernels
are sparse and which the correction applies to are defined here once
(`sparse_filter`, `correction_filter`) and asked for by the training loop,
as are each kernel's neurons (`neuron_axes`) and the unit of the
correction (`correction_axes`: per neuron, or `group_axes`, the group of
the normalizer after the kernel).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import sparseopt_jax as sparseopt

from experiments import models

OPTIMIZERS = ("sgd", "sparseopt", "adam", "sparseopt+adam")
CORRECT_FILTERS = ("all", "bn_only")
CORRECTIONS = ("fan_in", "norm", "batch_stats")
# correction="batch_stats": this step's batch variances or the running ones.
BN_STATS = ("batch", "running")
# The epsilon every BatchNorm of `experiments.models` adds to its variance
# (PyTorch's default); correction="batch_stats" must add the same one, or
# its sigma_i would not be the std BatchNorm actually divides by.
BN_EPSILON = 1e-5
SCHEDULES = ("cosine", "step", "constant")
STRUCTURES = ("unstructured", "constant_fan_in")
# The unit of SparseOpt's factor: each neuron (the paper), or the group one
# normalizer sigma is shared by (`group_axes`).
CORRECTION_UNITS = ("neuron", "group")
RENORMALIZE = ("none", "global", "layer")
_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def create_learning_rate_schedule(
    config, steps_per_epoch: float, total_steps: int
) -> optax.Schedule:
  """Linear warmup over ``warmup_epochs``, then cosine, step or constant."""
  warmup = int(config.warmup_epochs * steps_per_epoch)
  base = config.learning_rate
  rest = max(1, total_steps - warmup)
  if config.schedule == "cosine":
    main = optax.cosine_decay_schedule(base, rest)
  elif config.schedule == "step":
    main = optax.piecewise_constant_schedule(
        base,
        {
            int(b * total_steps) - warmup: config.step_decay
            for b in config.step_boundaries
        },
    )
  else:
    main = optax.constant_schedule(base)
  if warmup == 0:
    return main
  return optax.join_schedules(
      [optax.linear_schedule(0.0, base, warmup), main], [warmup]
  )


def parse_structure(text: str) -> str | tuple[int, int]:
  """The library's ``structure=`` argument for the config's ``structure``.

  Args:
    text: ``"unstructured"``, ``"constant_fan_in"`` or ``"n:m"`` (``"2:4"``:
      at most ``n`` of every ``m`` consecutive inputs of a neuron active).

  Returns:
    ``text`` itself, or ``(n, m)`` for ``"n:m"``.

  Raises:
    ValueError: for any other text, or ``n:m`` without ``0 < n < m``.
  """
  if text in STRUCTURES:
    return text
  match = _NM.match(text) if isinstance(text, str) else None
  if match is None:
    raise ValueError(
        f"structure={text!r}: expected one of {STRUCTURES} "
        "or 'n:m' with integers 0 < n < m (e.g. '2:4')."
    )
  n, m = int(match.group(1)), int(match.group(2))
  if not 0 < n < m:
    raise ValueError(f"structure={text!r}: 'n:m' needs 0 < n < m.")
  return (n, m)


def structure(config):
  """The library's ``structure=`` argument of ``config.structure``."""
  return parse_structure(config.structure)


def gmp_steps(config, total_steps: int) -> tuple[int, int]:
  """GMP's first and last pruning steps (``start_step``, ``end_step``).

  ``gmp_start_fraction`` and ``gmp_end_fraction`` of ``total_steps``, the
  end moved back to the last step a whole number of ``update_every`` after
  the start (`sparseopt.gradual_pruning` prunes at both ends).
  """
  start = int(config.gmp_start_fraction * total_steps)
  end = max(start, int(config.gmp_end_fraction * total_steps))
  return start, start + (end - start) // config.update_every * (
      config.update_every
  )


def _is_weight_kernel(path, leaf) -> bool:
  """A ``kernel`` leaf with ``ndim >= 2``: never a bias or an embedding.

  For the ResNets and the MLP it selects what `sparseopt.is_kernel` does;
  in the ViTs it also leaves out the 2-D attention biases
  ``(heads, head_dim)`` and the position embedding.
  """
  return sparseopt.is_kernel(path, leaf) and (
      sparseopt.path_str(path).endswith("kernel")
  )


def sparse_filter(config):
  """The ``filter_fn`` of the kernels ``config`` makes sparse."""
  return sparseopt.exclude_paths(*config.dense_paths, base=_is_weight_kernel)


# Attention kernels of `experiments.models.SelfAttention` (``nn.DenseGeneral``).
_QKV = re.compile(r"(^|/)(query|key|value)/kernel$")
_QK = re.compile(r"(^|/)(query|key)/kernel$")
_ATTN_OUT = re.compile(r"(^|/)attn/out/kernel$")


def neuron_axes(path, leaf):
  """Each kernel's neurons (its output units): a ``neuron_axis=`` callable.

  ``-1`` (Flax layout) but for the attention kernels: ``query``, ``key`` and
  ``value`` ``(d_model, heads, head_dim)`` have ``heads * head_dim``
  neurons, ``(1, 2)``, and ``out`` ``(heads, head_dim, d_model)`` has
  ``d_model`` with fan-in ``heads * head_dim``, ``(2,)``. A tuple also tells
  ERK (`sparseopt.layer_densities`) to treat the kernel as the Dense matrix
  it is. This is the spec of the masks and of the paper's per-neuron factor.
  """
  name = sparseopt.path_str(path)
  if _QKV.search(name) and np.ndim(leaf) == 3:
    return (1, 2)
  if _ATTN_OUT.search(name) and np.ndim(leaf) == 3:
    return (2,)
  return -1


def group_axes(model: str):
  """The unit of the normalizer after each kernel of ``model``, per leaf.

  A normalizer divides by one sigma per reduction group, so sparsity's
  gradient amplification ``(1 - s)^-1/2`` is shared by the group
  (docs/transformers.md), and so should the correction
  ``sqrt(1 - s_g) / sqrt(1 - s_avg)`` be:

  * BatchNorm (the ResNets, the MLP): one sigma per neuron, ``-1``; the
    ``head`` has no normalizer after it, ``None``.
  * QK-norm (``fmnist_vit_qk``): one sigma per token and head over
    ``head_dim``, so the ``query`` and ``key`` kernels ``(d_model, heads,
    head_dim)`` get ``1``: a head is the unit, its fan-in counted over axes
    ``(0, 2)``, ``s_h`` its sparsity.
  * LayerNorm or RMSNorm after a layer: one sigma per token over all of its
    outputs, the whole layer is the unit and the normalized factor is
    exactly 1: ``None`` (not corrected). The ViTs are pre-LN: no normalizer
    follows ``value``, ``out`` or the MLP, so those are ``None`` too.

  Args:
    model: a key of `experiments.models.MODELS`.

  Returns:
    A ``neuron_axis=`` callable ``(path, leaf) -> axes | None``.
  """
  if model not in models.TRANSFORMERS:
    return lambda path, leaf: -1 if _BN_FOLLOWED(path, leaf) else None
  qk_norm = model == "fmnist_vit_qk"

  def spec(path, leaf):
    if qk_norm and _QK.search(sparseopt.path_str(path)) and np.ndim(leaf) == 3:
      return 1
    return None

  return spec


def correction_axes(config):
  """The ``neuron_axis=`` of SparseOpt's factor: per neuron, or per group."""
  if config.correction_unit == "group":
    return group_axes(config.model)
  return neuron_axes


# Every kernel of the experiments' models that a BatchNorm follows: all but
# the classifier ``head`` (see ``experiments.models``).
_BN_FOLLOWED = sparseopt.exclude_paths("head")


def correction_filter(config):
  """The ``filter_fn`` of the kernels SparseOpt corrects (None: all masked)."""
  if config.correct_filter == "bn_only":
    return _BN_FOLLOWED
  return None


def neuron_gradient_scales(
    key: jax.Array, params, factor: float, fraction: float
):
  """The dense control's fixed per-neuron gradient factors.

  In every kernel a BatchNorm follows (all ``ndim >= 2`` leaves but the
  classifier ``head``), ``round(fraction * n)`` neurons drawn at random get
  ``factor``, the others 1: a turning-rate imbalance like sparsity's, without
  sparsity.

  Returns:
    A tree like ``params``: a float32 vector per scaled kernel, ``None``
    elsewhere.
  """
  leaves, treedef = jax.tree.flatten_with_path(params)
  out = []
  for i, (path, leaf) in enumerate(leaves):
    if not _BN_FOLLOWED(path, leaf):
      out.append(None)
      continue
    n = leaf.shape[-1]
    chosen = jax.random.permutation(jax.random.fold_in(key, i), n) < round(
        fraction * n
    )
    out.append(jnp.where(chosen, jnp.float32(factor), jnp.float32(1.0)))
  return jax.tree.unflatten(treedef, out)


def scale_neuron_gradients(scales) -> optax.GradientTransformation:
  """Multiplies each kernel's neuron slices (last axis) by a fixed factor."""

  def update_fn(updates, params=None):
    del params
    return jax.tree.map(
        lambda u, c: u if c is None else (u * c).astype(u.dtype),
        updates,
        scales,
        is_leaf=lambda x: x is None,
    )

  return optax.stateless(update_fn)


def create_optimizer(
    config,
    schedule: optax.Schedule,
    masks,
    total_steps: int,
    key: jax.Array,
    params=None,
    shardings=None,
) -> optax.GradientTransformation:
  """The optimizer named by ``config.optimizer``, wrapped for DST if sparse.

  SparseOpt's correction comes first in the chain so that it scales only the
  loss gradient: weight decay is added after it (SGD), or decoupled (AdamW).
  The dense control (``grad_scale != 1``) sits in the same place. With
  ``correction="batch_stats"``, ``update`` needs the ``batch_stats=``
  keyword (the BatchNorm variance at each corrected kernel, see
  `experiments.train.train_step`); ``dynamic_sparse`` forwards it.

  Args:
    config: the run's config.
    schedule: the learning rate per step (`create_learning_rate_schedule`).
    masks: the initial masks (static, set, rigl), else None (dense, and gmp,
      whose masks start dense inside `sparseopt.gradual_pruning`).
    total_steps: the run's length; mask updates stop at ``end_fraction`` of
      it.
    key: PRNG key of the mask updates (SET's random growth) and of the dense
      control's choice of neurons.
    params: the initial parameters; needed only by the dense control.
    shardings: the params' shardings (``config.sharding="fsdp"``), for
      ``dynamic_sparse``'s per-shard mask updates; ``None``: replicated.

  Returns:
    The run's optax transformation.
  """
  correct = []
  if config.grad_scale != 1.0:
    correct.append(
        scale_neuron_gradients(
            neuron_gradient_scales(
                jax.random.fold_in(key, 1),
                params,
                config.grad_scale,
                config.grad_scale_fraction,
            )
        )
    )
  if config.optimizer.startswith("sparseopt"):
    correct.append(
        sparseopt.scale_by_sparseopt(
            neuron_axis=correction_axes(config),
            filter_fn=correction_filter(config),
            correction=config.correction,
            epsilon=BN_EPSILON,
        )
    )
  if config.optimizer.endswith("adam"):
    base = [
        optax.adamw(
            schedule,
            b1=config.adam_b1,
            b2=config.adam_b2,
            eps=config.adam_eps,
            weight_decay=config.weight_decay,
        )
    ]
  else:
    base = [
        optax.add_decayed_weights(config.weight_decay),
        optax.sgd(schedule, momentum=config.momentum, nesterov=config.nesterov),
    ]
  if config.renormalize != "none":
    # After the correction, before weight decay: only the direction of the
    # loss gradient reaches the optimizer (the paper's ablation).
    correct.append(sparseopt.normalize_updates(config.renormalize))
  if config.ham:
    # HAM's exponent sees the gradient the chain gives it: SparseOpt's
    # corrected (and renormalized) one when those are on.
    base = [
        sparseopt.ham(
            optax.chain(*base),
            schedule,
            alpha=config.ham_alpha,
            beta=config.ham_beta,
            filter_fn=_is_weight_kernel,
        )
    ]
  inner = optax.chain(*correct, *base)
  if config.method == "dense":
    return inner
  if config.method == "gmp":
    start_step, end_step = gmp_steps(config, total_steps)
    return sparseopt.gradual_pruning(
        inner,
        config.sparsity,
        start_step=start_step,
        end_step=end_step,
        update_every=config.update_every,
        distribution=config.distribution,
        schedule=config.gmp_schedule,
        filter_fn=sparse_filter(config),
        structure=structure(config),
        neuron_axis=neuron_axes,
    )
  return sparseopt.dynamic_sparse(
      inner,
      masks,
      method=config.method,
      update_every=config.update_every,
      end_step=int(config.end_fraction * total_steps),
      drop_fraction=config.drop_fraction,
      drop_schedule=config.drop_schedule,
      grow_with=config.grow_with,
      key=key,
      # grow_with="corrected" scales by SparseOpt's factor; structured masks
      # need each leaf's neurons (fields.validate refuses both with "group").
      neuron_axis=(
          correction_axes(config)
          if config.grow_with == "corrected"
          else neuron_axes
      ),
      correction_filter=correction_filter(config),
      structure=structure(config),
      # Per-shard selection is for unstructured masks (structured ones
      # select within each neuron or group).
      shardings=shardings if structure(config) == "unstructured" else None,
  )
