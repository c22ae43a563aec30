r"""When does SparseOpt change training? Paired tables and turning plots.

  python -m experiments.studies.study --root=experiments/results/fmnist_when

Reads the runs of the ``fmnist_when`` sweep (see `experiments.sweep`): a
default recipe (RigL 97% ERK, SGD lr 0.05 momentum 0.9, wd 5e-4, 3 epochs)
and one factor varied at a time. For every comparison it pairs a control and
a treatment run by seed (`runs.pair_by_seed`: same init, masks and data
order) and reports the mean final test accuracy of each and their paired
difference, mean ± standard error over seeds (``n/a`` for a single seed).
Writes ``study.md`` (the tables), ``paired.png`` (every paired difference
with its standard error), ``turning.png`` (imbalance exponent and mean
turning angle vs step, mask updates as logged marked),
``dense_control.png``, ``fan_in.png`` (fan-in histograms at the end),
``budget.png`` (the paired gap over training, 3 vs 12 epochs) and
``topology.png`` (ablated neurons and ITOP over the 12-epoch runs) under
``--out`` (default: the first ``--root``). Unfinished runs are left out, so
the report can be drawn while the sweep runs.
"""

from collections.abc import Sequence
import dataclasses
import fractions
import os
from typing import Any

from absl import app
from absl import flags
import numpy as np

from experiments.studies import markdown
from experiments.studies import plot as plot_lib
from experiments.studies import runs as runs_lib

Run = runs_lib.Run

# The default recipe of the study; every comparison overrides some fields.
BASE = {
    "method": "rigl",
    "sparsity": 0.97,
    "optimizer": "sgd",
    "correction": "fan_in",
    "correct_filter": "all",
    "init": "masked_dense",
    "weight_decay": 5e-4,
    "learning_rate": 0.05,
    "momentum": 0.9,
    "grad_scale": 1.0,
    "num_epochs": 3.0,
}
SPARSEOPT = {"optimizer": "sparseopt", "correction": "fan_in"}
NORM = {"optimizer": "sparseopt", "correction": "norm"}
ADAMW = {"optimizer": "adam", "learning_rate": 2e-3, "weight_decay": 0.05}


@dataclasses.dataclass(frozen=True)
class Comparison:
  """Treatment vs control, both given as overrides of `BASE`."""

  section: str
  label: str
  control: dict[str, Any]
  treatment: dict[str, Any]
  note: str = ""


def _tau_note(
    lr: float, wd: float, momentum: float = 0.9, steps: int = 1406
) -> str:
  if wd == 0:
    return "budget/tau = 0"
  tau = (1 - momentum) / (4 * lr * wd)
  return f"tau = {tau:.0f} steps, budget/tau = {steps / tau:.2f}"


def comparisons() -> list[Comparison]:
  """Every comparison of the study, in report order."""
  out = [
      Comparison("correction", "fan_in (paper) vs none", {}, SPARSEOPT),
      Comparison("correction", "norm (measured) vs none", {}, NORM),
      Comparison("correction", "norm vs fan_in", SPARSEOPT, NORM),
      Comparison(
          "correction",
          "95%: fan_in vs none",
          {"sparsity": 0.95},
          {"sparsity": 0.95, **SPARSEOPT},
      ),
      Comparison(
          "correction",
          "95%: norm vs none",
          {"sparsity": 0.95},
          {"sparsity": 0.95, **NORM},
      ),
  ]
  for wd in (0.0, 5e-5, 5e-4, 5e-3):
    out.append(
        Comparison(
            "weight decay",
            f"wd {wd:g}: fan_in vs none",
            {"weight_decay": wd},
            {"weight_decay": wd, **SPARSEOPT},
            _tau_note(0.05, wd),
        )
    )
  for init in ("masked_dense", "fan_in"):
    out.append(
        Comparison(
            "initialization",
            f"init {init}: fan_in vs none",
            {"init": init},
            {"init": init, **SPARSEOPT},
        )
    )
  out.append(
      Comparison("optimizer", "SGD+momentum: fan_in vs none", {}, SPARSEOPT)
  )
  out.append(
      Comparison(
          "optimizer",
          "AdamW: fan_in vs none",
          ADAMW,
          {**ADAMW, "optimizer": "sparseopt+adam"},
      )
  )
  for wd in (5e-4, 5e-3):
    long = {"num_epochs": 12.0, "weight_decay": wd}
    out.append(
        Comparison(
            "budget",
            f"12 epochs, wd {wd:g}: fan_in vs none",
            long,
            {**long, **SPARSEOPT},
            _tau_note(0.05, wd, steps=5625),
        )
    )
  dense = {"method": "dense"}
  for k, name in ((1 / 3, "1/3"), (0.5, "1/2"), (2.0, "2"), (3.0, "3")):
    out.append(
        Comparison(
            "dense control",
            f"half the neurons x{name}",
            dense,
            {**dense, "grad_scale": k},
        )
    )
  return out


