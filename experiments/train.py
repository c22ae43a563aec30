"""Training and evaluation of sparse BN networks with SparseOpt.

`train_and_evaluate(config, workdir)` runs one configuration (see
``configs/default.py`` for every knob) data-parallel over all devices:
a `jax.sharding.Mesh` with one ``"data"`` axis, the batch sharded over it,
parameters and optimizer state replicated (or, with ``sharding="fsdp"``,
kernels and their masks and moments split over the same axis). The same
code runs on one CPU, on simulated CPU devices, on a GPU, or on a
multi-host TPU slice (each process feeds its share of the global batch).

One step is a single jitted `train_step`: augmentation, forward and backward
with BatchNorm statistics, then ``tx.update`` of the optimizer, which for
sparse methods is ``sparseopt.dynamic_sparse`` (``gradual_pruning`` for
``method="gmp"``) owning the masks (mask updates happen inside it under
``lax.cond``; ``sparseopt.masks_updated``
says afterwards whether a step was one). With ``correction="batch_stats"``
the same forward also captures each BatchNorm's variance for SparseOpt
(`sparseopt_jax.flax_utils`). Metrics stay on device and come to the host
every ``log_every`` steps. With ``recalibrate_batches`` an evaluation that
follows a mask update first re-estimates BatchNorm's statistics, for that
evaluation only (`recalibration_step`).

The workdir holds ``config.json``, ``metrics.jsonl`` (one JSON object per
logged step), the same records as TensorBoard event files under
``tensorboard/``, orbax checkpoints under ``checkpoints/`` (each with the
config it was written under) and, once ended, ``summary.json``. Starting
again on the same workdir resumes from the latest checkpoint that restores,
if it holds the same config; because the data order and every random key
are functions of ``(seed, step)``, a resumed run is bit-identical on CPU to
an uninterrupted one. A run that already ended is left as it is.

A run never reports a diverged result: each step flags whether its loss and
updated parameters are finite, on device; the flags are read when metrics
come to the host and before each checkpoint, and the first bad step stops
the run (`DivergedError`) with ``summary.json`` saying so and no checkpoint
of a diverged state.

The harness, one job per module:

* ``main.py``: the command line; ``sweep.py``: named grids of runs, one
  workdir each; ``quickstart.py``: the two-run comparison;
* ``train.py`` (here): `TrainState`, `train_step`, `eval_step`, the
  diagnostics and the loop;
* ``optimizers.py``: learning-rate schedule and the optimizer a config names;
* ``workdir.py``: writing the workdir (config check, checkpoints, metrics,
  TensorBoard, summary); ``records.py``: its file names and readers;
* ``models.py``, ``input_pipeline.py``, ``configs/``: models, data, configs
  (``configs/fields.py``: every field's type and accepted values);
* ``studies/``: tables and plots from workdirs, through ``records.py`` only
  (never importing the training code).
"""

from collections.abc import Sequence
import functools
import time
from typing import Any

from absl import logging
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import optax
import sparseopt_jax as sparseopt
from sparseopt_jax import flax_utils
import tqdm

from experiments import flops as flops_lib
from experiments import input_pipeline
from experiments import models
from experiments import optimizers
from experiments import records
from experiments import workdir as workdir_lib
from experiments.configs import fields


class TrainState(flax.struct.PyTreeNode):
  """Everything that changes during training; checkpointed as one pytree.

  Attributes:
    step: number of steps taken (int32 scalar).
    params: model parameters; pruned entries are exactly zero.
    batch_stats: BatchNorm running statistics.
    opt_state: optimizer state; for sparse methods it holds the masks.
    key: base PRNG key (raw uint32); step ``t`` uses ``fold_in(key, t)``.
  """

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  key: jax.Array


class DivergedError(RuntimeError):
  """The loss or a parameter became non-finite: the run stopped.

  Attributes:
    step: the first step whose loss or updated parameters were not finite.
    summary: the run's summary (also in ``summary.json``).
  """

  def __init__(self, message: str, step: int, summary: dict[str, Any]):
    super().__init__(message)
    self.step = step
    self.summary = summary


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises `fields.ConfigError` naming the first invalid field of ``config``.

  Every field is checked against `experiments.configs.fields.FIELDS`, and
  the batch sizes against this machine's devices and processes.
  """
  fields.validate(config, jax.device_count(), jax.process_count())


def num_train_steps(config, num_train_examples: int) -> int:
  """Total steps: ``num_train_steps``, or ``num_epochs`` worth of batches."""
  if config.num_train_steps > 0:
    return int(config.num_train_steps)
  return max(1, int(config.num_epochs * num_train_examples / config.batch_size))


def create_model(config, spec: input_pipeline.DatasetSpec):
  """The Flax model of ``config.model`` sized for ``spec``'s classes."""
  return models.create_model(
      config.model,
      num_classes=spec.num_classes,
      dtype=jnp.dtype(config.dtype),
      width=config.width,
  )


