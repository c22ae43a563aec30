r"""Test-accuracy curves and a comparison table from folders of workdirs.

  python -m experiments.studies.plot --root=experiments/results/quickstart

Reads every workdir under each ``--root`` (the flag repeats) that holds
``config.json`` and a metrics log (``metrics.jsonl`` or ``.jsonl.gz``),
keeping those whose config matches every ``--where field=value`` (for
example ``--where num_epochs=3.0``; see `runs.matches`).
Runs are grouped by the config fields that vary between them: one panel per
sparsity (columns) and per value of the other varying fields (rows), one
curve per optimizer, mean over seeds with a +-std band; baselines (``sgd``,
``adam``) dashed, SparseOpt solid. Writes the PNG (default
``<first root>/accuracy.png``) and, next to it (``accuracy_skew.png``), the
logged skew diagnostics over training: largest SparseOpt factor, spread of
neuron sparsity, dead neurons. Prints a markdown table: final test accuracy
mean +- std over seeds, the first step at which each run reaches its
baseline's mean final accuracy (mean over the seeds that reach it), and the
training and inference FLOPs as fractions of the dense model's (from each
``summary.json``, RigL's accounting, `experiments.flops`; "n/a" for
summaries written before it); then
the differences of runs paired by seed (`runs.pair_by_seed`).
"""

import collections
from collections.abc import Callable, Sequence
import functools
import json
import os
import textwrap
from typing import Any

from absl import app
from absl import flags
import numpy as np

from experiments import records
from experiments.configs import default as default_config
from experiments.studies import markdown
from experiments.studies import runs as runs_lib

# Which optimizer each optimizer is compared against.
BASELINE_OF = {
    "sparseopt": "sgd",
    "sparseopt+adam": "adam",
    "sgd": "sgd",
    "adam": "adam",
}
# Fields that never define a group: they identify repeats or bookkeeping.
_IGNORED = frozenset({"seed", "optimizer"}) | default_config.RESUMABLE_FIELDS
Run = runs_lib.Run

# The loaders and the config filter, defined in `runs`, under the names this
# module has always offered.
load_runs = runs_lib.load_runs
load_all = runs_lib.load_all
matches = runs_lib.matches


def _key(value):
  return json.dumps(value, sort_keys=True)


def varying_fields(runs) -> list[str]:
  """Config fields (other than seed/optimizer/bookkeeping) that differ."""
  fields = sorted({k for r in runs for k in r.config} - _IGNORED)
  return [k for k in fields if len({_key(r.config.get(k)) for r in runs}) > 1]


def _label(config, fields) -> str:
  return ", ".join(f"{k}={config.get(k)}" for k in fields)


def group_runs(runs, ignore: Sequence[str] = ()):
  """{(row label, sparsity): {optimizer: [runs over seeds]}}.

  Fields in ``ignore`` stay out of the row label, so runs that differ only
  in them share a group.
  """
  row_fields = [
      k for k in varying_fields(runs) if k != "sparsity" and k not in ignore
  ]
  groups = collections.defaultdict(lambda: collections.defaultdict(list))
  for run in runs:
    config = run.config
    key = (_label(config, row_fields), config["sparsity"])
    groups[key][config["optimizer"]].append(run)
  return groups


def first_step_reaching(run: Run, target: float) -> int | None:
  """The first eval step at which ``run``'s test accuracy is >= ``target``."""
  hits = np.nonzero(run.accuracy >= target)[0]
  return int(run.steps[hits[0]]) if hits.size else None


def run_flops(run: Run) -> dict[str, Any] | None:
  """The ``flops`` block of the run's ``summary.json`` (None: not there).

  Summaries written before FLOPs were counted, and unfinished runs, have
  none.
  """
  if not run.workdir:
    return None
  try:
    summary = records.read_summary(run.workdir)
  except (OSError, ValueError):
    return None
  flops = summary.get("flops") if isinstance(summary, dict) else None
  return flops if isinstance(flops, dict) else None


