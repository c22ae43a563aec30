"""Writing a run's workdir: config, checkpoints, metrics, summary.

The file names and their readers are in `experiments.records`; this module
is the writing side, used by the training loop (`experiments.train`):

* `finished_summary`: the summary of a run that already ended, after
  checking the config asked for is the one it ran;
* `checkpoint_manager`, `save_checkpoint` and `restore_latest`: the orbax
  checkpoints under ``checkpoints/``, each holding the config it was written
  under; a resume is checked against that config and falls back past a
  checkpoint that does not restore (moved to ``corrupt_checkpoints/``);
* `save_config`: ``config.json``, written atomically once the run starts;
* `MetricsWriter`: ``metrics.jsonl`` plus TensorBoard event files under
  ``tensorboard/``, both cut back to the resume step on resume;
* `write_summary` and `environment`: ``summary.json`` and what produced it.

Every JSON file is written through `records.dumps` (no bare NaN), the config
and summary atomically. Only process 0 writes files; every process may call
these functions.
"""

from importlib import metadata
import json
import math
import numbers
import os
import platform
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
import tensorboardX

from experiments import records
from experiments.configs import fields


def json_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """``config`` as the JSON object stored in the workdir."""
  return json.loads(config.to_json_best_effort())


def _warn(message: str) -> None:
  # At WARNING, which the command line shows whatever its verbosity.
  logging.warning(message)


def check_config(
    saved: dict[str, Any],
    config: ml_collections.ConfigDict,
    workdir: str,
    source: str,
) -> None:
  """Refuses to continue the run in ``workdir`` under a different config.

  Args:
    saved: the config the run was started with.
    config: the config asked for now.
    workdir: the run's directory (for the message).
    source: where ``saved`` was read (for the message).

  Raises:
    fields.ConfigError: the configs differ in a field that changes the
      numbers (anything but ``configs.default.RESUMABLE_FIELDS``).
  """
  differ = records.config_differences(saved, json_config(config))
  if differ:
    raise fields.ConfigError(
        f"Workdir {workdir} holds a run with a different config "
        f"({', '.join(differ)}; saved in {source}). Resume with the same "
        "config, or use a new --workdir."
    )


def finished_summary(
    config: ml_collections.ConfigDict, workdir: str
) -> dict[str, Any]:
  """The summary of the ended run in ``workdir``, which must be ``config``'s.

  Nothing is written: a finished run started again stays as it was.

  Raises:
    fields.ConfigError: the run ended under a different config.
  """
  summary = records.read_summary(workdir)
  if "config" in summary:
    check_config(summary["config"], config, workdir, records.SUMMARY)
  elif os.path.exists(os.path.join(workdir, records.CONFIG)):
    check_config(
        records.load_saved_config(workdir), config, workdir, records.CONFIG
    )
  return summary


def save_config(config_json: dict[str, Any], workdir: str) -> None:
  """Writes ``config.json`` atomically (process 0).

  Called once the run has validated and started: a start that fails earlier
  leaves none. Resuming checks the config stored in the checkpoints, so this
  file is for readers (the studies), not the lock on the workdir.
  """
  path = os.path.join(workdir, records.CONFIG)
  if jax.process_index() == 0:
    if os.path.exists(path):
      try:
        differ = records.config_differences(
            records.load_saved_config(workdir), config_json
        )
      except ValueError as e:  # Not JSON: damaged, replaced all the same.
        differ = [str(e)]
      if differ:
        # A checkpoint decides the config of a resume (already checked), so
        # this is a start that saved no checkpoint, or an edited file.
        _warn(
            f"{path} named another config ({', '.join(differ)}) that no "
            "checkpoint holds; replaced by this run's."
        )
    os.makedirs(workdir, exist_ok=True)
    records.write_json(path, config_json)


def checkpoint_manager(workdir: str, max_to_keep: int) -> ocp.CheckpointManager:
  """The orbax manager of ``workdir/checkpoints``, keeping the latest ones."""
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, records.CHECKPOINTS)),
      options=ocp.CheckpointManagerOptions(
          max_to_keep=max_to_keep, create=True
      ),
  )