def input_shape(config, spec: input_pipeline.DatasetSpec) -> tuple[int, ...]:
  """(H, W, C) of one model input (``config.image_size`` for ImageNet)."""
  if spec.variable_size and config.image_size:
    return (config.image_size, config.image_size, spec.image_shape[-1])
  return spec.image_shape


def bn_pairs(model, config, spec) -> dict[str, str]:
  """``{kernel path: BatchNorm path}`` of ``model``, paired by data flow.

  The kernels whose output a BatchNorm normalizes directly (all but the
  classifier ``head`` in `experiments.models`); see
  `sparseopt_jax.flax_utils.pair_batchnorms`. Abstract: no FLOPs.
  """
  dummy = jnp.zeros((1, *input_shape(config, spec)), jnp.dtype(config.dtype))
  return flax_utils.pair_batchnorms(model, dummy, train=True)


def _corrects_with_batch_stats(config) -> bool:
  return config.optimizer.startswith("sparseopt") and (
      config.correction == "batch_stats"
  )


def _needs_batch_variances(config) -> bool:
  """Whether the train step captures this batch's BatchNorm variances."""
  return config.sigma_diagnostics or (
      _corrects_with_batch_stats(config) and config.bn_stats == "batch"
  )


def fsdp_spec(shape: Sequence[int], num_devices: int) -> P:
  """``config.sharding="fsdp"``'s layout of one array over the ``"data"`` axis.

  An array of two or more axes is split on its largest axis whose size the
  device count divides (the first such, on a tie); anything else (biases,
  BatchNorm statistics, scalars, an array with no such axis) is replicated.
  """
  axes = [i for i, d in enumerate(shape) if d % num_devices == 0]
  if len(shape) < 2 or not axes:
    return P()
  axis = max(axes, key=lambda i: shape[i])
  return P(*("data" if i == axis else None for i in range(len(shape))))


def shardings_of(config, tree, mesh: Mesh):
  """A `NamedSharding` per leaf of ``tree`` under ``config.sharding``."""

  def one(x):
    if config.sharding == "fsdp":
      return NamedSharding(mesh, fsdp_spec(np.shape(x), mesh.size))
    return NamedSharding(mesh, P())

  return jax.tree.map(one, tree)


def create_train_state(
    config,
    model,
    spec,
    total_steps: int,
    steps_per_epoch: float,
    mesh: Mesh | None = None,
):
  """Initial `TrainState`, optimizer and schedule, all from ``config.seed``.

  With ``mesh`` and ``config.sharding="fsdp"``, the optimizer's mask updates
  are told the params' shardings (`shardings_of`) and select per shard; the
  returned state itself is not placed yet.
  """
  k_params, k_masks, k_dst, k_train = jax.random.split(
      jax.random.PRNGKey(config.seed), 4
  )
  dummy = jnp.zeros((1, *input_shape(config, spec)), jnp.dtype(config.dtype))

  @jax.jit  # Eagerly, every op of the init would compile on its own.
  def init_variables(k_params, k_masks):
    variables = model.init(k_params, dummy, train=False)
    params, masks = variables["params"], None
    if config.method in fields.MASKED_AT_INIT:
      masks = sparseopt.init_masks(
          k_masks,
          params,
          config.sparsity,
          distribution=config.distribution,
          filter_fn=optimizers.sparse_filter(config),
          structure=optimizers.structure(config),
          neuron_axis=optimizers.neuron_axes,
      )
      params = sparseopt.apply_masks(params, masks)
      if config.init == "fan_in":
        # A key derived from k_masks leaves every other key, and so the
        # masks and data order of paired runs, unchanged.
        params = sparseopt.sparse_init(
            jax.random.fold_in(k_masks, 1),
            params,
            masks,
            neuron_axis=optimizers.neuron_axes,
        )
    # The transformers have no BatchNorm: an empty collection.
    return params, variables.get("batch_stats", {}), masks

  params, batch_stats, masks = init_variables(k_params, k_masks)
  schedule = optimizers.create_learning_rate_schedule(
      config, steps_per_epoch, total_steps
  )
  shardings = None
  if mesh is not None and config.sharding == "fsdp":
    shardings = shardings_of(config, params, mesh)
  tx = optimizers.create_optimizer(
      config, schedule, masks, total_steps, k_dst, params, shardings
  )
  state = TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=batch_stats,
      opt_state=tx.init(params),
      key=k_train,
  )
  return state, tx, schedule


def cross_entropy(logits, labels, num_classes: int, smoothing: float = 0.0):
  """Per-example softmax cross-entropy in float32, with label smoothing."""
  one_hot = jax.nn.one_hot(labels, num_classes)
  if smoothing:
    one_hot = optax.smooth_labels(one_hot, smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), one_hot)


def _kernel_masks(state: TrainState, opt_state, config):
  """The live masks (sparse methods) or all-True kernel masks (dense)."""
  if config.method != "dense":
    return sparseopt.get_masks(opt_state)
  return jax.tree.map(
      lambda p: jnp.ones(p.shape, bool) if p.ndim >= 2 else None, state.params
  )


