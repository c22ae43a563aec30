r"""The mechanism test: correcting by BatchNorm's measured std.

  python -m experiments.studies.bn_stats \
      --root=experiments/results/fmnist_bn_stats_base \
      --root=experiments/results/fmnist_bn_stats \
      --out=experiments/results/fmnist_bn_stats

Three arms under RigL, paired by seed (same init, masks and data order):
the SGD baseline (``optimizer=sgd``), the paper's factor
(``optimizer=sparseopt``, ``correction=fan_in``) and BatchNorm's measured
std (``optimizer=sparseopt``, ``correction=batch_stats``). Prints, as
markdown:

* final test accuracy per arm and learning rate, and each corrected arm's
  paired difference from the baseline at the same learning rate;
* the fair-tuning comparison: each arm at its own best learning rate (mean
  final accuracy over seeds), paired by seed, grid-edge optima flagged;
* how well each estimate predicts the measured std during training: from
  the ``sigma/<layer>/...`` diagnostics (``sigma_diagnostics=True``), the
  correlation across a layer's live neurons of ``log sigma_i`` with
  ``log sqrt(1 - s_i)`` and with ``log ||w_i||``, and the slope of
  ``log sigma_i`` on ``log (1 - s_i)`` (the paper's estimate says 0.5),
  averaged over the BN-paired layers, at the first, middle and last log
  step.

Writes ``<out>/accuracy.png`` (mean test accuracy curves of the three arms
at each learning rate, a band of +-1 std over seeds) and
``<out>/sigma.png`` (the slope and the correlations over training, mean
over seeds). Reads result files only.
"""

from collections.abc import Sequence
import os
from typing import Any

from absl import app
from absl import flags
import numpy as np

from experiments.studies import markdown
from experiments.studies import runs as runs_lib

ARMS = (
    ("SGD", {"optimizer": "sgd"}),
    (
        "SparseOpt, paper's factor",
        {"optimizer": "sparseopt", "correction": "fan_in"},
    ),
    (
        "SparseOpt, BatchNorm's std",
        {"optimizer": "sparseopt", "correction": "batch_stats"},
    ),
)
BASELINE = ARMS[0][0]
SIGMA_STATS = ("slope_fan_in", "corr_fan_in", "corr_norm")
# One color per arm in every panel.
COLORS = ("C0", "C1", "C2")


def arm_runs(
    runs: Sequence[runs_lib.Run], where: dict[str, Any]
) -> dict[float, list[runs_lib.Run]]:
  """The runs of one arm, by learning rate."""
  out = {}
  for run in runs:
    if runs_lib.matches(run.config, where):
      out.setdefault(float(run.config["learning_rate"]), []).append(run)
  return dict(sorted(out.items()))


def _mean_final(rs: Sequence[runs_lib.Run]) -> float:
  return float(np.mean([r.final_accuracy for r in rs]))


def _acc(rs: Sequence[runs_lib.Run]) -> str:
  finals = np.array([r.final_accuracy for r in rs if r.finished])
  if not finals.size:
    return "n/a"
  return f"{runs_lib.format_mean_std(finals)} ({finals.size})"


def _paired(control, treatment) -> str:
  pairs = runs_lib.pair_by_seed(control, treatment)
  if not pairs:
    return "n/a"
  stats = runs_lib.difference_stats(runs_lib.final_differences(pairs))
  return (
      f"{runs_lib.format_difference(stats['mean'], stats['sem'])} "
      f"({stats['n']})"
  )


def accuracy_table(by_arm: dict[str, dict[float, list[runs_lib.Run]]]) -> str:
  """Final accuracy per arm and learning rate, and paired differences."""
  lrs = sorted({lr for arm in by_arm.values() for lr in arm})
  base = by_arm[BASELINE]
  rows = []
  for lr in lrs:
    row = [f"{lr:g}"]
    for name, _ in ARMS:
      row.append(_acc(by_arm[name].get(lr, [])))
    for name, _ in ARMS[1:]:
      row.append(_paired(base.get(lr, []), by_arm[name].get(lr, [])))
    rows.append(row)
  return markdown.table(
      [
          "lr",
          *(f"{name} (%)" for name, _ in ARMS),
          *(f"{name} - SGD (points)" for name, _ in ARMS[1:]),
      ],
      rows,
  )