def _mean_flops(rs, key: str) -> float | None:
  """Mean over ``rs`` of a FLOPs ratio; None unless every run has it."""
  values = [(run_flops(r) or {}).get(key) for r in rs]
  if not values or any(v is None for v in values):
    return None
  return float(np.mean(values))


def summarize(groups) -> list[dict[str, Any]]:
  """One table row per (group, optimizer).

  ``flops_training`` and ``flops_inference``: the runs' training and
  inference FLOPs as fractions of the dense model's (``summary.json``'s
  ``flops`` block, `experiments.flops`), mean over seeds; None when a run's
  summary has none.
  """
  rows = []
  for (row, sparsity), by_opt in sorted(groups.items()):
    finals = {
        opt: np.array([r.final_accuracy for r in rs])
        for opt, rs in by_opt.items()
    }
    for opt, rs in sorted(by_opt.items()):
      baseline = BASELINE_OF.get(opt)
      target = finals[baseline].mean() if baseline in finals else None
      reached = (
          [first_step_reaching(r, target) for r in rs]
          if target is not None
          else []
      )
      hits = [s for s in reached if s is not None]
      rows.append(
          {
              "group": row,
              "sparsity": sparsity,
              "optimizer": opt,
              "seeds": len(rs),
              "final_mean": float(finals[opt].mean()),
              "final_std": runs_lib.sample_std(finals[opt]),
              "final_step": int(max(r.steps[-1] for r in rs)),
              "steps_to_baseline": float(np.mean(hits)) if hits else None,
              "seeds_reaching": len(hits),
              "finished": all(r.finished for r in rs),
              "flops_training": _mean_flops(rs, "training_ratio"),
              "flops_inference": _mean_flops(rs, "inference_ratio"),
          }
      )
  return rows


def _mean_std_text(row) -> str:
  mean = f"{100 * row['final_mean']:.2f}"
  if row["final_std"] is None:
    return mean
  return f"{mean} ± {100 * row['final_std']:.2f}"


def markdown_table(rows) -> str:
  """The rows of `summarize` as a markdown table (accuracies in %)."""
  cells = []
  for r in rows:
    if r["steps_to_baseline"] is None:
      reach = "never"
    else:
      reach = f"{r['steps_to_baseline']:.0f}"
      if r["seeds_reaching"] < r["seeds"]:
        reach += f" ({r['seeds_reaching']}/{r['seeds']} seeds)"
    unfinished = "" if r["finished"] else " (unfinished)"
    if r.get("flops_training") is None or r.get("flops_inference") is None:
      flops = "n/a"
    else:
      flops = f"{r['flops_training']:.3f} / {r['flops_inference']:.3f}"
    cells.append(
        [
            r["group"] or "-",
            r["sparsity"],
            r["optimizer"],
            r["seeds"],
            f"{_mean_std_text(r)}{unfinished}",
            f"{reach} / {r['final_step']}",
            flops,
        ]
    )
  return markdown.table(
      [
          "setting",
          "sparsity",
          "optimizer",
          "seeds",
          "final test acc (%)",
          "first step at baseline's final acc",
          "FLOPs train / inference (x dense)",
      ],
      cells,
  )


def paired_differences(groups) -> list[dict[str, Any]]:
  """Same-seed final-accuracy differences, each optimizer minus its baseline.

  Runs pair as `runs.pair_by_seed` says (finished, same seed). Returns one
  row per (group, optimizer) with `difference_stats` of the differences.
  """
  rows = []
  for (row, sparsity), by_opt in sorted(groups.items()):
    for opt, rs in sorted(by_opt.items()):
      baseline = BASELINE_OF.get(opt)
      if baseline == opt or baseline not in by_opt:
        continue
      diffs = seed_differences(rs, by_opt[baseline])
      if diffs.size:
        rows.append(
            {
                "group": row,
                "sparsity": sparsity,
                "optimizer": opt,
                "baseline": baseline,
                **difference_stats(diffs),
            }
        )
  return rows