def _cond_or_zeros(pred, fn):
  """``fn()`` when ``pred``, else zeros of the same structure (lax.cond)."""
  zeros = jax.tree.map(
      lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn)
  )
  return jax.lax.cond(pred, fn, lambda: zeros)


def step_diagnostics(
    before: TrainState,
    params,
    opt_state,
    is_update,
    *,
    config,
    total_steps: int,
) -> dict[str, jax.Array]:
  """Turning rates at log steps, norm vs factor jumps at mask updates.

  ``turn/L/...``: :func:`sparseopt.diagnostics.turning_diagnostics` of this
  step (logged on ``log_every`` steps and on mask-update steps);
  ``jump/L/...``: :func:`sparseopt.diagnostics.mask_update_jump` across this
  step's mask update (sparse methods). Both are computed under ``lax.cond``,
  so other steps pay nothing but the predicate.

  Args:
    before: the state this step started from.
    params: the parameters after it.
    opt_state: the optimizer state after it.
    is_update: bool scalar, whether this step updated the masks.
    config: the run's config.
    total_steps: the last step, always logged.
  """
  t = before.step  # Steps taken before this one.
  masks_before = _kernel_masks(before, before.opt_state, config)
  masks_after = _kernel_masks(before, opt_state, config)
  log_now = (
      ((t + 1) % config.log_every == 0) | (t + 1 == total_steps) | is_update
  )
  turning = _cond_or_zeros(
      log_now,
      lambda: sparseopt.diagnostics.turning_diagnostics(
          before.params,
          params,
          masks_after,
          neuron_axis=optimizers.neuron_axes,
      ),
  )
  out = {f"turn/{k}": v for k, v in turning.items()}
  if config.method != "dense":
    jump = _cond_or_zeros(
        is_update,
        lambda: sparseopt.diagnostics.mask_update_jump(
            before.params,
            params,
            masks_before,
            masks_after,
            neuron_axis=optimizers.neuron_axes,
        ),
    )
    out.update({f"jump/{k}": v for k, v in jump.items()})
  return out


def _live_regression(x, y, live) -> tuple[jax.Array, jax.Array]:
  """Correlation of ``x`` and ``y`` and slope of ``y`` on ``x`` over ``live``.

  NaN where undefined (fewer than two live entries, or ``x`` or ``y``
  constant over them): a layer whose neurons all have the same fan-in says
  nothing about how sigma follows it, and a 0 would claim it does.
  """
  n = jnp.sum(live)
  mean = lambda v: jnp.sum(jnp.where(live, v, 0.0)) / jnp.maximum(n, 1)
  dx, dy = x - mean(x), y - mean(y)
  cxx, cyy, cxy = mean(dx * dx), mean(dy * dy), mean(dx * dy)
  defined = (n >= 2) & (cxx > 0)
  slope = jnp.where(defined, cxy / jnp.where(defined, cxx, 1.0), jnp.nan)
  defined &= cyy > 0
  corr = jnp.where(
      defined, cxy / jnp.sqrt(jnp.where(defined, cxx * cyy, 1.0)), jnp.nan
  )
  return corr, slope


def sigma_diagnostics(params, masks, variances) -> dict[str, jax.Array]:
  """How well sqrt(1 - s_i) and ||w_i|| predict BatchNorm's std sigma_i.

  For each kernel a BatchNorm follows (``variances`` not None there),
  ``sigma_i = sqrt(var_i + eps)`` is the std that BatchNorm divides neuron
  ``i`` by (``var_i`` of this step's batch), ``s_i`` the neuron's fraction of
  pruned incoming weights and ``||w_i||`` its live weight norm. Over the
  layer's live neurons (an active weight, nonzero norm):

  * ``sigma/L/corr_fan_in``, ``sigma/L/corr_norm``: the correlation of
    ``log sigma_i`` with ``log sqrt(1 - s_i)`` (the paper's estimate, which
    ``correction="fan_in"`` uses) and with ``log ||w_i||`` (``"norm"``'s);
  * ``sigma/L/slope_fan_in``: the slope of ``log sigma_i`` on
    ``log(1 - s_i)`` (the paper predicts 0.5), ``sigma/L/slope_norm`` that on
    ``log ||w_i||`` (1 if the inputs were white).

  NaN where undefined (see `_live_regression`).

  Args:
    params: the parameters the batch went through.
    masks: the kernel masks (`_kernel_masks`), None for dense leaves.
    variances: from `flax_utils.apply_with_batch_variances`: a tree like
      ``params``, a variance vector at each BatchNorm-paired kernel.
  """
  flat_masks = {
      sparseopt.path_str(p): m for p, m in jax.tree.leaves_with_path(masks)
  }
  flat_params = {
      sparseopt.path_str(p): w for p, w in jax.tree.leaves_with_path(params)
  }
  out = {}
  for path, var in jax.tree.leaves_with_path(variances):
    name = sparseopt.path_str(path)
    kernel = flat_params[name]
    mask = flat_masks.get(name)
    if mask is None:
      mask = jnp.ones(kernel.shape, bool)
    axes = tuple(range(kernel.ndim - 1))  # All but the neuron (last) axis.
    density = jnp.sum(mask, axis=axes) / np.prod(mask.shape[:-1])  # 1 - s_i
    w = jnp.where(mask, kernel, 0).astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(w * w, axis=axes))
    live = (density > 0) & (norm > 0)
    log_sigma = 0.5 * jnp.log(
        jnp.maximum(var.astype(jnp.float32), 0.0) + optimizers.BN_EPSILON
    )
    log_density = jnp.log(jnp.where(live, density, 1.0)).astype(jnp.float32)
    log_norm = jnp.log(jnp.where(live, norm, 1.0))
    layer = name.removesuffix("/kernel")
    # corr(log sigma, log sqrt(1-s)) = corr(log sigma, log(1-s)).
    corr, slope = _live_regression(log_density, log_sigma, live)
    out[f"sigma/{layer}/corr_fan_in"] = corr
    out[f"sigma/{layer}/slope_fan_in"] = slope
    corr, slope = _live_regression(log_norm, log_sigma, live)
    out[f"sigma/{layer}/corr_norm"] = corr
    out[f"sigma/{layer}/slope_norm"] = slope
  return out