def matches(config: dict[str, Any], overrides: dict[str, Any]) -> bool:
  """Is ``config`` the run `BASE` + ``overrides`` describes (`runs.matches`)?"""
  spec = {**BASE, **overrides}
  if spec["method"] == "dense":
    spec = {
        k: v
        for k, v in spec.items()
        if k not in ("sparsity", "correction", "init")
    }
  return runs_lib.matches(config, spec)


def select(runs: Sequence[Run], overrides) -> dict[int, Run]:
  """Finished runs matching ``overrides``, by seed (`runs.by_seed`)."""
  return runs_lib.by_seed(r for r in runs if matches(r.config, overrides))


def paired(
    runs: Sequence[Run], comparison: Comparison
) -> dict[str, Any] | None:
  """Final accuracies of both arms and their same-seed difference.

  ``sem`` is None for a single pair (`runs.standard_error`).
  """
  pairs = runs_lib.pair_by_seed(
      select(runs, comparison.control).values(),
      select(runs, comparison.treatment).values(),
  )
  if not pairs:
    return None
  stats = runs_lib.difference_stats(runs_lib.final_differences(pairs))
  return {
      "comparison": comparison,
      "n": stats["n"],
      "control": np.array([c.final_accuracy for c, _ in pairs]),
      "treatment": np.array([t.final_accuracy for _, t in pairs]),
      "diff": stats["mean"],
      "sem": stats["sem"],
  }


def paired_markdown(rows) -> str:
  """The rows of `paired` as markdown (accuracies in %)."""
  return markdown.table(
      [
          "factor",
          "comparison",
          "seeds",
          "control acc (%)",
          "treatment acc (%)",
          "paired difference (points, mean ± s.e.)",
          "note",
      ],
      [
          [
              r["comparison"].section,
              r["comparison"].label,
              r["n"],
              runs_lib.format_mean_std(r["control"]),
              runs_lib.format_mean_std(r["treatment"]),
              runs_lib.format_difference(r["diff"], r["sem"]),
              r["comparison"].note,
          ]
          for r in rows
      ],
  )


def _bn_layers(record: dict[str, Any], prefix: str, stat: str) -> list[str]:
  # The classifier feeds no BatchNorm: leave it out of the layer averages.
  return sorted(
      k
      for k in record
      if k.startswith(prefix)
      and k.endswith("/" + stat)
      and not k.startswith(prefix + "head")
  )


def layer_mean_curve(
    run: Run, prefix: str, stat: str
) -> tuple[np.ndarray, np.ndarray]:
  """(steps, mean over BN-followed layers of ``prefix L/stat``)."""
  steps, values = [], []
  for record in run.records:
    keys = _bn_layers(record, prefix, stat)
    if keys:
      steps.append(record["step"])
      values.append(np.mean([record[k] for k in keys]))
  return np.array(steps), np.array(values)


def turning_summary(
    runs, overrides, stat: str, prefix: str = "turn/"
) -> float | None:
  """Mean over seeds, log steps and BN layers of ``stat``."""
  chosen = select(runs, overrides)
  means = []
  for run in chosen.values():
    _, values = layer_mean_curve(run, prefix, stat)
    if values.size:
      means.append(values.mean())
  return float(np.mean(means)) if means else None


def final_value(runs, overrides, suffix: str, reduce=sum) -> float | None:
  """Mean over seeds of ``reduce`` over layers of ``L/suffix`` at the end."""
  chosen = select(runs, overrides)
  totals = []
  for run in chosen.values():
    last = run.records[-1]
    keys = plot_lib.layer_keys(last, suffix)
    if keys:
      totals.append(reduce(last[k] for k in keys))
  return float(np.mean(totals)) if totals else None


ARMS = (("none (SGD)", {}), ("fan_in", SPARSEOPT), ("norm", NORM))
ARM_COLORS = {"none (SGD)": "tab:gray", "fan_in": "tab:blue", "norm": "tab:red"}