def best_lr(arm: dict[float, list[runs_lib.Run]]) -> float | None:
  """The learning rate with the best mean final accuracy (finished seeds)."""
  done = {lr: [r for r in rs if r.finished] for lr, rs in arm.items()}
  done = {lr: rs for lr, rs in done.items() if rs}
  if not done:
    return None
  return max(done, key=lambda lr: _mean_final(done[lr]))


def tuned_table(by_arm: dict[str, dict[float, list[runs_lib.Run]]]) -> str:
  """Each arm at its own best learning rate, paired with the baseline's."""
  base_lr = best_lr(by_arm[BASELINE])
  rows = []
  for name, _ in ARMS:
    arm = by_arm[name]
    lr = best_lr(arm)
    if lr is None:
      continue
    edge = " (grid edge)" if lr in (min(arm), max(arm)) and len(arm) > 1 else ""
    diff = (
        "-"
        if name == BASELINE or base_lr is None
        else _paired(by_arm[BASELINE][base_lr], arm[lr])
    )
    rows.append([name, f"{lr:g}{edge}", _acc(arm[lr]), diff])
  return markdown.table(
      ["arm", "best lr", "final test acc (%)", "paired - SGD at its best lr"],
      rows,
  )


def sigma_curve(run: runs_lib.Run, stat: str) -> tuple[np.ndarray, np.ndarray]:
  """Steps and the layer mean of ``sigma/<layer>/<stat>`` (NaN-free layers)."""
  steps, values = [], []
  for record in run.records:
    vals = [
        v
        for k, v in record.items()
        if k.startswith("sigma/") and k.endswith("/" + stat) and v is not None
    ]
    if vals:
      steps.append(record["step"])
      values.append(float(np.mean(vals)))
  return np.array(steps), np.array(values)