# Metrics key of the train step's flag: loss and updated params all finite.
_FINITE = "finite"


def train_step(
    state: TrainState,
    batch,
    *,
    model,
    tx,
    config,
    spec,
    total_steps: int = 0,
    pairs: dict[str, str] | None = None,
):
  """One optimizer step on ``batch``; returns the new state and metrics.

  The metrics hold the loss, the accuracy, ``finite`` (whether the loss and
  every updated parameter and BatchNorm statistic are finite) and, for sparse
  methods, ``mask_update`` (1.0 when this step updated the masks). With
  ``config.turning_diagnostics`` they also hold `step_diagnostics`
  (``total_steps``: the last step, always logged), and with
  ``config.sigma_diagnostics`` `sigma_diagnostics` (at log steps, zeros
  otherwise).

  With ``correction="batch_stats"`` (SparseOpt), ``tx.update`` gets the
  ``batch_stats=`` keyword: the variances this batch's forward pass
  normalized by, captured in that same pass (``bn_stats="batch"``), or the
  running variances the step started from (``"running"``; ``pairs`` from
  `bn_pairs`, computed here when not given).
  """
  key = jax.random.fold_in(state.key, state.step)
  images = input_pipeline.augment(batch["image"], key, config.augment)
  images = input_pipeline.normalize(images, spec, jnp.dtype(config.dtype))

  def loss_fn(params):
    variables = {"params": params, "batch_stats": state.batch_stats}
    kwargs = dict(train=True, mutable=["batch_stats"])
    variances = None
    if _needs_batch_variances(config):
      # The same single forward, also recording each BatchNorm's variance.
      (logits, updates), variances = flax_utils.apply_with_batch_variances(
          model, variables, images, **kwargs
      )
    else:
      logits, updates = model.apply(variables, images, **kwargs)
    loss = cross_entropy(
        logits, batch["label"], spec.num_classes, config.label_smoothing
    ).mean()
    return loss, (logits, updates.get("batch_stats", {}), variances)

  (loss, (logits, batch_stats, variances)), grads = jax.value_and_grad(
      loss_fn, has_aux=True
  )(state.params)
  extra = {}
  if _corrects_with_batch_stats(config):
    if config.bn_stats == "batch":
      extra["batch_stats"] = variances
    else:
      extra["batch_stats"] = flax_utils.running_variances(
          pairs if pairs is not None else bn_pairs(model, config, spec),
          state.params,
          state.batch_stats,
      )
  updates, opt_state = tx.update(grads, state.opt_state, state.params, **extra)
  params = optax.apply_updates(state.params, updates)
  if config.method != "dense":
    # dynamic_sparse's updates zero pruned weights only while they are
    # finite (NaN + x is NaN); this select keeps them exactly 0 whatever a
    # diverging step held, so no NaN sits where the masks say 0.
    params = sparseopt.apply_masks(params, sparseopt.get_masks(opt_state))
  metrics = {
      "train_loss": loss,
      "train_accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
      # Checked on the host only when metrics come there anyway (log steps)
      # and before each checkpoint: no sync per step.
      _FINITE: jnp.isfinite(loss)
      & jnp.all(
          jnp.stack(
              [
                  jnp.all(jnp.isfinite(x))
                  for x in jax.tree.leaves((params, batch_stats))
              ]
          )
      ),
  }
  # The optimizer knows its mask-update schedule; ask it rather than
  # recomputing the schedule here.
  is_update = jnp.asarray(False)
  if config.method != "dense":
    is_update = sparseopt.masks_updated(opt_state)
    metrics["mask_update"] = is_update.astype(jnp.float32)
  if config.sigma_diagnostics:
    t = state.step
    log_now = ((t + 1) % config.log_every == 0) | (t + 1 == total_steps)
    masks = _kernel_masks(state, state.opt_state, config)
    metrics.update(
        _cond_or_zeros(
            log_now,
            lambda: sigma_diagnostics(state.params, masks, variances),
        )
    )
  if config.turning_diagnostics:
    metrics.update(
        step_diagnostics(
            state,
            params,
            opt_state,
            is_update,
            config=config,
            total_steps=total_steps,
        )
    )
  return (
      state.replace(
          step=state.step + 1,
          params=params,
          batch_stats=batch_stats,
          opt_state=opt_state,
      ),
      metrics,
  )