def mechanism_markdown(runs) -> str:
  """Turning imbalance, jumps and dead neurons for the three corrections."""
  settings = [
      ("97%, masked dense init", {}),
      ("97%, fan-in init", {"init": "fan_in"}),
      ("97%, wd 0", {"weight_decay": 0.0}),
      ("97%, wd 5e-3", {"weight_decay": 5e-3}),
      ("95%, masked dense init", {"sparsity": 0.95}),
      ("97%, 12 epochs", {"num_epochs": 12.0}),
      ("97%, 12 epochs, wd 5e-3", {"num_epochs": 12.0, "weight_decay": 5e-3}),
  ]

  def fmt(x, scale=1.0, digits=3):
    return "n/a" if x is None else f"{scale * x:.{digits}f}"

  rows = []
  for name, setting in settings:
    for arm, overrides in ARMS:
      o = {**setting, **overrides}
      if not select(runs, o):
        continue
      rows.append(
          [
              name,
              arm,
              fmt(turning_summary(runs, o, "imbalance")),
              fmt(turning_summary(runs, o, "angle_mean"), 1e3, 2),
              fmt(turning_summary(runs, o, "norm_jump", "jump/")),
              fmt(turning_summary(runs, o, "factor_jump", "jump/")),
              fmt(final_value(runs, o, "dead"), digits=1),
              fmt(final_value(runs, o, "max_scale", max), digits=2),
          ]
      )
  return markdown.table(
      [
          "setting",
          "correction",
          "imbalance exponent (mean over training)",
          "mean angle per step (mrad)",
          "norm jump at updates",
          "factor jump at updates",
          "dead neurons at end (all layers)",
          "largest factor at end (max over layers; the fan-in factor for SGD)",
      ],
      rows,
  )


# Coarse bins over the logged power-of-two ones: a logged bin starting at
# ``lo`` goes to bin ``min(lo.bit_length(), 4)`` (0, 1, 2-3, 4-7, >= 8).
FAN_IN_BINS = ("0", "1", "2-3", "4-7", ">= 8")


def fan_in_fractions(record: dict[str, Any]) -> np.ndarray | None:
  """Fractions of BN-followed layers' neurons per coarse fan-in bin.

  From the ``L/fan_in/<bin>`` counts the CLI logs (power-of-two bins), summed
  over layers and merged into `FAN_IN_BINS`; None when a run predates them.
  """
  counts = np.zeros(len(FAN_IN_BINS))
  for key, value in record.items():
    if "/fan_in/" not in key or key.startswith("head/"):
      continue
    lo = int(key.rsplit("/", 1)[1].split("-")[0])
    counts[min(lo.bit_length(), len(FAN_IN_BINS) - 1)] += value
  return counts / counts.sum() if counts.sum() else None


def final_fan_in(runs, overrides) -> np.ndarray | None:
  """`fan_in_fractions` at the end, mean over seeds (None if not logged)."""
  fractions = [
      fan_in_fractions(r.records[-1]) for r in select(runs, overrides).values()
  ]
  fractions = [f for f in fractions if f is not None]
  return np.mean(fractions, axis=0) if fractions else None


TOPOLOGY_SETTINGS = (
    ("97%, 3 epochs", {}),
    ("95%, 3 epochs", {"sparsity": 0.95}),
    ("97%, 12 epochs", {"num_epochs": 12.0}),
    ("97%, 12 epochs, wd 5e-3", {"num_epochs": 12.0, "weight_decay": 5e-3}),
)


def topology_markdown(runs) -> str:
  """ITOP, ablated neurons and fan-in histogram at the end, per arm."""
  rows = []
  for name, setting in TOPOLOGY_SETTINGS:
    for arm, overrides in ARMS:
      o = {**setting, **overrides}
      chosen = select(runs, o)
      if not chosen:
        continue
      itop = [r.records[-1].get("itop") for r in chosen.values()]
      itop = [x for x in itop if x is not None]
      dead = final_value(runs, o, "dead")
      hist = final_fan_in(runs, o)
      rows.append(
          [
              name,
              arm,
              len(chosen),
              f"{100 * np.mean(itop):.1f}%" if itop else "n/a",
              "n/a" if dead is None else f"{dead:.1f}",
              *(
                  ["n/a"] * len(FAN_IN_BINS)
                  if hist is None
                  else (f"{100 * x:.1f}%" for x in hist)
              ),
          ]
      )
  return markdown.table(
      [
          "setting",
          "correction",
          "seeds",
          "ITOP at end",
          "ablated neurons at end (all layers)",
          *(f"fan-in {name}" for name in FAN_IN_BINS),
      ],
      rows,
  )