def save_checkpoint(
    manager: ocp.CheckpointManager,
    step: int,
    state: Any,
    config_json: dict[str, Any],
) -> None:
  """Saves ``state`` at ``step`` with the config it was trained under."""
  manager.save(
      step,
      args=ocp.args.Composite(
          **{
              records.STATE_ITEM: ocp.args.StandardSave(state),
              records.CONFIG_ITEM: ocp.args.JsonSave(config_json),
          }
      ),
  )


def _all_finite(tree: Any) -> bool:
  leaves = [
      x
      for x in jax.tree.leaves(tree)
      if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)
  ]
  return all(bool(jnp.all(jnp.isfinite(x))) for x in leaves)


def _move_aside(manager: ocp.CheckpointManager, workdir: str, step: int):
  """Moves checkpoint ``step`` to ``corrupt_checkpoints/`` (process 0)."""
  source = os.path.join(manager.directory, str(step))
  target_dir = os.path.join(workdir, records.CORRUPT_CHECKPOINTS)
  target = os.path.join(target_dir, str(step))
  n = 1
  while os.path.exists(target):  # The same step failed in an earlier session.
    target = os.path.join(target_dir, f"{step}.{n}")
    n += 1
  if jax.process_index() == 0:
    os.makedirs(target_dir, exist_ok=True)
    os.rename(source, target)
  return target


def restore_latest(
    manager: ocp.CheckpointManager,
    state: Any,
    config: ml_collections.ConfigDict,
    workdir: str,
) -> tuple[int, Any]:
  """The newest checkpoint that restores, checked against ``config``.

  Each checkpoint, newest first, is restored in full (its config, then its
  state against the structure, shapes and dtypes of ``state``) and must
  hold finite values. One that fails is named with the reason and moved to
  ``corrupt_checkpoints/`` (never deleted), and the next older one is
  tried. The first that restores decides the config: a different one is
  refused, however ``config.json`` was edited.

  Args:
    manager: from `checkpoint_manager`.
    state: the initial state (the restore target).
    config: the config asked for.
    workdir: the run's directory.

  Returns:
    ``(step, state)``; ``(0, state)`` unchanged when nothing restores.

  Raises:
    fields.ConfigError: the checkpoint holds another config, or was written
      by a version that stored no config.
  """
  for step in sorted(manager.all_steps(), reverse=True):
    step_dir = os.path.join(manager.directory, str(step))
    if not os.path.exists(os.path.join(step_dir, records.CONFIG_ITEM)):
      if os.path.isdir(os.path.join(step_dir, "default")):
        raise fields.ConfigError(
            f"Checkpoint {step_dir} was written by an older version of the "
            "harness, which stored no config with it; resume it with that "
            "version, or use a new --workdir."
        )
    try:
      saved = manager.restore(
          step,
          args=ocp.args.Composite(
              **{records.CONFIG_ITEM: ocp.args.JsonRestore()}
          ),
      )[records.CONFIG_ITEM]
      if not isinstance(saved, dict):
        raise ValueError(f"its config is {type(saved).__name__}, not a dict")
    except Exception as e:  # pylint: disable=broad-except
      error = e
    else:
      check_config(saved, config, workdir, f"checkpoint {step}")
      try:
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                **{records.STATE_ITEM: ocp.args.StandardRestore(state)}
            ),
        )[records.STATE_ITEM]
        if not _all_finite(restored):
          raise ValueError("it holds NaN or infinite values")
        return step, restored
      except Exception as e:  # pylint: disable=broad-except
        error = e
    reason = f"{type(error).__name__}: {str(error).strip()[:300]}"
    target = _move_aside(manager, workdir, step)
    _warn(
        f"Checkpoint {step} of {workdir} cannot be restored ({reason}); "
        f"moved to {target}, trying the previous one."
    )
    manager.reload()
  return 0, state


