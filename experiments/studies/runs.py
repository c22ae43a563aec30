"""Loaded runs: one typed record per workdir, and the one pairing by seed.

Every study reads workdirs through `load_all`, filters them with `matches`
and compares two sets of runs through `pair_by_seed`, so that which runs
count, which configs are the same and which runs pair are decided here
once. The conventions:

* Config values match when they are equal, numbers within a relative
  tolerance of 1e-9 (``3 == 3.0``, ``5e-05 == 5e-5``, and a value that went
  through a float round trip); bools match only bools, sequences match
  element by element.
* Only finished runs pair. Two runs pair when they have the same seed (same
  init, masks and data order); a seed without a finished partner is left
  out, and a seed twice in one arm is an error, since which of the two to
  pair would be a guess.
* A standard error needs two paired seeds: with one it is None, and tables
  render it as ``n/a`` (`format_difference`).
"""

from collections.abc import Iterable, Mapping, Sequence
import dataclasses
import math
import os
from typing import Any

import numpy as np

from experiments import records as records_lib

# Relative tolerance of `values_match` on numbers.
REL_TOL = 1e-9


@dataclasses.dataclass(frozen=True, eq=False)
class Run:
  """One workdir as the studies see it.

  Attributes:
    name: the workdir's folder name (unique within its root).
    workdir: the workdir's path.
    config: the saved config, completed with the defaults of fields added
      since (`records.load_saved_config`).
    records: the metrics records, in step order.
    steps: the steps at which the test accuracy was logged.
    accuracy: the test accuracy at those steps.
    finished: whether the run reached its last step (wrote a summary and did
      not diverge).
  """

  name: str
  workdir: str
  config: Mapping[str, Any]
  records: Sequence[Mapping[str, Any]]
  steps: np.ndarray
  accuracy: np.ndarray
  finished: bool

  @classmethod
  def from_log(
      cls,
      config: Mapping[str, Any],
      records: Sequence[Mapping[str, Any]],
      *,
      name: str = "",
      workdir: str = "",
      finished: bool = True,
  ) -> "Run":
    """A run from its config and metrics records (the eval curve read off)."""
    evals = [r for r in records if "test_accuracy" in r]
    return cls(
        name=name,
        workdir=workdir,
        config=config,
        records=records,
        steps=np.array([r["step"] for r in evals], dtype=int),
        accuracy=np.array([r["test_accuracy"] for r in evals], dtype=float),
        finished=finished,
    )

  @property
  def seed(self) -> int:
    return self.config["seed"]

  @property
  def final_accuracy(self) -> float:
    """The last logged test accuracy."""
    return float(self.accuracy[-1])

  def mask_update_steps(self) -> list[int]:
    """The steps of the run's mask updates, read from its log.

    A log that lists them (``mask_update_steps`` in the record of each
    window that held updates) gives them exactly. An older log lacks that
    field; there, a record that holds ``jump/...`` keys is one whose window
    held an update (they are logged for mask-update steps only, with the
    turning diagnostics on), and the update is placed at the window's first
    step: one past the previous record with training metrics. That is exact
    when updates fall on the first step of a log window, as in every
    committed log (updates one step past multiples of ``update_every=100``,
    windows of ``log_every=50``); otherwise an update may lie up to
    ``log_every - 1`` steps later than placed, and a window that held
    several updates shows one. A log with neither (turning diagnostics off)
    gives no steps.
    """
    if any(records_lib.MASK_UPDATE_STEPS in r for r in self.records):
      return sorted(
          {
              int(t)
              for r in self.records
              for t in r.get(records_lib.MASK_UPDATE_STEPS, ())
          }
      )
    steps, window_start = [], 1
    for record in self.records:
      if is_mask_update_record(record):
        steps.append(window_start)
      if "train_loss" in record:  # An eval-only record closes no window.
        window_start = record["step"] + 1
    return steps


def is_mask_update_record(record: Mapping[str, Any]) -> bool:
  """Whether ``record``'s log window held a mask update (see `Run`)."""
  return records_lib.MASK_UPDATE_STEPS in record or any(
      k.startswith("jump/") for k in record
  )


def load_run(workdir: str) -> Run | None:
  """The run in ``workdir``; None without a metrics log or a test accuracy."""
  if not records_lib.has_metrics(workdir):
    return None
  run = Run.from_log(
      records_lib.load_saved_config(workdir),
      records_lib.read_metrics(workdir),
      name=os.path.basename(os.path.normpath(workdir)),
      workdir=workdir,
      # A diverged run ended without a final accuracy: it never pairs.
      finished=records_lib.is_finished(workdir)
      and not records_lib.has_diverged(workdir),
  )
  return run if run.steps.size else None