def seed_differences(rs: Sequence[Run], base_rs: Sequence[Run]) -> np.ndarray:
  """Final accuracy of each run of ``rs`` minus its baseline's, by seed.

  Pairs as `runs.pair_by_seed` (finished runs of one seed, in seed order).
  """
  return runs_lib.final_differences(runs_lib.pair_by_seed(base_rs, rs))


difference_stats = runs_lib.difference_stats


def _points(row) -> str:
  """A `difference_stats` row's mean ± s.e. in percentage points."""
  return runs_lib.format_difference(row["mean"], row["sem"])


def paired_table(rows) -> str:
  """The rows of `paired_differences` as markdown (percentage points)."""
  cells = []
  for r in rows:
    cells.append(
        [
            r["group"] or "-",
            r["sparsity"],
            f"{r['optimizer']} - {r['baseline']}",
            r["n"],
            _points(r),
        ]
    )
  return markdown.table(
      [
          "setting",
          "sparsity",
          "comparison",
          "paired seeds",
          "difference (points, mean ± s.e.)",
      ],
      cells,
  )


def tuned_differences(
    runs, field: str = "learning_rate"
) -> list[dict[str, Any]]:
  """Each optimizer at its best ``field`` value minus its baseline at its own.

  Fair tuning: where ``field`` (a hyperparameter swept for every method)
  varies, each optimizer's value with the best mean final accuracy over its
  finished seeds is chosen within each (setting, sparsity), and the two
  choices are compared seed by seed. Choosing on the same seeds that are
  compared flatters both arms alike; ``edge`` flags a choice at the end of
  its grid, where the true optimum may lie outside it. Only comparisons in
  which both optimizers tried more than one value are returned.
  """
  if field not in varying_fields(runs):
    return []

  def mean_final(rs):
    return np.mean([r.final_accuracy for r in rs])

  rows = []
  groups = group_runs([r for r in runs if r.finished], ignore=(field,))
  for (row, sparsity), by_opt in sorted(groups.items()):
    grids = {opt: collections.defaultdict(list) for opt in by_opt}
    for opt, rs in by_opt.items():
      for r in rs:
        grids[opt][_key(r.config[field])].append(r)
    best = {
        opt: max(grid, key=lambda v: mean_final(grid[v]))
        for opt, grid in grids.items()
    }
    for opt, grid in sorted(grids.items()):
      baseline = BASELINE_OF.get(opt)
      if (
          baseline == opt
          or baseline not in grids
          or len(grid) < 2
          or len(grids[baseline]) < 2
      ):
        continue
      diffs = seed_differences(grid[best[opt]], grids[baseline][best[baseline]])
      if not diffs.size:
        continue
      edge = any(
          best[o]
          in (min(grids[o], key=json.loads), max(grids[o], key=json.loads))
          for o in (opt, baseline)
      )
      rows.append(
          {
              "group": row,
              "sparsity": sparsity,
              "optimizer": opt,
              "baseline": baseline,
              "field": field,
              "value": json.loads(best[opt]),
              "baseline_value": json.loads(best[baseline]),
              "edge": edge,
              "diffs": [float(d) for d in diffs],
              **difference_stats(diffs),
          }
      )
  return rows


def tuned_table(rows) -> str:
  """The rows of `tuned_differences` as markdown (percentage points)."""
  cells = []
  for r in rows:
    seeds = ", ".join(f"{100 * d:+.2f}" for d in r["diffs"])
    cells.append(
        [
            r["group"] or "-",
            r["sparsity"],
            f"{r['optimizer']} at {r['value']} - "
            f"{r['baseline']} at {r['baseline_value']}"
            + (" (edge of grid)" if r["edge"] else ""),
            r["n"],
            _points(r),
            seeds,
        ]
    )
  return markdown.table(
      [
          "setting",
          "sparsity",
          "comparison",
          "paired seeds",
          "difference (points, mean ± s.e.)",
          "by seed",
      ],
      cells,
  )