def eval_step(state: TrainState, batch, *, model, config, spec):
  """Sums of loss, correct predictions and examples over ``batch["mask"]``."""
  images = input_pipeline.normalize(
      batch["image"], spec, jnp.dtype(config.dtype)
  )
  logits = model.apply(
      {"params": state.params, "batch_stats": state.batch_stats},
      images,
      train=False,
  )
  loss = cross_entropy(logits, batch["label"], spec.num_classes)
  correct = jnp.argmax(logits, -1) == batch["label"]
  mask = batch["mask"]
  return {
      "loss": jnp.sum(loss * mask),
      "correct": jnp.sum(correct * mask),
      "count": jnp.sum(mask),
  }


# Folded into the seed's key and data seed of the recalibration batches, a
# stream of their own: the training data and keys are left untouched.
_RECALIBRATION_STREAM = 0x5EED_BA7C


def bn_momentum(model, config, spec) -> float:
  """The momentum shared by every BatchNorm of ``model`` (read, not assumed).

  Raises:
    ValueError: the BatchNorms disagree (recalibration needs one value).
  """
  momenta = set()

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.BatchNorm):
      momenta.add(float(context.module.momentum))
    return next_fun(*args, **kwargs)

  dummy = jnp.zeros((1, *input_shape(config, spec)), jnp.dtype(config.dtype))
  with nn.intercept_methods(record):
    jax.eval_shape(lambda: model.init(jax.random.key(0), dummy, train=True))
  if len(momenta) != 1:
    raise ValueError(f"BatchNorm momenta {sorted(momenta)}: expected one.")
  return momenta.pop()


def recalibration_seed(seed: int, step: int) -> int:
  """Data-order seed of the recalibration batches before step ``step``'s eval."""
  return int(
      np.random.SeedSequence(
          [seed, step, _RECALIBRATION_STREAM]
      ).generate_state(1)[0]
  )


def recalibration_step(
    params, average, batch, k, key, *, model, config, spec, momentum: float
):
  """Folds batch ``k``'s BatchNorm statistics into their running mean.

  The forward runs in train mode from zero statistics, so BatchNorm's
  update ``momentum * 0 + (1 - momentum) * batch`` divided by
  ``1 - momentum`` is the batch's own mean and variance; ``average`` then
  moves by ``1 / (k + 1)`` towards it (the cumulative average: all batches
  weigh the same, and batch 0 replaces whatever ``average`` held).

  Args:
    params: the parameters to recalibrate for.
    average: the mean of batches ``0..k-1``'s statistics (any values when
      ``k == 0``), like the ``batch_stats`` collection.
    batch: a training batch.
    k: int32 scalar, its index.
    key: its augmentation key.
    model: the model.
    config: the run's config.
    spec: the dataset's spec.
    momentum: the BatchNorms' momentum (`bn_momentum`).

  Returns:
    The mean of batches ``0..k``'s statistics.
  """
  images = input_pipeline.augment(batch["image"], key, config.augment)
  images = input_pipeline.normalize(images, spec, jnp.dtype(config.dtype))
  zeros = jax.tree.map(jnp.zeros_like, average)
  _, updates = model.apply(
      {"params": params, "batch_stats": zeros},
      images,
      train=True,
      mutable=["batch_stats"],
  )
  weight = 1.0 / (k.astype(jnp.float32) + 1.0)
  return jax.tree.map(
      lambda a, u: a + (u / (1.0 - momentum) - a) * weight,
      average,
      updates["batch_stats"],
  )


def _mask_updates_since_eval(logged: Sequence[dict[str, Any]]) -> bool:
  """Whether ``logged`` records a mask update after its last evaluation."""
  last_eval = max(
      (r["step"] for r in logged if "test_accuracy" in r), default=0
  )
  return any(
      s > last_eval
      for r in logged
      for s in r.get(records.MASK_UPDATE_STEPS, ())
  )