def sigma_table(by_arm: dict[str, dict[float, list[runs_lib.Run]]]) -> str:
  """The estimates' quality at the first, middle and last log step."""
  rows = []
  for name, _ in ARMS:
    for lr, rs in by_arm[name].items():
      curves = [
          {s: sigma_curve(r, s) for s in SIGMA_STATS} for r in rs if r.finished
      ]
      curves = [c for c in curves if c[SIGMA_STATS[0]][0].size]
      if not curves:
        continue
      n = min(c[SIGMA_STATS[0]][1].size for c in curves)
      picks = {"first": 0, "middle": n // 2, "last": n - 1}
      step = curves[0][SIGMA_STATS[0]][0]
      for label, i in picks.items():
        cells = [
            f"{np.mean([c[s][1][i] for c in curves]):.2f}" for s in SIGMA_STATS
        ]
        rows.append(
            [name, f"{lr:g}", f"{label} ({int(step[i])})", len(curves), *cells]
        )
  return markdown.table(
      [
          "arm",
          "lr",
          "log step",
          "seeds",
          "slope of log sigma_i on log(1-s_i)",
          "corr(log sigma_i, log sqrt(1-s_i))",
          "corr(log sigma_i, log ‖w_i‖)",
      ],
      rows,
  )


def setting(by_arm) -> str:
  """The runs' sparsity and budget, e.g. ``"RigL 97% (ERK), 3 epochs"``."""
  configs = [
      r.config for arm in by_arm.values() for rs in arm.values() for r in rs
  ]

  def values(field, fmt):
    return "/".join(fmt(v) for v in sorted({c[field] for c in configs}))

  sparsity = values("sparsity", lambda s: f"{100 * s:g}%")
  epochs = values("num_epochs", lambda e: f"{e:g}")
  return f"RigL {sparsity} (ERK), {epochs} epochs"


def plot_accuracy(by_arm, path: str) -> None:
  """Mean test accuracy curves per arm, one panel per learning rate."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  lrs = sorted({lr for arm in by_arm.values() for lr in arm})
  fig, axes = plt.subplots(
      1, len(lrs), figsize=(4.2 * len(lrs), 3.4), squeeze=False, sharey=True
  )
  for ax, lr in zip(axes[0], lrs):
    for (name, _), style, color in zip(ARMS, ("--", "-", "-"), COLORS):
      rs = [r for r in by_arm[name].get(lr, []) if r.finished]
      if not rs:
        continue
      n = min(r.steps.size for r in rs)
      acc = 100 * np.stack([r.accuracy[:n] for r in rs])
      steps = rs[0].steps[:n]
      ax.plot(
          steps, acc.mean(0), style, color=color, label=f"{name} ({len(rs)})"
      )
      std = runs_lib.sample_std(acc)
      if std is not None:
        ax.fill_between(
            steps,
            acc.mean(0) - std,
            acc.mean(0) + std,
            color=color,
            alpha=0.15,
        )
    ax.set_title(f"lr {lr:g}", fontsize=10)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("test accuracy (%)")
  axes[0][-1].legend(fontsize=8, loc="lower right")
  fig.suptitle(f"Fashion-MNIST, small BN ResNet, {setting(by_arm)}")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_sigma(by_arm, path: str) -> None:
  """Slope and correlations of the std estimates over training."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  titles = {
      "slope_fan_in": "slope of log sigma_i on log(1 - s_i)\n"
      "(paper's estimate: 0.5)",
      "corr_fan_in": "corr(log sigma_i, log sqrt(1 - s_i))",
      "corr_norm": "corr(log sigma_i, log ‖w_i‖)",
  }
  fig, axes = plt.subplots(1, len(SIGMA_STATS), figsize=(13, 3.6))
  for ax, stat in zip(axes, SIGMA_STATS):
    for (name, _), color in zip(ARMS, COLORS):
      for lr, rs in by_arm[name].items():
        curves = [sigma_curve(r, stat) for r in rs if r.finished]
        curves = [c for c in curves if c[0].size]
        if not curves:
          continue
        n = min(c[0].size for c in curves)
        mean = np.mean([c[1][:n] for c in curves], axis=0)
        ax.plot(
            curves[0][0][:n],
            mean,
            "-" if lr == max(by_arm[name]) else ":",
            color=color,
            label=f"{name}, lr {lr:g}",
        )
    if stat == "slope_fan_in":
      ax.axhline(0.5, color="k", lw=0.8, ls=":")
    ax.set_title(titles[stat], fontsize=9)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  axes[-1].legend(fontsize=7, loc="lower right")
  fig.suptitle(
      "How well each estimate predicts BatchNorm's measured std "
      "(mean over BN-paired layers and seeds)",
      fontsize=10,
  )
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def report(roots: Sequence[str], out: str | None) -> str:
  runs = runs_lib.load_all(roots)
  by_arm = {name: arm_runs(runs, where) for name, where in ARMS}
  text = "\n\n".join(
      [
          "Final test accuracy per learning rate (mean ± std over seeds, seeds in "
          "parentheses); paired differences from SGD at the same learning rate "
          "(mean ± s.e., points):",
          accuracy_table(by_arm),
          "Each arm at its own best learning rate:",
          tuned_table(by_arm),
          "How well the estimates predict BatchNorm's measured std "
          "(mean over BN-paired layers and seeds):",
          sigma_table(by_arm),
      ]
  )
  if out:
    os.makedirs(out, exist_ok=True)
    plot_accuracy(by_arm, os.path.join(out, "accuracy.png"))
    plot_sigma(by_arm, os.path.join(out, "sigma.png"))
  return text


def main(argv):
  del argv
  print(report(flags.FLAGS.root, flags.FLAGS.out))


if __name__ == "__main__":
  flags.DEFINE_multi_string("root", None, "Folders of workdirs (repeat).")
  flags.DEFINE_string("out", None, "Folder for the PNGs (none: no plots).")
  flags.mark_flag_as_required("root")
  app.run(main)
