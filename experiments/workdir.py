"""Writing a run's workdir: config, checkpoints, metrics, summary.

The file names and their readers are in `experiments.records`; this module
is the writing side, used by the training loop (`experiments.train`):

* `check_or_save_config`: saves ``config.json`` or refuses a workdir that
  holds a run of a different config;
* `checkpoint_manager`: the orbax manager of ``checkpoints/``;
* `MetricsWriter`: ``metrics.jsonl`` plus TensorBoard event files under
  ``tensorboard/``, both cut back to the resume step on resume;
* `write_summary` and `environment`: ``summary.json`` and what produced it.

Only process 0 writes files; every process may call these functions.
"""

from importlib import metadata
import json
import numbers
import os
import platform
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
import tensorboardX

from experiments import records
from experiments.configs import default as default_config


def _json_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return json.loads(config.to_json_best_effort())


def check_or_save_config(config: ml_collections.ConfigDict,
                         workdir: str) -> None:
  """Saves ``config.json`` or, when one exists, refuses an incompatible config.

  Raises:
    ValueError: the workdir holds a run whose config differs from ``config``
      in a field that changes the numbers (anything but
      ``configs.default.RESUMABLE_FIELDS``).
  """
  path = os.path.join(workdir, records.CONFIG)
  current = _json_config(config)
  if os.path.exists(path):
    saved = records.load_saved_config(workdir)
    differ = sorted(k for k in set(saved) | set(current)
                    if k not in default_config.RESUMABLE_FIELDS
                    and saved.get(k) != current.get(k))
    if differ:
      changes = ", ".join(f"{k}: saved {saved.get(k)!r}, now {current.get(k)!r}"
                          for k in differ)
      raise ValueError(
          f"Workdir {workdir} holds a run with a different config ({changes}). "
          "Resume with the same config, or use a new --workdir.")
  elif jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(path, "w") as f:
      json.dump(current, f, indent=2, sort_keys=True)


def checkpoint_manager(workdir: str,
                       max_to_keep: int) -> ocp.CheckpointManager:
  """The orbax manager of ``workdir/checkpoints``, keeping the latest ones."""
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, records.CHECKPOINTS)),
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                           create=True))


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

  def __init__(self, workdir: str, resume_step: int,
               tensorboard: bool = True):
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
        kept = [l for l in f if json.loads(l)["step"] <= resume_step]
      with open(self.path, "w") as f:
        f.writelines(kept)

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
          filename_suffix=f".from_step_{self._resume_step}")
    return self._summary_writer

  def write(self, record: dict[str, Any]) -> None:
    """Logs ``record``, a flat dict with an int ``step``."""
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(record, sort_keys=True) + "\n")
    if self._tensorboard:
      writer = self._tensorboard_writer()
      step = record["step"]
      for key, value in record.items():
        if (key != "step" and isinstance(value, numbers.Real)
            and not isinstance(value, bool)):
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
  return {"versions": versions,
          "python": platform.python_version(),
          "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "device_kind": jax.devices()[0].device_kind,
          "cpu_count": os.cpu_count()}


def write_summary(workdir: str, summary: dict[str, Any]) -> None:
  """Writes ``summary.json``, which marks the run finished (process 0)."""
  if jax.process_index() == 0:
    with open(os.path.join(workdir, records.SUMMARY), "w") as f:
      json.dump(summary, f, indent=2, sort_keys=True)
