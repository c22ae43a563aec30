"""Tests of the plot/table script, the sweep runner, grad_ratio and the Colab."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from experiments import fake_data
from experiments import grad_ratio
from experiments import records as run_records
from experiments import sweep
from experiments import train
from experiments.studies import markdown
from experiments.studies import plot
import workdirs

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tuned_differences_need_a_grid_for_both_optimizers(tmp_path):
  root = str(tmp_path)
  for seed in (0, 1):
    workdirs.fake_workdir(root, f"b{seed}", "sgd", seed, [0.5, 0.8])
    workdirs.fake_workdir(root, f"s{seed}", "sparseopt", seed, [0.5, 0.7])
  assert plot.tuned_differences(plot.load_runs(root)) == []
  # A grid for SparseOpt alone is no fair comparison either.
  workdirs.fake_workdir(
      root, "s0_lr", "sparseopt", 0, [0.5, 0.9], learning_rate=0.1
  )
  assert plot.tuned_differences(plot.load_runs(root)) == []


def test_paired_differences_pair_finished_runs_by_seed(tmp_path):
  root = str(tmp_path)
  for seed, (b, s) in enumerate([(0.70, 0.75), (0.80, 0.81), (0.60, 0.58)]):
    workdirs.fake_workdir(root, f"b{seed}", "sgd", seed, [0.5, b])
    workdirs.fake_workdir(root, f"s{seed}", "sparseopt", seed, [0.5, s])
  workdirs.fake_workdir(
      root, "b3", "sgd", 3, [0.5, 0.9]
  )  # no partner: not paired
  workdirs.fake_workdir(root, "s4", "sparseopt", 4, [0.5, 0.9], finished=False)
  (row,) = plot.paired_differences(plot.group_runs(plot.load_runs(root)))
  diffs = np.array([0.05, 0.01, -0.02])
  assert row["n"] == 3
  assert row["mean"] == pytest.approx(diffs.mean())
  assert row["sem"] == pytest.approx(diffs.std(ddof=1) / np.sqrt(3))
  assert "| - | 0.95 | sparseopt - sgd | 3 | +1.33 ± 2.03 |" in plot.report(
      root
  )


def test_panels_follow_varying_fields(tmp_path):
  root = str(tmp_path)
  workdirs.fake_workdir(root, "a", "sgd", 0, [0.5], sparsity=0.9)
  workdirs.fake_workdir(root, "b", "sgd", 0, [0.5], sparsity=0.95)
  groups = plot.group_runs(plot.load_runs(root))
  assert sorted(groups) == [("", 0.9), ("", 0.95)]


def test_neuron_churn_sums_deaths_and_revivals_over_updates(tmp_path):
  root = str(tmp_path)
  for seed, opt in ((0, "sgd"), (1, "sgd"), (0, "sparseopt"), (1, "sparseopt")):
    workdirs.fake_workdir(root, f"{opt}{seed}", opt, seed, [0.5, 0.6])
  workdirs.fake_workdir(
      root, "sgd2", "sgd", 2, [0.5], finished=False
  )  # Left out.
  # sgd seed 0: two layers, 3 dead at the start; update 1 kills 2 and
  # revives 1, update 2 revives 1: 3 dead at the end. sgd seed 1: 5 -> 9.
  logs = {
      "sgd0": [
          (50, {"a/kernel/dead": 2.0, "b/kernel/dead": 1.0}),
          (
              150,
              {
                  "jump/a/kernel/died": 2.0,
                  "jump/a/kernel/revived": 1.0,
                  "jump/b/kernel/died": 0.0,
                  "jump/b/kernel/revived": 0.0,
                  "a/kernel/dead": 3.0,
                  "b/kernel/dead": 1.0,
              },
          ),
          (
              250,
              {
                  "jump/a/kernel/died": 0.0,
                  "jump/a/kernel/revived": 0.0,
                  "jump/b/kernel/died": 0.0,
                  "jump/b/kernel/revived": 1.0,
                  "a/kernel/dead": 3.0,
                  "b/kernel/dead": 0.0,
              },
          ),
      ],
      "sgd2": [
          (50, {"a/kernel/dead": 50.0}),
          (150, {"jump/a/kernel/died": 40.0, "a/kernel/dead": 90.0}),
      ],
      # Resumed across the change that added the counts: its first
      # update has jump keys but no died/revived. Left out.
      "sparseopt1": [
          (50, {"a/kernel/dead": 1.0}),
          (150, {"jump/a/kernel/norm_jump": 0.1, "a/kernel/dead": 4.0}),
          (
              250,
              {
                  "jump/a/kernel/norm_jump": 0.1,
                  "jump/a/kernel/died": 0.0,
                  "jump/a/kernel/revived": 1.0,
                  "a/kernel/dead": 3.0,
              },
          ),
      ],
      "sgd1": [
          (50, {"a/kernel/dead": 5.0}),
          (
              150,
              {
                  "jump/a/kernel/died": 4.0,
                  "jump/a/kernel/revived": 0.0,
                  "a/kernel/dead": 9.0,
              },
          ),
      ],
  }
  for name, records in logs.items():
    with open(tmp_path / name / "metrics.jsonl", "a") as f:
      for step, record in records:
        f.write(json.dumps({"step": step, **record}) + "\n")
  # sparseopt0 logged no churn, sparseopt1 only part of it: no row.
  (row,) = plot.neuron_churn(plot.group_runs(plot.load_runs(root)))
  assert (row["optimizer"], row["seeds"]) == ("sgd", 2)
  assert row["dead_start"] == pytest.approx(4.0)  # (3 + 5) / 2
  assert row["died"] == pytest.approx(3.0)  # (2 + 4) / 2
  assert row["revived"] == pytest.approx(1.0)  # (2 + 0) / 2
  assert row["dead_end"] == pytest.approx(6.0)  # (3 + 9) / 2
  assert "| - | 0.95 | sgd | 2 | 4.0 | 3.0 | 1.0 | 6.0 |" in plot.report(root)


def test_report_draws_skew_diagnostics_when_logged(tmp_path):
  root = str(tmp_path)
  for seed, opt in ((0, "sgd"), (0, "sparseopt")):
    workdirs.fake_workdir(root, f"{opt}{seed}", opt, seed, [0.5, 0.6])
  plot.report(root)
  assert not os.path.exists(tmp_path / "accuracy_skew.png")  # Not logged.
  with open(tmp_path / "sgd0" / "metrics.jsonl", "a") as f:
    for step in (100, 200):
      f.write(
          json.dumps(
              {
                  "step": step,
                  "conv/kernel/max_scale": 2.0,
                  "conv/kernel/s_std": 0.1,
                  "conv/kernel/dead": 1.0,
              }
          )
          + "\n"
      )
  plot.report(root)
  assert plot.skew_path(str(tmp_path / "accuracy.png")) == str(
      tmp_path / "accuracy_skew.png"
  )
  assert os.path.getsize(tmp_path / "accuracy_skew.png") > 10_000


def test_sweep_names_runs_by_their_overrides():
  runs = sweep.expand(sweep.SWEEPS["fmnist_convergence"])
  names = [name for name, _ in runs]
  assert len(names) == len(set(names)) == 2 * 2 * 3 * 2 * 3 + 2 * 2 * 3
  assert (
      "num_epochs-3.0__method-rigl__sparsity-0.99__optimizer-sgd__seed-2"
      in names
  )
  for name in sweep.SWEEPS:
    for _, overrides in sweep.expand(sweep.SWEEPS[name]):
      sweep.make_config(sweep.SWEEPS[name].config, overrides)  # All valid.


def test_bn_stats_sweep_pairs_with_fmnist_why_097():
  # Every field but the correction's (and the diagnostics switches) as the
  # committed fmnist_why_097 runs at the same learning rate and seed.
  root = os.path.join(_REPO, "experiments", "results", "fmnist_why_097")
  runs = dict(sweep.expand(sweep.SWEEPS["fmnist_bn_stats"]))
  assert len(runs) == 9
  paired = 0
  for name, overrides in runs.items():
    config = sweep.make_config("fmnist_resnet", overrides)
    assert config.correction == "batch_stats" and config.sigma_diagnostics
    saved = os.path.join(root, name, "config.json")
    if not os.path.exists(saved):  # lr 0.05: the default, not in that grid.
      continue
    paired += 1
    with open(saved) as f:
      theirs = run_records.config_from_json(json.load(f))
    ours = json.loads(config.to_json_best_effort())
    # (sigma_diagnostics, a diagnostics switch, never counts as a change.)
    assert run_records.config_differences(theirs, ours) == [
        "correction: saved 'fan_in', now 'batch_stats'"
    ], name
  assert paired == 6


def test_recalibrate_sweep_is_the_quickstart_twice():
  quick = dict(sweep.expand(sweep.SWEEPS["quickstart"]))
  runs = sweep.expand(sweep.SWEEPS["fmnist_recalibrate"])
  assert len(runs) == 2 * 2 * 3
  base = sweep.make_config(
      "fmnist_resnet",
      quick["method-rigl__sparsity-0.95__optimizer-sgd__seed-0"],
  )
  for _, overrides in runs:
    config = sweep.make_config("fmnist_resnet", overrides)
    differ = {k for k in config.keys() if config[k] != base[k]}
    assert differ <= {"recalibrate_batches", "optimizer", "seed"}


def test_sweep_select_filters_within_a_fixed_shard():
  conv = sweep.SWEEPS["fmnist_convergence"]
  everything = sweep.expand(conv)
  short = sweep.select(conv, where={"num_epochs": 3, "method": "rigl"})
  assert [n for n, _ in short] == [
      n
      for n, o in everything
      if o["num_epochs"] == 3.0 and o["method"] == "rigl"
  ]
  assert len(short) == 4 * 2 * 3  # 90/95/97/99% x 2 optimizers x 3 seeds
  # A run's shard does not depend on the filter.
  shard1 = sweep.select(conv, shard=(1, 2))
  assert sweep.select(conv, shard=(1, 2), where={"num_epochs": 3.0}) == [
      (n, o) for n, o in shard1 if o["num_epochs"] == 3.0
  ]
  assert {n for n, _ in shard1} == {n for n, _ in everything[1::2]}
  assert not sweep.select(conv, where={"num_epochs": 6.0})


def test_sweep_skips_finished_and_resumes(tmp_path, monkeypatch):
  data = fake_data.write_fashion_mnist(str(tmp_path / "data"), 64, 16)
  calls = []
  monkeypatch.setattr(
      sweep.train,
      "train_and_evaluate",
      lambda config, workdir: calls.append(workdir),
  )
  root = str(tmp_path / "runs")
  done = os.path.join(root, "method-rigl__sparsity-0.95__optimizer-sgd__seed-0")
  os.makedirs(done)
  open(os.path.join(done, "summary.json"), "w").close()
  finished = list(sweep.run_sweep("quickstart", root, extra={"data_dir": data}))
  assert len(finished) == 2
  assert calls == [
      os.path.join(
          root, "method-rigl__sparsity-0.95__optimizer-sparseopt__seed-0"
      )
  ]


def test_sweep_goes_on_past_a_diverged_run(tmp_path, monkeypatch):
  calls = []

  def diverge_first(config, workdir):
    calls.append(workdir)
    if len(calls) == 1:
      raise sweep.train.DivergedError("diverged at step 3", 3, {})

  monkeypatch.setattr(sweep.train, "train_and_evaluate", diverge_first)
  finished = list(sweep.run_sweep("quickstart", str(tmp_path)))
  assert finished == calls and len(calls) == 2


def test_grad_ratio_tiny():
  rng = np.random.default_rng(0)
  images = rng.normal(size=(128, 28, 28, 1)).astype(np.float32)
  labels = rng.integers(0, 10, 128)
  results = grad_ratio.measure(
      images,
      labels,
      sparsities=(0.9,),
      hidden=64,
      num_seeds=1,
      num_batches=2,
      batch_size=64,
  )
  r = results[0.9]
  # BN amplifies by about 1/sqrt(1 - 0.9) = 3.16; without BN no amplification.
  assert 2.5 < r["bn"] < 4.0
  assert 0.6 < r["no_bn"] < 1.5
  assert r["slope_bn"] > 0.5 and abs(r["slope_bn_sparseopt"]) < 0.5
  assert "| 0.9 | 3.16 |" in grad_ratio.markdown_table(results)


def test_colab_notebook_runs_on_mock_data(tmp_path, monkeypatch):
  with open(os.path.join(_REPO, "experiments", "colab.ipynb")) as f:
    cells = [c for c in json.load(f)["cells"] if c["cell_type"] == "code"]
  tags = [c["metadata"].get("tags", []) for c in cells]
  # The "setup" cell clones and pip-installs the repository in Colab; the
  # test runs from the clone instead and runs every other cell as it is.
  assert [i for i, t in enumerate(tags) if "setup" in t] == [0]
  assert any("parameters" in t for t in tags)
  parameters = (
      "NUM_EPOCHS = 1\nMETHOD = 'rigl'\nSPARSITY = 0.9\nSEED = 0\n"
      f"DATA_DIR = ''\nWORKDIR = {str(tmp_path)!r}\nPREPARE_DATA = False\n"
      "OVERRIDES = {'num_train_steps': 2, 'batch_size': 8, "
      "'eval_batch_size': 8, 'update_every': 1, 'progress_bar': False,"
      # The MLP: the notebook's code path without a ResNet compile.
      "'model': 'fmnist_mlp'}\n"
  )
  monkeypatch.setenv("MPLBACKEND", "Agg")
  namespace = {}
  with tfds.testing.mock_data(num_examples=16):
    for cell, cell_tags in zip(cells, tags):
      if "setup" in cell_tags:
        continue
      source = (
          parameters if "parameters" in cell_tags else "".join(cell["source"])
      )
      exec(compile(source, "colab.ipynb", "exec"), namespace)
  assert os.path.exists(tmp_path / "accuracy.png")
  assert sorted(os.listdir(tmp_path)) == [
      "accuracy.png",
      "accuracy_skew.png",
      "sgd",
      "sparseopt",
  ]


def test_quickstart_main_writes_table_and_plots(tmp_path):
  data = fake_data.write_fashion_mnist(str(tmp_path / "data"), 64, 16)
  root = tmp_path / "quickstart"
  sets = [
      f"data_dir={data}",
      "num_train_steps=4",
      "eval_every=2",
      "checkpoint_every=2",
      "log_every=2",
      "batch_size=16",
      "eval_batch_size=16",
      "update_every=2",
      "model=fmnist_mlp",
      "progress_bar=False",
  ]
  result = subprocess.run(
      [sys.executable, "-m", "experiments.quickstart", f"--root={root}"]
      + [f"--set={s}" for s in sets],
      cwd=_REPO,
      capture_output=True,
      text=True,
      timeout=600,
      check=False,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "| - | 0.95 | sparseopt - sgd | 1 |" in result.stdout
  for name in ("table.md", "accuracy.png", "accuracy_skew.png"):
    assert os.path.getsize(root / name) > 0, name


def test_markdown_table_layout_and_ragged_rows():
  assert markdown.table(["a", "b"], [[1, "x"], [2.5, None]]) == (
      "| a | b |\n|---|---|\n| 1 | x |\n| 2.5 | None |"
  )
  assert markdown.table(["a"], []) == "| a |\n|---|"
  with pytest.raises(ValueError, match="row 1 has 1 cells, the header has 2"):
    markdown.table(["a", "b"], [[1, 2], [3]])


def test_gmp_and_structure_sweeps():
  gmp = sweep.expand(sweep.SWEEPS["fmnist_gmp"])
  assert len(gmp) == 24
  assert {o["method"] for _, o in gmp} == {"gmp"}
  assert {o["sparsity"] for _, o in gmp} == {0.9, 0.95, 0.97}
  # 12 epochs for 97%: both optimizers, 3 seeds each.
  long = [o for _, o in gmp if o.get("num_epochs") == 12.0]
  assert sorted((o["sparsity"], o["optimizer"], o["seed"]) for o in long) == [
      (0.97, opt, seed) for opt in ("sgd", "sparseopt") for seed in range(3)
  ]
  runs = sweep.expand(sweep.SWEEPS["fmnist_structure"])
  assert len(runs) == 24
  arms = {
      (o["method"], o.get("structure"), o.get("sparsity"), o["optimizer"])
      for _, o in runs
  }
  assert arms == {
      ("rigl", "unstructured", 0.95, "sgd"),
      ("rigl", "unstructured", 0.95, "sparseopt"),
      ("rigl", "unstructured", 0.97, "sgd"),
      ("rigl", "unstructured", 0.97, "sparseopt"),
      ("rigl", "constant_fan_in", 0.95, "sgd"),
      ("rigl", "constant_fan_in", 0.97, "sgd"),
      ("rigl", "2:4", 0.5, "sgd"),
      ("dense", None, None, "sgd"),
  }
  for _, overrides in gmp + runs:
    config = sweep.make_config("fmnist_resnet", overrides)
    assert config.num_epochs == overrides.get("num_epochs", 3.0)
    train.validate_config(config)


@pytest.mark.parametrize(
    "structure, sparsity", [("2:4", 0.5), ("constant_fan_in", 0.97)]
)
def test_structure_sweep_arms_train_on_fake_data(tmp_path, structure, sparsity):
  runs = dict(sweep.expand(sweep.SWEEPS["fmnist_structure"]))
  name = f"structure-{structure}__sparsity-{sparsity}__optimizer-sgd__seed-0"
  data = fake_data.write_fashion_mnist(str(tmp_path / "d"), 32, 16)
  config = sweep.make_config(
      "fmnist_resnet",
      {
          **runs[name],
          "data_dir": data,
          "batch_size": 16,
          "eval_batch_size": 16,
          "num_train_steps": 2,
          "update_every": 1,
          "end_fraction": 1.0,
          "progress_bar": False,
      },
  )
  summary = train.train_and_evaluate(config, str(tmp_path / "w"))
  assert summary["flops"]["inference_ratio"] < 1.0