def plot_turning(runs, path: str) -> None:
  """Imbalance exponent and mean angle vs step, per init, per correction."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  rows = [
      (name, setting)
      for name, setting in (
          ("masked dense init", {}),
          ("fan-in init", {"init": "fan_in"}),
      )
      if any(select(runs, {**setting, **o}) for _, o in ARMS)
  ]
  fig, axes = plt.subplots(
      len(rows), 2, figsize=(11, 3.6 * len(rows)), squeeze=False
  )
  for i, (row, setting) in enumerate(rows):
    updates = None
    for arm, overrides in ARMS:
      chosen = select(runs, {**setting, **overrides})
      if not chosen:
        continue
      for j, stat in enumerate(("imbalance", "angle_mean")):
        steps, values = plot_lib.on_common_steps(
            [layer_mean_curve(r, "turn/", stat) for r in chosen.values()]
        )
        scale = 1e3 if stat == "angle_mean" else 1.0
        mean = scale * values.mean(0)
        ax = axes[i, j]
        ax.plot(
            steps,
            mean,
            color=ARM_COLORS[arm],
            label=f"{arm} ({len(values)} seeds)",
        )
        if len(values) > 1:
          sd = scale * values.std(0)
          ax.fill_between(
              steps, mean - sd, mean + sd, color=ARM_COLORS[arm], alpha=0.15
          )
      # Read from the log, not recomputed from the config (see
      # `runs.Run.mask_update_steps` for the precision of older logs).
      updates = next(iter(chosen.values())).mask_update_steps()
    for j, ylabel in enumerate(
        (
            "imbalance exponent\n(slope of log angle on log(1-s_i))",
            "mean angle per step (mrad)",
        )
    ):
      ax = axes[i, j]
      for t in updates or []:
        ax.axvline(t, color="k", alpha=0.12, lw=0.8)
      if j == 0:
        ax.axhline(-0.5, color="k", ls=":", lw=1)
        ax.axhline(0.0, color="k", ls="-", lw=0.6)
      ax.set_title(f"RigL 97%, {row}", fontsize=10)
      ax.set_xlabel("step (thin lines: mask updates)")
      ax.set_ylabel(ylabel, fontsize=9)
      ax.grid(alpha=0.3)
      ax.legend(fontsize=8)
  axes[0, 0].annotate(
      "-0.5: the paper's skew",
      xy=(0.99, -0.5),
      xycoords=("axes fraction", "data"),
      ha="right",
      va="bottom",
      fontsize=8,
  )
  fig.suptitle(
      "Turning rates of BN-followed layers (mean over layers; "
      "band: std over seeds)",
      fontsize=11,
  )
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def paired_curve(
    runs, control, treatment
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int] | None:
  """Same-seed accuracy difference at every eval step both arms logged.

  Returns ``(fraction of training, mean difference, standard error, seeds)``
  over the seeds `runs.pair_by_seed` pairs (None if none), the standard
  error None for a single seed.
  """
  pairs = runs_lib.pair_by_seed(
      select(runs, control).values(), select(runs, treatment).values()
  )
  if not pairs:
    return None
  steps, acc = plot_lib.on_common_steps(
      [(r.steps, r.accuracy) for pair in pairs for r in pair]
  )
  diffs = acc[1::2] - acc[0::2]  # Treatment - control, one row per seed.
  total = pairs[0][0].steps[-1]
  return (
      steps / total,
      diffs.mean(axis=0),
      runs_lib.standard_error(diffs),
      len(pairs),
  )


BUDGETS = (("3 epochs", 3.0, "tab:orange"), ("12 epochs", 12.0, "tab:blue"))


def plot_budget(runs, path: str) -> bool:
  """Paired gap (paper's factor - none) over training, short vs long budget.

  One panel per weight decay that has a 12-epoch pair; returns whether it
  drew anything.
  """
  panels = []
  for wd in (5e-4, 5e-3):
    lines = []
    for name, epochs, color in BUDGETS:
      o = {"num_epochs": epochs, "weight_decay": wd}
      curve = paired_curve(runs, o, {**o, **SPARSEOPT})
      if curve is not None:
        lines.append((name, color, curve))
    if any(name == "12 epochs" for name, _, _ in lines):
      panels.append((wd, lines))
  if not panels:
    return False
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, axes = plt.subplots(
      1,
      len(panels),
      figsize=(5.2 * len(panels), 3.8),
      squeeze=False,
      sharey=True,
  )
  for ax, (wd, lines) in zip(axes[0], panels):
    for name, color, (x, diff, sem, n) in lines:
      ax.plot(
          x,
          100 * diff,
          color=color,
          marker="o",
          ms=3,
          label=f"{name} ({n} seeds)",
      )
      if sem is not None:
        ax.fill_between(
            x, 100 * (diff - sem), 100 * (diff + sem), color=color, alpha=0.2
        )
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xlabel("fraction of training")
    ax.set_title(f"RigL 97%, SGD, wd {wd:g}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  axes[0][0].set_ylabel(
      "test accuracy, paper's factor - none\n" "(points, same seed, ±1 s.e.)"
  )
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def topology_curve(run: Run, stat: str) -> tuple[np.ndarray, np.ndarray]:
  """``itop``, or ``dead`` summed over layers, at every step that logged it."""
  if stat != "itop":
    return plot_lib.layer_curve(run, stat, sum)
  logged = [r for r in run.records if "itop" in r]
  return (
      np.array([r["step"] for r in logged]),
      np.array([r["itop"] for r in logged], dtype=float),
  )


LONG_SETTINGS = (
    ("wd 5e-4", {"num_epochs": 12.0}, "-"),
    ("wd 5e-3", {"num_epochs": 12.0, "weight_decay": 5e-3}, "--"),
)


def plot_topology(runs, path: str) -> bool:
  """Ablated neurons and ITOP over the 12-epoch runs, per arm (seed mean)."""
  lines = []
  for name, setting, style in LONG_SETTINGS:
    for arm, overrides in ARMS:
      chosen = select(runs, {**setting, **overrides})
      if chosen:
        lines.append(
            (
                f"{arm}, {name} ({len(chosen)} seeds)",
                arm,
                style,
                list(chosen.values()),
            )
        )
  if not lines:
    return False
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
  for ax, stat, ylabel, scale in (
      (axes[0], "dead", "ablated neurons (all layers)", 1.0),
      (axes[1], "itop", "ITOP (% of weights ever active)", 100.0),
  ):
    for label, arm, style, chosen in lines:
      steps, values = plot_lib.on_common_steps(
          [topology_curve(r, stat) for r in chosen]
      )
      if not steps.size:
        continue
      ax.plot(
          steps,
          scale * values.mean(0),
          color=ARM_COLORS[arm],
          ls=style,
          label=label,
      )
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.suptitle("RigL 97%, 12 epochs: topology over training", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def plot_paired(rows, path: str) -> None:
  """Every paired difference with its standard error, one bar each."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  # The default recipe's pair recurs in several sections: draw it once.
  seen, unique = set(), []
  for r in rows:
    key = (
        repr(sorted({**BASE, **r["comparison"].control}.items())),
        repr(sorted({**BASE, **r["comparison"].treatment}.items())),
    )
    if key not in seen:
      seen.add(key)
      unique.append(r)
  rows = unique
  labels = [f"{r['comparison'].section}: {r['comparison'].label}" for r in rows]
  diffs = np.array([100 * r["diff"] for r in rows])
  # No error bar where the s.e. is missing (a single seed).
  sems = np.array([0.0 if r["sem"] is None else 100 * r["sem"] for r in rows])
  fig, ax = plt.subplots(figsize=(8, 0.38 * len(rows) + 1.2))
  y = np.arange(len(rows))[::-1]
  ax.barh(
      y,
      diffs,
      xerr=sems,
      color=["tab:blue" if d >= 0 else "tab:orange" for d in diffs],
      alpha=0.8,
      capsize=3,
  )
  ax.set_yticks(y)
  ax.set_yticklabels(labels, fontsize=8)
  ax.axvline(0, color="k", lw=0.8)
  ax.set_xlabel(
      "paired difference in final test accuracy (points)\n"
      "treatment - control, same seed; error bars: ±1 s.e."
  )
  ax.grid(axis="x", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_dense_control(rows, path: str) -> None:
  """Paired accuracy cost of scaling half the neurons' gradients by k."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  dense = sorted(
      (r for r in rows if r["comparison"].section == "dense control"),
      key=lambda r: r["comparison"].treatment["grad_scale"],
  )
  ks = np.array([r["comparison"].treatment["grad_scale"] for r in dense])
  diffs = np.array([100 * r["diff"] for r in dense])
  sems = np.array([0.0 if r["sem"] is None else 100 * r["sem"] for r in dense])
  # The control itself, k = 1, is 0 by construction; the line runs through it.
  line = sorted([*zip(ks, diffs), (1.0, 0.0)])
  fig, ax = plt.subplots(figsize=(5.5, 3.6))
  ax.plot(*zip(*line), color="tab:purple")
  ax.errorbar(
      ks, diffs, yerr=sems, marker="o", capsize=3, color="tab:purple", ls="none"
  )
  ax.axhline(0, color="k", lw=0.8)
  ax.plot(
      [1.0], [0.0], marker="s", color="k", ls="none", label="k = 1 (control)"
  )
  ax.set_xscale("log")
  ax.minorticks_off()
  ticks = [k for k, _ in line]
  ax.set_xticks(ticks)
  ax.set_xticklabels(
      [str(fractions.Fraction(k).limit_denominator(10)) for k in ticks]
  )
  ax.set_xlabel(
      "gradient factor k on a fixed random half\n"
      "of each BN-followed layer's neurons"
  )
  ax.legend(fontsize=8, loc="upper left")
  ax.set_ylabel("accuracy vs k = 1 (points)\nsame seed, ±1 s.e.")
  ax.set_title(
      "Dense control: the cost of turning imbalance alone", fontsize=10
  )
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_fan_in(runs, path: str) -> bool:
  """Fan-in histograms at the end, per setting and correction (if logged).

  Returns:
    Whether any run logged a histogram (and so whether the PNG was written).
  """
  panels = []
  for name, setting in TOPOLOGY_SETTINGS:
    arms = [(arm, final_fan_in(runs, {**setting, **o})) for arm, o in ARMS]
    arms = [(arm, h) for arm, h in arms if h is not None]
    if arms:
      panels.append((name, arms))
  if not panels:
    return False
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, axes = plt.subplots(
      1, len(panels), figsize=(4.6 * len(panels), 3.6), squeeze=False
  )
  x = np.arange(len(FAN_IN_BINS))
  for ax, (name, arms) in zip(axes[0], panels):
    width = 0.8 / len(arms)
    for i, (arm, hist) in enumerate(arms):
      ax.bar(
          x + (i - (len(arms) - 1) / 2) * width,
          100 * hist,
          width,
          color=ARM_COLORS[arm],
          label=arm,
      )
    ax.set_xticks(x)
    ax.set_xticklabels(FAN_IN_BINS)
    ax.set_xlabel("active incoming weights per neuron")
    ax.set_ylabel("% of neurons (BN-followed layers)")
    ax.set_title(f"RigL {name}, end of training", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def report(roots: Sequence[str], out_dir: str) -> str:
  """Writes the plots under ``out_dir`` and returns the markdown report."""
  runs = runs_lib.load_all(roots)
  rows = [p for p in (paired(runs, c) for c in comparisons()) if p]
  text = [
      "## Paired differences (treatment - control, same seed)",
      "",
      paired_markdown(rows),
      "",
      "## Mechanism: turning rates, mask-update jumps, dead neurons",
      "",
      mechanism_markdown(runs),
      "",
      "## Topology at the end: ITOP, ablated neurons, fan-in histogram",
      "",
      "Fan-in bins: fraction of the BN-followed layers' neurons with "
      "that many active incoming weights (mean over seeds; n/a: the run "
      "predates the histogram logging).",
      "",
      topology_markdown(runs),
  ]
  if rows:
    plot_paired(rows, os.path.join(out_dir, "paired.png"))
  if any(r["comparison"].section == "dense control" for r in rows):
    plot_dense_control(rows, os.path.join(out_dir, "dense_control.png"))
  plot_fan_in(runs, os.path.join(out_dir, "fan_in.png"))
  plot_budget(runs, os.path.join(out_dir, "budget.png"))
  plot_topology(runs, os.path.join(out_dir, "topology.png"))
  if select(runs, {}):
    plot_turning(runs, os.path.join(out_dir, "turning.png"))
  return "\n".join(text)


FLAGS = flags.FLAGS


def main(argv):
  del argv
  roots = FLAGS.root
  out_dir = FLAGS.out or roots[0]
  text = report(roots, out_dir)
  with open(os.path.join(out_dir, "study.md"), "w") as f:
    f.write(text + "\n")
  print(text)


if __name__ == "__main__":
  flags.DEFINE_multi_string(
      "root",
      None,
      "Folder(s) whose subfolders are " "workdirs of the fmnist_when sweep.",
  )
  flags.DEFINE_string(
      "out",
      None,
      "Where study.md and the PNGs go " "(default: the first --root).",
  )
  flags.mark_flags_as_required(["root"])
  app.run(main)