def neuron_churn(groups) -> list[dict[str, Any]]:
  """Dead neurons at the start and end, and how many died and revived.

  ``died``/``revived`` sum ``jump/L/died`` and ``jump/L/revived`` (logged at
  every mask update, see `sparseopt.mask_update_jump`) over layers and
  updates; ``dead_start``/``dead_end`` sum ``L/dead`` over layers at the
  first and last log step, so ``dead_end = dead_start + died - revived``.
  One row per (group, optimizer) with finished runs that logged them at
  every mask update (a run resumed across the change that added them logs
  only its tail, and its sums would not add up): means over seeds.
  """
  rows = []
  for (row, sparsity), by_opt in sorted(groups.items()):
    for opt, rs in sorted(by_opt.items()):
      rs = [r for r in rs if r.finished and _logs_churn(r.records)]
      if not rs:
        continue
      stats = collections.defaultdict(list)
      for r in rs:
        dead = layer_curve(r, "dead", sum)[1]
        stats["dead_start"].append(dead[0])
        stats["dead_end"].append(dead[-1])
        for stat in ("died", "revived"):
          stats[stat].append(
              sum(
                  v
                  for rec in r.records
                  for k, v in rec.items()
                  if k.startswith("jump/") and k.endswith("/" + stat)
              )
          )
      rows.append(
          {
              "group": row,
              "sparsity": sparsity,
              "optimizer": opt,
              "seeds": len(rs),
              **{k: float(np.mean(v)) for k, v in stats.items()},
          }
      )
  return rows


def _logs_churn(records) -> bool:
  """Whether every mask-update record (`runs.is_mask_update_record`) counts
  the neurons that died."""
  updates = [rec for rec in records if runs_lib.is_mask_update_record(rec)]
  return bool(updates) and all(
      any(k.startswith("jump/") and k.endswith("/died") for k in rec)
      for rec in updates
  )


def churn_table(rows) -> str:
  """The rows of `neuron_churn` as markdown."""
  return markdown.table(
      [
          "setting",
          "sparsity",
          "optimizer",
          "seeds",
          "dead at start",
          "died at mask updates",
          "revived at mask updates",
          "dead at end",
      ],
      [
          [r["group"] or "-", r["sparsity"], r["optimizer"], r["seeds"]]
          + [
              f"{r[k]:.1f}"
              for k in ("dead_start", "died", "revived", "dead_end")
          ]
          for r in rows
      ],
  )


def layer_keys(record: dict[str, Any], suffix: str) -> list[str]:
  """The per-layer ``L/suffix`` keys of a record (not the turning ones)."""
  return [
      k
      for k in record
      if k.endswith("/" + suffix)
      and not k.startswith(("turn/", "jump/", "update_turn/"))
  ]


def layer_curve(
    run: Run, stat: str, reduce: Callable[[list[float]], float]
) -> tuple[np.ndarray, np.ndarray]:
  """``reduce`` over layers of ``L/stat``, at every step that logged it."""
  steps, values = [], []
  for record in run.records:
    keys = layer_keys(record, stat)
    if keys:
      steps.append(record["step"])
      values.append(reduce([record[k] for k in keys]))
  return np.array(steps), np.array(values, dtype=float)


def on_common_steps(curves) -> tuple[np.ndarray, np.ndarray]:
  """``(steps, values)`` curves restricted to the steps all of them have.

  Returns the common steps and the values stacked, one row per curve.
  """
  steps = functools.reduce(np.intersect1d, [t for t, _ in curves])
  return steps, np.stack(
      [np.asarray(v)[np.searchsorted(t, steps)] for t, v in curves]
  )