def load_runs(root: str) -> list[Run]:
  """Every run in the subfolders of ``root`` (see `load_run`), by name."""
  runs = (
      load_run(os.path.join(root, name)) for name in sorted(os.listdir(root))
  )
  return [run for run in runs if run is not None]


def values_match(a: Any, b: Any) -> bool:
  """Whether two config values are the same (see the module docstring)."""
  if isinstance(a, bool) or isinstance(b, bool):
    return isinstance(a, bool) and isinstance(b, bool) and a == b
  if isinstance(a, (int, float)) and isinstance(b, (int, float)):
    return math.isclose(a, b, rel_tol=REL_TOL)
  if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
    return len(a) == len(b) and all(map(values_match, a, b))
  return a == b


def matches(config: Mapping[str, Any], where: Mapping[str, Any]) -> bool:
  """Whether ``config`` has every ``field: value`` of ``where``."""
  return all(
      field in config and values_match(config[field], value)
      for field, value in where.items()
  )


def load_all(
    roots: str | Sequence[str], where: Mapping[str, Any] | None = None
) -> list[Run]:
  """`load_runs` over several roots, keeping the runs that match ``where``.

  A workdir reached twice (a run linked into a second root) counts once.
  """
  roots = [roots] if isinstance(roots, str) else list(roots)
  runs, seen = [], set()
  for root in roots:
    for run in load_runs(root):
      real = os.path.realpath(run.workdir)
      if real not in seen and matches(run.config, where or {}):
        seen.add(real)
        runs.append(run)
  return runs


def by_seed(runs: Iterable[Run]) -> dict[int, Run]:
  """The finished ``runs``, by seed, in seed order.

  Raises:
    ValueError: two finished runs share a seed.
  """
  out = {}
  for run in runs:
    if not run.finished:
      continue
    if run.seed in out:
      raise ValueError(
          f"Seed {run.seed} twice in one arm: {out[run.seed].workdir}"
          f" and {run.workdir}; which to pair is ambiguous."
      )
    out[run.seed] = run
  return dict(sorted(out.items()))


def pair_by_seed(
    control: Iterable[Run], treatment: Iterable[Run]
) -> list[tuple[Run, Run]]:
  """``(control, treatment)`` pairs of finished runs with one seed, by seed.

  Seeds without a finished run in both arms are left out; a seed twice in
  one arm raises ValueError (see `by_seed`).
  """
  control, treatment = by_seed(control), by_seed(treatment)
  return [(control[s], treatment[s]) for s in control if s in treatment]


def final_differences(pairs: Sequence[tuple[Run, Run]]) -> np.ndarray:
  """Treatment minus control final test accuracy, one entry per pair."""
  return np.array([t.final_accuracy - c.final_accuracy for c, t in pairs])


def standard_error(diffs: np.ndarray) -> float | np.ndarray | None:
  """std / sqrt(n) over axis 0 (ddof=1); None for fewer than two seeds."""
  diffs = np.asarray(diffs, dtype=float)
  if diffs.shape[0] < 2:
    return None
  sem = diffs.std(axis=0, ddof=1) / math.sqrt(diffs.shape[0])
  return float(sem) if np.ndim(sem) == 0 else sem


def sample_std(values: np.ndarray) -> float | np.ndarray | None:
  """The sample std over axis 0 (ddof=1); None for fewer than two seeds.

  Every "± std over seeds" the studies print or shade is this one, the
  same estimator `standard_error` divides by sqrt(n).
  """
  values = np.asarray(values, dtype=float)
  if values.shape[0] < 2:
    return None
  std = values.std(axis=0, ddof=1)
  return float(std) if np.ndim(std) == 0 else std


def format_mean_std(accuracies: np.ndarray) -> str:
  """Accuracies (fractions) as ``mean ± std`` in %, std by `sample_std`.

  ``n/a`` for none; the mean alone for one seed.
  """
  accuracies = 100 * np.asarray(accuracies, dtype=float)
  if not accuracies.size:
    return "n/a"
  std = sample_std(accuracies)
  if std is None:
    return f"{accuracies.mean():.2f}"
  return f"{accuracies.mean():.2f} ± {std:.2f}"


def difference_stats(diffs: np.ndarray) -> dict[str, Any]:
  """n, mean and standard error (`standard_error`) of paired differences."""
  diffs = np.asarray(diffs, dtype=float)
  return {
      "n": int(diffs.size),
      "mean": float(diffs.mean()),
      "sem": standard_error(diffs),
  }


def format_difference(mean: float, sem: float | None) -> str:
  """A difference in accuracy as ``+x.xx ± y.yy`` points (s.e. or ``n/a``)."""
  sem_text = "n/a" if sem is None else f"{100 * sem:.2f}"
  return f"{100 * mean:+.2f} ± {sem_text}"
