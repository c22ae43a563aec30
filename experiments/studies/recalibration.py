r"""Do the test-accuracy dips after mask updates come from stale BatchNorm stats?

  python -m experiments.studies.recalibration \
      --root=experiments/results/fmnist_recalibrate \
      --out=experiments/results/fmnist_recalibrate/recalibration.png

Reads the runs of the ``fmnist_recalibrate`` sweep: the same training with
``recalibrate_batches=0`` (evaluation with the running statistics) and
``recalibrate_batches=K`` (statistics re-estimated over K training batches
before each evaluation that follows a mask update; evaluation only, so the
two arms of a seed train identically). Prints, per optimizer and evaluation
step, the mean test accuracy over seeds of both arms and their paired
difference, and plots the curves. Reads result files only.
"""

from collections.abc import Sequence

from absl import app
from absl import flags
import numpy as np

from experiments.studies import markdown
from experiments.studies import runs as runs_lib


def _by_arm(runs: Sequence[runs_lib.Run]) -> dict[tuple[str, int], list]:
  out = {}
  for run in runs:
    if run.finished:
      key = (run.config["optimizer"], int(run.config["recalibrate_batches"]))
      out.setdefault(key, []).append(run)
  return dict(sorted(out.items()))


def table(runs: Sequence[runs_lib.Run]) -> str:
  """Mean test accuracy per evaluation step, without and with recalibration."""
  arms = _by_arm(runs)
  rows = []
  for optimizer in sorted({o for o, _ in arms}):
    ks = sorted(k for o, k in arms if o == optimizer)
    if len(ks) != 2 or ks[0] != 0:
      continue
    off, on = arms[(optimizer, 0)], arms[(optimizer, ks[1])]
    pairs = runs_lib.pair_by_seed(off, on)
    if not pairs:
      continue
    n = min(min(a.steps.size, b.steps.size) for a, b in pairs)
    steps = pairs[0][0].steps[:n]
    for i, step in enumerate(steps):
      a = np.array([p[0].accuracy[i] for p in pairs])
      b = np.array([p[1].accuracy[i] for p in pairs])
      stats = runs_lib.difference_stats(b - a)
      rows.append(
          [
              optimizer,
              int(step),
              len(pairs),
              f"{100 * a.mean():.2f}",
              f"{100 * b.mean():.2f}",
              runs_lib.format_difference(stats["mean"], stats["sem"]),
          ]
      )
  return markdown.table(
      [
          "optimizer",
          "step",
          "seeds",
          "running stats (%)",
          "recalibrated (%)",
          "difference (points, mean ± s.e.)",
      ],
      rows,
  )


def plot(runs: Sequence[runs_lib.Run], path: str) -> None:
  """Mean test accuracy curves, both optimizers, without and with."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(5.6, 3.8))
  colors = {"sgd": "C0", "sparseopt": "C1"}
  for (optimizer, k), rs in _by_arm(runs).items():
    n = min(r.steps.size for r in rs)
    acc = 100 * np.stack([r.accuracy[:n] for r in rs]).mean(0)
    label = f"{optimizer}, " + (
        "running stats" if k == 0 else f"recalibrated ({k} batches)"
    )
    ax.plot(
        rs[0].steps[:n],
        acc,
        "--" if k == 0 else "-",
        marker="o",
        color=colors.get(optimizer),
        label=f"{label} ({len(rs)} seeds)",
    )
  for step in _mask_update_steps(runs):
    ax.axvline(step, color="0.8", lw=0.8, zorder=0)
  ax.set_xlabel("step (grey: mask updates)")
  ax.set_ylabel("test accuracy (%)")
  ax.set_title(
      "RigL 95%, Fashion-MNIST: evaluation with stale vs\n"
      "recalibrated BatchNorm statistics",
      fontsize=10,
  )
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _mask_update_steps(runs: Sequence[runs_lib.Run]) -> list[int]:
  for run in runs:
    steps = run.mask_update_steps()
    if steps:
      return steps
  return []


def main(argv):
  del argv
  runs = runs_lib.load_all(flags.FLAGS.root)
  print(table(runs))
  if flags.FLAGS.out:
    plot(runs, flags.FLAGS.out)


if __name__ == "__main__":
  flags.DEFINE_multi_string("root", None, "Folders of workdirs (repeat).")
  flags.DEFINE_string("out", None, "Where to write the PNG (none: no plot).")
  flags.mark_flag_as_required("root")
  app.run(main)