# What `plot_skew` draws: (y label, per-layer stat, reduction over layers).
SKEW_PANELS = (
    (
        "largest SparseOpt factor\n(max over neurons and layers)",
        "max_scale",
        max,
    ),
    (
        "spread of neuron sparsity\n(std of s_i, mean over layers)",
        "s_std",
        np.mean,
    ),
    ("dead neurons\n(all incoming pruned, all layers)", "dead", sum),
)


def plot_skew(groups, path: str, title: str = "") -> bool:
  """The logged skew diagnostics over training, per sparsity (columns).

  Rows follow `SKEW_PANELS`; one curve per (group, optimizer), mean over
  seeds, baselines dashed. ``max_scale`` is the factor SparseOpt would apply
  on the live masks, logged for baseline runs too.

  Returns:
    Whether any run logged the diagnostics (and so whether the PNG exists).
  """
  curves = collections.defaultdict(dict)
  for (row, sparsity), by_opt in groups.items():
    for opt, rs in by_opt.items():
      for label, stat, reduce in SKEW_PANELS:
        per_seed = [layer_curve(r, stat, reduce) for r in rs]
        per_seed = [c for c in per_seed if c[0].size]
        if per_seed:
          curves[sparsity][label, row, opt] = on_common_steps(per_seed)
  if not curves:
    return False
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  sparsities = sorted(curves)
  rows = sorted({row for row, _ in groups})
  palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  width = 4.2 * max(len(sparsities), 2)
  fig, axes = plt.subplots(
      len(SKEW_PANELS),
      len(sparsities),
      squeeze=False,
      figsize=(width, 2.9 * len(SKEW_PANELS) + 0.8),
  )
  handles = {}
  for col, sparsity in enumerate(sparsities):
    for (label, row, opt), (steps, values) in sorted(curves[sparsity].items()):
      ax = axes[[p[0] for p in SKEW_PANELS].index(label), col]
      (handles[", ".join(x for x in (row, opt) if x)],) = ax.plot(
          steps,
          values.mean(0),
          "--" if opt in ("sgd", "adam") else "-",
          color=palette[rows.index(row) % len(palette)],
      )
    for i, (label, _, _) in enumerate(SKEW_PANELS):
      ax = axes[i, col]
      ax.set_title(f"sparsity {sparsity}", fontsize=9)
      ax.set_xlabel("step")
      ax.set_ylabel(label, fontsize=8)
      ax.grid(alpha=0.3)
  # One legend for all panels, below them (seed means; baselines dashed).
  ncol = max(1, min(len(handles), int(width // 3.2)))
  legend_rows = -(-len(handles) // ncol)
  fig.legend(
      list(handles.values()),
      list(handles),
      loc="lower center",
      ncol=ncol,
      fontsize=8,
      frameon=False,
  )
  bottom = (0.25 * legend_rows + 0.1) / fig.get_figheight()
  if title:
    fig.suptitle(textwrap.fill(title, int(9 * width)))
  fig.tight_layout(rect=(0, bottom, 1, 1))
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def full_length_curves(rs) -> tuple[np.ndarray, np.ndarray]:
  """The eval steps of the longest run and the accuracy curves covering them.

  A run still in progress (or killed) has a shorter curve; averaging it in
  would bend the mean where it stops, so it is left out of the curve (the
  plot's legend says so) while the table still reports it as unfinished.
  """
  steps = max((r.steps for r in rs), key=len)
  curves = np.stack(
      [r.accuracy[: len(steps)] for r in rs if len(r.accuracy) >= len(steps)]
  )
  return steps, curves


def plot(groups, path: str, title: str = "") -> None:
  """Test accuracy vs step; one panel per (row label, sparsity)."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  row_labels = sorted({row for row, _ in groups})
  sparsities = sorted({s for _, s in groups})
  fig, axes = plt.subplots(
      len(row_labels),
      len(sparsities),
      squeeze=False,
      figsize=(4.2 * len(sparsities), 3.4 * len(row_labels)),
  )
  colors = {
      "sgd": "tab:blue",
      "sparseopt": "tab:blue",
      "adam": "tab:green",
      "sparseopt+adam": "tab:green",
  }
  for (row, sparsity), by_opt in groups.items():
    ax = axes[row_labels.index(row), sparsities.index(sparsity)]
    for opt, rs in sorted(by_opt.items()):
      steps, curves = full_length_curves(rs)
      mean, std = 100 * curves.mean(0), runs_lib.sample_std(curves)
      style = "--" if opt in ("sgd", "adam") else "-"
      color = colors.get(opt)
      seeds = (
          f"{len(curves)} of {len(rs)} seeds"
          if len(curves) < len(rs)
          else f"{len(rs)} seed{'s' * (len(rs) > 1)}"
      )
      ax.plot(steps, mean, style, color=color, label=f"{opt} ({seeds})")
      if std is not None:
        std = 100 * std
        ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.15)
    ax.set_title(
        f"sparsity {sparsity}" + (f"\n{row}" if row else ""), fontsize=9
    )
    ax.set_xlabel("step")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
  for i, row in enumerate(row_labels):  # No runs in that (row, sparsity).
    for j, sparsity in enumerate(sparsities):
      if (row, sparsity) not in groups:
        axes[i, j].set_visible(False)
  if title:
    # Wrapped to the figure's width (about 9 characters per inch).
    fig.suptitle(textwrap.fill(title, int(9 * 4.2 * len(sparsities))))
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def skew_path(out: str) -> str:
  """Where `report` writes the skew plot for accuracy plot ``out``."""
  return os.path.splitext(out)[0] + "_skew.png"


def report(
    roots: str | Sequence[str],
    out: str | None = None,
    title: str = "",
    where: dict[str, Any] | None = None,
) -> str:
  """Plots the runs under ``roots`` (see `load_all`) to ``out``.

  Returns:
    The markdown table (and the paired differences, where seeds pair up).
  """
  runs = load_all(roots, where)
  if not runs:
    raise FileNotFoundError(
        f"No runs with test metrics under {roots}"
        + (f" matching {where}." if where else ".")
    )
  groups = group_runs(runs)
  first = roots if isinstance(roots, str) else roots[0]
  out = out or os.path.join(first, "accuracy.png")
  plot(groups, out, title)
  plot_skew(groups, skew_path(out), title)
  table = markdown_table(summarize(groups))
  paired = paired_differences(groups)
  if paired:
    table += "\n\nPaired by seed:\n\n" + paired_table(paired)
  tuned = tuned_differences(runs)
  if tuned:
    table += (
        "\n\nEach optimizer at its own best learning rate, paired by "
        "seed:\n\n" + tuned_table(tuned)
    )
  churn = neuron_churn(groups)
  if churn:
    table += (
        "\n\nDead neurons (all incoming weights pruned), mean over "
        "seeds:\n\n" + churn_table(churn)
    )
  return table


FLAGS = flags.FLAGS


def main(argv):
  del argv
  table = report(
      FLAGS.root, FLAGS.out, FLAGS.title, where=records.parse_sets(FLAGS.where)
  )
  print(table)
  out = FLAGS.out or os.path.join(FLAGS.root[0], "accuracy.png")
  skew = skew_path(out)
  print(
      f"\nPlot written to {out}"
      + (f" (skew diagnostics: {skew})" if os.path.exists(skew) else "")
  )


if __name__ == "__main__":
  flags.DEFINE_multi_string(
      "root", None, "Folder whose subfolders are workdirs (repeats)."
  )
  flags.DEFINE_multi_string(
      "where", [], "field=value: keep runs whose config has it."
  )
  flags.DEFINE_string("out", None, "PNG path (default <root>/accuracy.png).")
  flags.DEFINE_string("title", "", "Figure title.")
  flags.mark_flags_as_required(["root"])
  app.run(main)