def diagnostics(
    state: TrainState, *, config, pairs: dict[str, str] | None = None
) -> dict[str, jax.Array]:
  """ITOP, regrown connections, per-layer skew and largest SparseOpt factor.

  With ``config.fan_in_histogram`` also each layer's fan-in histogram
  (:func:`sparseopt.diagnostics.fan_in_histogram`). Sparse methods only;
  computed at log steps, not in the train step. With
  ``correction="batch_stats"`` the largest factor is that of the running
  variances (``pairs``: from `bn_pairs`; the batch's are not at hand here).
  """
  if config.method == "dense":
    return {}
  masks = sparseopt.get_masks(state.opt_state)
  stats = None
  if config.correction == "batch_stats":
    stats = flax_utils.running_variances(pairs, state.params, state.batch_stats)
  scales = sparseopt.diagnostics.sparseopt_scales(
      masks,
      state.params,
      neuron_axis=optimizers.correction_axes(config),
      filter_fn=optimizers.correction_filter(config),
      correction=config.correction,
      batch_stats=stats,
      epsilon=optimizers.BN_EPSILON,
  )
  max_scales = {
      f"{sparseopt.path_str(path)}/max_scale": jnp.max(scale)
      for path, scale in jax.tree.leaves_with_path(scales)
  }
  out = {**sparseopt.diagnostics.dst_diagnostics(state.opt_state), **max_scales}
  if config.fan_in_histogram:
    out.update(
        sparseopt.diagnostics.fan_in_histogram(
            masks, neuron_axis=optimizers.neuron_axes
        )
    )
  return out


def summarize_window(
    window: list[dict[str, Any]], steps: Sequence[int] = ()
) -> dict[str, Any]:
  """One log record from the metrics of the steps since the last one.

  Losses and accuracies are averaged; turning rates and sigma diagnostics
  are this (log) step's;
  mask-update jumps come from the window's mask-update step, if any, with
  that step's turning rates as ``update_turn/...``.

  Args:
    window: the train step's metrics of each step since the last record.
    steps: the logged step number (steps taken, counting this one) of each
      entry of ``window``. When given and the window holds mask updates,
      ``mask_update_steps`` lists their step numbers, so that analysis reads
      the schedule from the log rather than recomputing it.

  Returns:
    The record: floats, and the list ``mask_update_steps`` if any.
  """
  last = window[-1]
  record = {
      k: float(np.mean([m[k] for m in window]))
      for k in last
      if not k.startswith(("turn/", "jump/", "sigma/"))
      and k not in ("mask_update", _FINITE)
  }
  record.update(
      {
          k: float(v)
          for k, v in last.items()
          if k.startswith(("turn/", "sigma/"))
      }
  )
  for m in window:
    if m.get("mask_update", 0.0) > 0:
      record.update(
          {k: float(v) for k, v in m.items() if k.startswith("jump/")}
      )
      record.update(
          {
              f"update_{k}": float(v)
              for k, v in m.items()
              if k.startswith("turn/")
          }
      )
  updated = [
      int(step)
      for step, m in zip(steps, window)
      if m.get("mask_update", 0.0) > 0
  ]
  if updated:
    record[records.MASK_UPDATE_STEPS] = updated
  return record


def _to_float(tree) -> dict[str, float]:
  return {k: float(v) for k, v in jax.device_get(tree).items()}


def _divergence(window, steps: Sequence[int]) -> tuple[int, float] | None:
  """``(step, loss)`` of the first step of ``window`` flagged non-finite.

  Args:
    window: train-step metrics (on device or host), one per step.
    steps: their step numbers.

  Returns:
    None when every step's loss and parameters were finite.
  """
  flags = jax.device_get([m[_FINITE] for m in window])
  for i, flag in enumerate(flags):
    if not bool(flag):
      return int(steps[i]), float(jax.device_get(window[i]["train_loss"]))
  return None


def run_flops(config, model, spec, state, total_steps, workdir):
  """The run's ``flops`` summary block (see `experiments.flops`).

  Per-layer FLOPs from XLA on the final variables, densities from the final
  masks, and, for RigL, the number of mask updates from the metrics log.
  """
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  layers = flops_lib.kernel_flops(
      model, variables, input_shape(config, spec), config.dtype
  )
  density = {}
  if config.method != "dense":
    density = flops_lib.densities(sparseopt.get_masks(state.opt_state))
  # RigL's dense gradients: the mask updates the run logged (and so did).
  # Only the process that writes the log (and the summary) reads it.
  num_updates = 0
  if config.method == "rigl" and jax.process_index() == 0:
    num_updates = sum(
        len(r.get(records.MASK_UPDATE_STEPS, ()))
        for r in records.read_metrics(workdir)
    )
  return flops_lib.run_flops(
      method=config.method,
      layers=layers,
      final_density=density,
      total_steps=total_steps,
      batch_size=config.batch_size,
      num_mask_updates=num_updates,
      gmp_steps=optimizers.gmp_steps(config, total_steps),
      update_every=config.update_every,
  )