class MetricsWriter:
  """Appends each logged step's record to ``metrics.jsonl`` and TensorBoard.

  A record is one JSON object (``step`` plus metrics) in ``metrics.jsonl``,
  the log the studies read; each of its numeric values also goes to
  TensorBoard event files under ``tensorboard/`` (tensorboardX, no
  TensorFlow needed) at its step, for watching a run live:
  ``tensorboard --logdir=<workdir>/tensorboard``.

  A run killed after its last checkpoint logged steps that the resumed run
  recomputes. They are dropped from ``metrics.jsonl``, and each session
  writes a new event file that starts by telling TensorBoard to purge the
  steps after the resume step from earlier files.
  """

  def __init__(self, workdir: str, resume_step: int, tensorboard: bool = True):
    """Opens the logs of ``workdir`` for a session resuming at ``resume_step``.

    Args:
      workdir: the run's directory.
      resume_step: the step of the checkpoint this session starts from (0
        for a new run); logged steps after it are dropped.
      tensorboard: whether to write TensorBoard event files too.
    """
    self.path = os.path.join(workdir, records.METRICS)
    self.tensorboard_dir = os.path.join(workdir, records.TENSORBOARD)
    self.enabled = jax.process_index() == 0
    self._resume_step = resume_step
    self._tensorboard = tensorboard
    self._summary_writer = None
    if self.enabled and os.path.exists(self.path):
      with open(self.path) as f:
        logged, torn = records.parse_metrics_lines(f, self.path)
      if torn:
        _warn(f"{self.path}: dropped a torn last line (a killed write).")
      kept = [r for r in logged if r["step"] <= resume_step]
      with open(self.path + ".tmp", "w") as f:
        f.writelines(records.dumps(r) + "\n" for r in kept)
      os.replace(self.path + ".tmp", self.path)

  def _tensorboard_writer(self) -> tensorboardX.SummaryWriter:
    # Opened at the first record, so a session that logs nothing (a finished
    # run started again) leaves no empty event file.
    if self._summary_writer is None:
      self._summary_writer = tensorboardX.SummaryWriter(
          self.tensorboard_dir,
          # TensorBoard hides steps >= purge_step of earlier event files.
          purge_step=self._resume_step + 1 if self._resume_step else None,
          # Event file names hold the time in seconds; the resume step keeps
          # two quick sessions from writing the same file.
          filename_suffix=f".from_step_{self._resume_step}",
      )
    return self._summary_writer

  def write(self, record: dict[str, Any]) -> None:
    """Logs ``record``, a flat dict with an int ``step``."""
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(records.dumps(record) + "\n")
    if self._tensorboard:
      writer = self._tensorboard_writer()
      step = record["step"]
      for key, value in record.items():
        if (
            key != "step"
            and isinstance(value, numbers.Real)
            and not isinstance(value, bool)
            and math.isfinite(value)
        ):
          writer.add_scalar(key, value, step)
      # Records come every log_every steps; a live view wants each at once.
      writer.flush()

  def close(self) -> None:
    if self._summary_writer is not None:
      self._summary_writer.close()
      self._summary_writer = None


def environment() -> dict[str, Any]:
  """What produced a run besides its config: package versions and machine.

  Recorded in ``summary.json``: floating-point results depend on the XLA
  version and flags, so two runs of one config compare bit for bit only
  under the same environment.
  """
  versions = {}
  for package in ("jax", "jaxlib", "optax", "flax", "numpy", "sparseopt-jax"):
    try:
      versions[package] = metadata.version(package)
    except metadata.PackageNotFoundError:
      versions[package] = None
  return {
      "versions": versions,
      "python": platform.python_version(),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "device_kind": jax.devices()[0].device_kind,
      "cpu_count": os.cpu_count(),
  }


def write_summary(workdir: str, summary: dict[str, Any]) -> None:
  """Writes ``summary.json`` atomically, which marks the run ended."""
  if jax.process_index() == 0:
    records.write_json(os.path.join(workdir, records.SUMMARY), summary)
