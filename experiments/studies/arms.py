r"""Named arms of a sweep side by side, each paired by seed with a reference.

  python -m experiments.studies.arms --root=experiments/results/fmnist_ham \
      --arm="SGD:optimizer=sgd,ham=False" \
      --arm="SparseOpt:optimizer=sparseopt,ham=False" \
      --arm="HAM:optimizer=sgd,ham=True" \
      --arm="SparseOpt + HAM:optimizer=sparseopt,ham=True" \
      --out=experiments/results/fmnist_ham/arms.png

An arm is a label and the config values its runs share (``field=value``,
comma-separated; values parse as in ``--where``). The first arm is the
reference unless ``--reference`` names another. Prints a markdown table: per
arm the seeds finished, the final test accuracy (mean ± std over seeds, %),
the training and inference FLOPs as fractions of the dense model's (from each
``summary.json``, mean over seeds; "n/a" without), and the difference to the
reference paired by seed (mean ± s.e., with the per-seed values); then every
other pair of arms, paired the same way. Draws the test-accuracy curves of
every arm (mean over seeds, ± std band) to ``--out``. Arms that match no
finished run are listed with 0 seeds; a run matching two arms is an error
(the arms must not overlap).
"""

from collections.abc import Mapping, Sequence
import dataclasses
import itertools
import os
import textwrap
from typing import Any

from absl import app
from absl import flags
import numpy as np

from experiments import records
from experiments.studies import markdown
from experiments.studies import plot as plot_lib
from experiments.studies import runs as runs_lib

Run = runs_lib.Run


@dataclasses.dataclass(frozen=True)
class Arm:
  """A label and the config values that select its runs."""

  label: str
  where: Mapping[str, Any]


def parse_arm(text: str) -> Arm:
  """``"label:field=value,field=value"`` as an `Arm`.

  Raises:
    ValueError: without a label or with a malformed ``field=value``.
  """
  label, sep, spec = text.partition(":")
  if not sep or not label.strip():
    raise ValueError(
        f"--arm={text!r}: expected 'label:field=value,...' (a label, a colon,"
        " then the config values of its runs)."
    )
  items = [s.strip() for s in spec.split(",") if s.strip()]
  return Arm(label.strip(), records.parse_sets(items))


def select(runs: Sequence[Run], arms: Sequence[Arm]) -> dict[str, list[Run]]:
  """The runs of each arm (by label), in the order of ``arms``.

  Raises:
    ValueError: a run matches two arms, or two arms share a label.
  """
  labels = [a.label for a in arms]
  if len(set(labels)) != len(labels):
    raise ValueError(f"Arm labels must differ: {labels}.")
  out = {a.label: [] for a in arms}
  for run in runs:
    hits = [a.label for a in arms if runs_lib.matches(run.config, a.where)]
    if len(hits) > 1:
      raise ValueError(
          f"{run.workdir} matches arms {hits}: make the arms' values "
          "disjoint."
      )
    if hits:
      out[hits[0]].append(run)
  return out


def _flops(rs: Sequence[Run]) -> str:
  values = [plot_lib.run_flops(r) or {} for r in rs]
  train = [v.get("training_ratio") for v in values]
  infer = [v.get("inference_ratio") for v in values]
  if not rs or None in train or None in infer:
    return "n/a"
  return f"{np.mean(train):.3f} / {np.mean(infer):.3f}"


def _difference(control: Sequence[Run], treatment: Sequence[Run]) -> str:
  pairs = runs_lib.pair_by_seed(control, treatment)
  if not pairs:
    return "n/a"
  diffs = runs_lib.final_differences(pairs)
  stats = runs_lib.difference_stats(diffs)
  seeds = ", ".join(f"{100 * d:+.2f}" for d in diffs)
  return (
      f"{runs_lib.format_difference(stats['mean'], stats['sem'])} "
      f"(n={stats['n']}: {seeds})"
  )


def table(by_arm: Mapping[str, Sequence[Run]], reference: str) -> str:
  """The arms table and the pairwise differences (see the module doc)."""
  rows = []
  for label, rs in by_arm.items():
    done = list(runs_lib.by_seed(rs).values())
    acc = np.array([r.final_accuracy for r in done])
    rows.append(
        [
            label,
            len(done),
            runs_lib.format_mean_std(acc),
            _flops(done),
            "(reference)"
            if label == reference
            else _difference(by_arm[reference], rs),
        ]
    )
  out = markdown.table(
      [
          "arm",
          "seeds",
          "final test acc. (%)",
          "FLOPs train / inference (x dense)",
          f"vs {reference}, paired (points)",
      ],
      rows,
  )
  others = [
      (a, b)
      for a, b in itertools.combinations(by_arm, 2)
      if reference not in (a, b)
  ]
  if others:
    out += "\n\nOther pairs (second minus first, paired by seed):\n\n"
    out += markdown.table(
        ["first", "second", "difference (points)"],
        [[a, b, _difference(by_arm[a], by_arm[b])] for a, b in others],
    )
  return out


def draw(by_arm: Mapping[str, Sequence[Run]], path: str, title: str) -> None:
  """Test accuracy vs step, one curve per arm (mean, ± std band)."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  for i, (label, rs) in enumerate(by_arm.items()):
    done = list(runs_lib.by_seed(rs).values())
    if not done:
      continue
    steps, curves = plot_lib.full_length_curves(done)
    mean, std = 100 * curves.mean(0), runs_lib.sample_std(curves)
    color = f"C{i}"
    seeds = f"{len(curves)} seed{'s' * (len(curves) > 1)}"
    ax.plot(steps, mean, color=color, label=f"{label} ({seeds})")
    if std is not None:
      std = 100 * std
      ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.12)
  ax.set_xlabel("step")
  ax.set_ylabel("test accuracy (%)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="lower right")
  if title:
    ax.set_title(textwrap.fill(title, 72), fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


FLAGS = flags.FLAGS


def main(argv):
  del argv
  arms = [parse_arm(a) for a in FLAGS.arm]
  if not arms:
    raise app.UsageError("Give at least one --arm.")
  reference = FLAGS.reference or arms[0].label
  if reference not in [a.label for a in arms]:
    raise app.UsageError(f"--reference={reference!r} is not an arm's label.")
  runs = runs_lib.load_all(FLAGS.root, records.parse_sets(FLAGS.where))
  by_arm = select(runs, arms)
  print(table(by_arm, reference))
  out = FLAGS.out or os.path.join(FLAGS.root[0], "arms.png")
  draw(by_arm, out, FLAGS.title)
  print(f"\nPlot written to {out}")


if __name__ == "__main__":
  flags.DEFINE_multi_string(
      "root", None, "Folder whose subfolders are workdirs (repeats)."
  )
  flags.DEFINE_multi_string("arm", [], "label:field=value,... (repeats).")
  flags.DEFINE_string("reference", None, "Label of the reference arm.")
  flags.DEFINE_multi_string(
      "where", [], "field=value: keep runs whose config has it."
  )
  flags.DEFINE_string("out", None, "Plot path (default <root>/arms.png).")
  flags.DEFINE_string("title", "", "Plot title.")
  flags.mark_flag_as_required("root")
  app.run(main)
