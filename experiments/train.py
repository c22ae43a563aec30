"""Training and evaluation of sparse BN networks with SparseOpt.

`train_and_evaluate(config, workdir)` runs one configuration (see
``configs/default.py`` for every knob) data-parallel over all devices:
a `jax.sharding.Mesh` with one ``"data"`` axis, the batch sharded over it,
parameters and optimizer state replicated. The same code runs on one CPU,
on simulated CPU devices, on a GPU, or on a multi-host TPU slice (each
process feeds its share of the global batch).

One step is a single jitted `train_step`: augmentation, forward and backward
with BatchNorm statistics, then ``tx.update`` of the optimizer, which for
sparse methods is ``sparseopt.dynamic_sparse`` owning the masks (mask
updates happen inside it under ``lax.cond``; ``sparseopt.masks_updated``
says afterwards whether a step was one). Metrics stay on device and come to
the host every ``log_every`` steps.

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
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import optax
import sparseopt_jax as sparseopt
import tqdm

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


def create_train_state(
    config, model, spec, total_steps: int, steps_per_epoch: float
):
  """Initial `TrainState`, optimizer and schedule, all from ``config.seed``."""
  k_params, k_masks, k_dst, k_train = jax.random.split(
      jax.random.PRNGKey(config.seed), 4
  )
  dummy = jnp.zeros((1, *input_shape(config, spec)), jnp.dtype(config.dtype))

  @jax.jit  # Eagerly, every op of the init would compile on its own.
  def init_variables(k_params, k_masks):
    variables = model.init(k_params, dummy, train=False)
    params, masks = variables["params"], None
    if config.method != "dense":
      masks = sparseopt.init_masks(
          k_masks,
          params,
          config.sparsity,
          distribution=config.distribution,
          filter_fn=optimizers.sparse_filter(config),
      )
      params = sparseopt.apply_masks(params, masks)
      if config.init == "fan_in":
        # A key derived from k_masks leaves every other key, and so the
        # masks and data order of paired runs, unchanged.
        params = sparseopt.sparse_init(
            jax.random.fold_in(k_masks, 1), params, masks
        )
    return params, variables["batch_stats"], masks

  params, batch_stats, masks = init_variables(k_params, k_masks)
  schedule = optimizers.create_learning_rate_schedule(
      config, steps_per_epoch, total_steps
  )
  tx = optimizers.create_optimizer(
      config, schedule, masks, total_steps, k_dst, params
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
          before.params, params, masks_after
      ),
  )
  out = {f"turn/{k}": v for k, v in turning.items()}
  if config.method != "dense":
    jump = _cond_or_zeros(
        is_update,
        lambda: sparseopt.diagnostics.mask_update_jump(
            before.params, params, masks_before, masks_after
        ),
    )
    out.update({f"jump/{k}": v for k, v in jump.items()})
  return out


# Metrics key of the train step's flag: loss and updated params all finite.
_FINITE = "finite"


def train_step(
    state: TrainState, batch, *, model, tx, config, spec, total_steps: int = 0
):
  """One optimizer step on ``batch``; returns the new state and metrics.

  The metrics hold the loss, the accuracy, ``finite`` (whether the loss and
  every updated parameter and BatchNorm statistic are finite) and, for sparse
  methods, ``mask_update`` (1.0 when this step updated the masks). With
  ``config.turning_diagnostics`` they also hold `step_diagnostics`
  (``total_steps``: the last step, always logged).
  """
  key = jax.random.fold_in(state.key, state.step)
  images = input_pipeline.augment(batch["image"], key, config.augment)
  images = input_pipeline.normalize(images, spec, jnp.dtype(config.dtype))

  def loss_fn(params):
    logits, updates = model.apply(
        {"params": params, "batch_stats": state.batch_stats},
        images,
        train=True,
        mutable=["batch_stats"],
    )
    loss = cross_entropy(
        logits, batch["label"], spec.num_classes, config.label_smoothing
    ).mean()
    return loss, (logits, updates["batch_stats"])

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(
      loss_fn, has_aux=True
  )(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
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


def diagnostics(state: TrainState, *, config) -> dict[str, jax.Array]:
  """ITOP, regrown connections, per-layer skew and largest SparseOpt factor.

  With ``config.fan_in_histogram`` also each layer's fan-in histogram
  (:func:`sparseopt.diagnostics.fan_in_histogram`). Sparse methods only;
  computed at log steps, not in the train step.
  """
  if config.method == "dense":
    return {}
  masks = sparseopt.get_masks(state.opt_state)
  scales = sparseopt.diagnostics.sparseopt_scales(
      masks,
      state.params,
      filter_fn=optimizers.correction_filter(config),
      correction=config.correction,
  )
  max_scales = {
      f"{sparseopt.path_str(path)}/max_scale": jnp.max(scale)
      for path, scale in jax.tree.leaves_with_path(scales)
  }
  out = {**sparseopt.diagnostics.dst_diagnostics(state.opt_state), **max_scales}
  if config.fan_in_histogram:
    out.update(sparseopt.diagnostics.fan_in_histogram(masks))
  return out


def summarize_window(
    window: list[dict[str, Any]], steps: Sequence[int] = ()
) -> dict[str, Any]:
  """One log record from the metrics of the steps since the last one.

  Losses and accuracies are averaged; turning rates are this (log) step's;
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
      if not k.startswith(("turn/", "jump/"))
      and k not in ("mask_update", _FINITE)
  }
  record.update({k: float(v) for k, v in last.items() if k.startswith("turn/")})
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
      config, model, spec, total_steps, len(dataset.train) / config.batch_size
  )
  # The train step donates the state, and donation needs every leaf in its
  # own buffer; an optimizer's init may reuse one array in two places (the
  # initial masks, say). A host copy per leaf guarantees distinct buffers.
  state = jax.tree.map(lambda x: jax.device_put(np.array(x), replicated), state)

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

  p_train_step = jax.jit(
      functools.partial(
          train_step,
          model=model,
          tx=tx,
          config=config,
          spec=spec,
          total_steps=total_steps,
      ),
      out_shardings=replicated,
      donate_argnums=0,
  )
  p_eval_step = jax.jit(
      functools.partial(eval_step, model=model, config=config, spec=spec),
      out_shardings=replicated,
  )
  p_diagnostics = jax.jit(
      functools.partial(diagnostics, config=config), out_shardings=replicated
  )

  def global_batch(local):
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(batch_sharding, x),
        local,
    )

  def evaluate(state):
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
      last_eval = evaluate(state)
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
    last_eval = evaluate(state)
  summary.update(
      final_test_accuracy=last_eval["test_accuracy"],
      final_test_loss=last_eval["test_loss"],
  )
  workdir_lib.write_summary(workdir, summary)
  print(
      f"{workdir}: {config.method} {config.optimizer} s={config.sparsity} "
      f"seed={config.seed}: test accuracy "
      f"{summary['final_test_accuracy']:.4f} after {total_steps} steps, "
      f"{summary['session_time']:.0f}s"
  )
  return summary