def _host_copy(x):
  """A host copy of ``x``; a typed PRNG key (gmp's state) keeps its type."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    return jax.random.wrap_key_data(
        np.array(jax.random.key_data(x)), impl=jax.random.key_impl(x)
    )
  return np.array(x)


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str
) -> dict[str, Any]:
  """Trains ``config`` in ``workdir`` (resuming if it holds a checkpoint).

  Every field is validated before anything is read or written. A run that
  already ended is left as it is. Otherwise the newest checkpoint that
  restores is resumed (see `workdir.restore_latest`) if it holds the same
  config; ``config.json`` is written once the run has started.

  Returns:
    The summary also written to ``workdir/summary.json``.

  Raises:
    fields.ConfigError: an invalid config, or a workdir holding a run of a
      different one.
    DivergedError: the loss or a parameter became non-finite (now, or when
      the run ended before); ``summary.json`` says at which step and the
      checkpoints before it are kept.
  """
  validate_config(config)
  if records.is_finished(workdir):
    summary = workdir_lib.finished_summary(config, workdir)
    if summary.get("status") == records.DIVERGED:
      raise DivergedError(
          f"{workdir}: this run already ended: {summary['message']}",
          summary["diverged_at_step"],
          summary,
      )
    print(
        f"{workdir}: already finished (test accuracy "
        f"{summary.get('final_test_accuracy')} after {summary.get('step')} "
        "steps); nothing to do. Use a new --workdir to train again."
    )
    return summary
  dataset = input_pipeline.load_dataset(config.dataset, config.data_dir or None)
  spec = dataset.spec
  config_json = workdir_lib.json_config(config)

  mesh = Mesh(np.array(jax.devices()), ("data",))
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P("data"))
  total_steps = num_train_steps(config, len(dataset.train))
  model = create_model(config, spec)
  state, tx, schedule = create_train_state(
      config,
      model,
      spec,
      total_steps,
      len(dataset.train) / config.batch_size,
      mesh,
  )
  # config.sharding: replicated, or kernels (params, masks, moments) split
  # over "data" (FSDP). Checkpoints restore into these shardings.
  state_sharding = shardings_of(config, state, mesh)
  # The train step donates the state, and donation needs every leaf in its
  # own buffer; an optimizer's init may reuse one array in two places (the
  # initial masks, say). A host copy per leaf guarantees distinct buffers.
  state = jax.tree.map(
      lambda x, s: jax.device_put(_host_copy(x), s), state, state_sharding
  )

  checkpoints = workdir_lib.checkpoint_manager(workdir, config.keep_checkpoints)
  start_step, state = workdir_lib.restore_latest(
      checkpoints, state, config, workdir
  )
  if start_step:
    logging.info("Resumed %s from step %d.", workdir, start_step)
  # Started: from here on the workdir describes this run.
  workdir_lib.save_config(config_json, workdir)
  metrics_writer = workdir_lib.MetricsWriter(
      workdir, start_step, tensorboard=config.tensorboard
  )
  pairs = bn_pairs(model, config, spec)
  # Whether the masks changed since the last evaluation. Across a resume
  # the log says (every checkpoint is a log step, see fields.validate).
  updated_since_eval = bool(
      config.recalibrate_batches
      and start_step
      and records.has_metrics(workdir)
      and _mask_updates_since_eval(records.read_metrics(workdir))
  )
  update_flags = []  # This session's mask_update flags since the last eval.

  p_train_step = jax.jit(
      functools.partial(
          train_step,
          model=model,
          tx=tx,
          config=config,
          spec=spec,
          total_steps=total_steps,
          pairs=pairs,
      ),
      out_shardings=(state_sharding, replicated),
      donate_argnums=0,
  )
  p_eval_step = jax.jit(
      functools.partial(eval_step, model=model, config=config, spec=spec),
      out_shardings=replicated,
  )
  p_diagnostics = jax.jit(
      functools.partial(diagnostics, config=config, pairs=pairs),
      out_shardings=replicated,
  )

  def global_batch(local):
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(batch_sharding, x),
        local,
    )

  recalibration_key = jax.random.fold_in(
      jax.random.PRNGKey(config.seed), _RECALIBRATION_STREAM
  )
  p_recalibration_step = None
  if config.recalibrate_batches:
    p_recalibration_step = jax.jit(
        functools.partial(
            recalibration_step,
            model=model,
            config=config,
            spec=spec,
            momentum=bn_momentum(model, config, spec),
        ),
        out_shardings=replicated,
    )

  def recalibrated(state, step):
    """``state`` with BatchNorm statistics of its own params (eval only).

    The K batches are the first of a fresh shuffle seeded by ``(seed,
    step)``, their keys folded from the seed's key: a function of ``(seed,
    step)`` alone, so a resumed run recalibrates exactly as an
    uninterrupted one, and the training iterator is never touched.
    """
    stream = input_pipeline.train_batches(
        dataset,
        global_batch_size=config.batch_size,
        seed=recalibration_seed(config.seed, step),
        image_size=config.image_size or None,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        num_threads=config.num_data_threads,
    )
    average = state.batch_stats
    step_key = jax.random.fold_in(recalibration_key, step)
    for k in range(config.recalibrate_batches):
      average = p_recalibration_step(
          state.params,
          average,
          global_batch(next(stream)),
          jnp.int32(k),
          jax.random.fold_in(step_key, k),
      )
    return state.replace(batch_stats=average)

  def evaluate(state, step):
    """Test loss and accuracy at ``step``, recalibrated if the masks moved."""
    nonlocal updated_since_eval, update_flags
    if update_flags:
      updated_since_eval |= bool(np.any(jax.device_get(update_flags)))
      update_flags = []
    result = {}
    if config.recalibrate_batches:
      result["recalibrated"] = float(updated_since_eval)
      if updated_since_eval:
        state = recalibrated(state, step)
    updated_since_eval = False
    sums = None
    for batch in input_pipeline.eval_batches(
        dataset,
        global_batch_size=config.eval_batch_size,
        image_size=config.image_size or None,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    ):
      out = p_eval_step(state, global_batch(batch))
      sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
    sums = _to_float(sums)
    return {
        "test_loss": sums["loss"] / sums["count"],
        "test_accuracy": sums["correct"] / sums["count"],
        **result,
    }

  batches = input_pipeline.train_batches(
      dataset,
      global_batch_size=config.batch_size,
      seed=config.seed,
      start_step=start_step,
      image_size=config.image_size or None,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      num_threads=config.num_data_threads,
  )
  progress = tqdm.tqdm(
      total=total_steps,
      initial=start_step,
      unit="step",
      disable=not config.progress_bar or jax.process_index() != 0,
  )
  pending, pending_steps, step_times, last_eval = [], [], [], {}
  window_start, window_steps, compile_time = time.perf_counter(), 0, None
  session_start = time.perf_counter()
  divergence = None
  for step in range(start_step + 1, total_steps + 1):
    state, metrics = p_train_step(state, global_batch(next(batches)))
    if compile_time is None:
      jax.block_until_ready(metrics)
      compile_time = time.perf_counter() - window_start
      window_start, window_steps = time.perf_counter(), 0
    else:
      window_steps += 1
    pending.append(metrics)
    pending_steps.append(step)
    if config.recalibrate_batches and "mask_update" in metrics:
      update_flags.append(metrics["mask_update"])  # On device: no sync.
    progress.update(1)
    record = {}
    if step % config.log_every == 0 or step == total_steps:
      window = jax.device_get(pending)
      divergence = _divergence(window, pending_steps)
      if divergence:
        break
      record.update(summarize_window(window, pending_steps))
      pending, pending_steps = [], []
      record.update(_to_float(p_diagnostics(state)))
      if window_steps:
        record["step_time"] = (
            time.perf_counter() - window_start
        ) / window_steps
        step_times.append(record["step_time"])
      record["lr"] = float(schedule(step - 1))
      progress.set_postfix(
          loss=f"{record['train_loss']:.3f}",
          acc=f"{record['train_accuracy']:.3f}",
      )
    is_checkpoint = step % config.checkpoint_every == 0 or step == total_steps
    if is_checkpoint and pending:
      # Never save a diverged state: check the steps since the last log.
      divergence = _divergence(pending, pending_steps)
      if divergence:
        break
    if step % config.eval_every == 0 or step == total_steps:
      last_eval = evaluate(state, step)
      record.update(last_eval)
    if record:
      metrics_writer.write({"step": step, **record})
    if is_checkpoint:
      workdir_lib.save_checkpoint(checkpoints, step, state, config_json)
    if record or is_checkpoint:
      # Evaluation and checkpointing are not training time.
      window_start, window_steps = time.perf_counter(), 0
  progress.close()
  metrics_writer.close()
  checkpoints.wait_until_finished()
  last_checkpoint = checkpoints.latest_step()
  checkpoints.close()

  summary = {
      "status": records.FINISHED,
      "step": total_steps,
      "median_step_time": float(np.median(step_times)) if step_times else None,
      "compile_time": compile_time,
      "session_time": time.perf_counter() - session_start,
      "resumed_from": start_step,
      "devices": jax.device_count(),
      "platform": jax.devices()[0].platform,
      "environment": workdir_lib.environment(),
      "config": config_json,
  }
  if divergence:
    diverged_at, loss = divergence
    message = (
        f"diverged at step {diverged_at}: the training loss ({loss}) or a "
        "parameter is not finite. "
        + (
            f"The last good checkpoint, step {last_checkpoint}, is kept"
            if last_checkpoint
            else "No checkpoint was saved before it"
        )
        + "; lower the learning rate and use a new --workdir."
    )
    summary.update(
        status=records.DIVERGED,
        step=diverged_at,
        diverged_at_step=diverged_at,
        last_checkpoint=last_checkpoint,
        message=message,
        final_test_accuracy=None,
        final_test_loss=None,
    )
    workdir_lib.write_summary(workdir, summary)
    raise DivergedError(f"{workdir}: {message}", diverged_at, summary)

  if not last_eval:  # Restored the last step's checkpoint: evaluate it.
    last_eval = evaluate(state, total_steps)
  summary.update(
      final_test_accuracy=last_eval["test_accuracy"],
      final_test_loss=last_eval["test_loss"],
      flops=run_flops(config, model, spec, state, total_steps, workdir),
  )
  workdir_lib.write_summary(workdir, summary)
  print(
      f"{workdir}: {config.method} {config.optimizer} s={config.sparsity} "
      f"seed={config.seed}: test accuracy "
      f"{summary['final_test_accuracy']:.4f} after {total_steps} steps, "
      f"{summary['session_time']:.0f}s"
  )
  return summary
