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
from experiments import markdown
from experiments import plot
from experiments import sweep

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fake_run(root, name, optimizer, seed, curve, sparsity=0.95, finished=True,
              learning_rate=0.05):
  workdir = os.path.join(root, name)
  os.makedirs(workdir)
  config = {"method": "rigl", "sparsity": sparsity, "optimizer": optimizer,
            "seed": seed, "learning_rate": learning_rate, "log_every": 10}
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(config, f)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    for i, acc in enumerate(curve):
      f.write(json.dumps({"step": 100 * (i + 1), "train_loss": 1.0}) + "\n")
      f.write(json.dumps({"step": 100 * (i + 1), "test_accuracy": acc}) + "\n")
  if finished:
    open(os.path.join(workdir, "summary.json"), "w").close()


def test_table_and_plot(tmp_path):
  root = str(tmp_path)
  _fake_run(root, "b0", "sgd", 0, [0.5, 0.6, 0.70])
  _fake_run(root, "b1", "sgd", 1, [0.5, 0.6, 0.80])
  _fake_run(root, "s0", "sparseopt", 0, [0.6, 0.76, 0.80])
  _fake_run(root, "s1", "sparseopt", 1, [0.7, 0.74, 0.78], finished=False)
  rows = {r["optimizer"]: r for r in plot.summarize(
      plot.group_runs(plot.load_runs(root)))}
  assert rows["sgd"]["final_mean"] == pytest.approx(0.75)
  assert rows["sgd"]["final_std"] == pytest.approx(0.05)
  assert rows["sparseopt"]["final_mean"] == pytest.approx(0.79)
  # Baseline final mean 0.75: SparseOpt seed 0 reaches it at step 200, seed 1
  # at 300; baseline seed 0 never does, seed 1 at 300.
  assert rows["sparseopt"]["steps_to_baseline"] == pytest.approx(250)
  assert rows["sgd"]["steps_to_baseline"] == 300
  assert rows["sgd"]["seeds_reaching"] == 1
  assert not rows["sparseopt"]["finished"]
  table = plot.report(root)
  assert "| - | 0.95 | sparseopt | 2 | 79.00 ± 1.00 (unfinished) | 250 / 300 |" in table
  assert "| - | 0.95 | sgd | 2 | 75.00 ± 5.00 | 300 (1/2 seeds) / 300 |" in table
  assert os.path.getsize(tmp_path / "accuracy.png") > 10_000


def test_curves_follow_the_longest_run_whatever_the_order(tmp_path):
  root = str(tmp_path)
  # The partial run sorts first: its short curve must not truncate the rest.
  _fake_run(root, "a_partial", "sgd", 0, [0.5, 0.6], finished=False)
  _fake_run(root, "b_full", "sgd", 1, [0.5, 0.6, 0.70])
  _fake_run(root, "c_full", "sgd", 2, [0.5, 0.7, 0.90])
  ((_, by_opt),) = plot.group_runs(plot.load_runs(root)).items()
  assert [r["name"] for r in by_opt["sgd"]][0] == "a_partial"
  steps, curves = plot.full_length_curves(by_opt["sgd"])
  np.testing.assert_array_equal(steps, [100, 200, 300])
  np.testing.assert_allclose(curves, [[0.5, 0.6, 0.7], [0.5, 0.7, 0.9]])


def test_tuned_differences_pair_each_optimizer_at_its_best_lr(tmp_path):
  root = str(tmp_path)
  finals = {"sgd": {0.05: [0.80, 0.82], 0.1: [0.78, 0.79], 0.2: [0.70, 0.71]},
            "sparseopt": {0.05: [0.75, 0.77], 0.1: [0.79, 0.83],
                          0.2: [0.60, 0.60]}}
  for opt, by_lr in finals.items():
    for lr, accs in by_lr.items():
      for seed, acc in enumerate(accs):
        _fake_run(root, f"{opt}_{lr}_{seed}", opt, seed, [0.5, acc],
                  learning_rate=lr)
  # Unfinished runs take no part, however good their last evaluation.
  _fake_run(root, "sparseopt_0.2_9", "sparseopt", 9, [0.5, 0.99],
            finished=False, learning_rate=0.2)
  (row,) = plot.tuned_differences(plot.load_runs(root))
  # SGD is best at 0.05 (the grid's low end), SparseOpt at 0.1.
  diffs = np.array([0.79 - 0.80, 0.83 - 0.82])
  assert (row["value"], row["baseline_value"], row["edge"]) == (0.1, 0.05, True)
  assert row["n"] == 2
  np.testing.assert_allclose(row["diffs"], diffs)
  assert row["mean"] == pytest.approx(diffs.mean(), abs=1e-12)
  assert row["sem"] == pytest.approx(diffs.std(ddof=1) / np.sqrt(2))
  table = plot.report(root)
  assert ("| - | 0.95 | sparseopt at 0.1 - sgd at 0.05 (edge of grid) | 2 | "
          "+0.00 ± 1.00 | -1.00, +1.00 |") in table


def test_tuned_differences_need_a_grid_for_both_optimizers(tmp_path):
  root = str(tmp_path)
  for seed in (0, 1):
    _fake_run(root, f"b{seed}", "sgd", seed, [0.5, 0.8])
    _fake_run(root, f"s{seed}", "sparseopt", seed, [0.5, 0.7])
  assert plot.tuned_differences(plot.load_runs(root)) == []
  # A grid for SparseOpt alone is no fair comparison either.
  _fake_run(root, "s0_lr", "sparseopt", 0, [0.5, 0.9], learning_rate=0.1)
  assert plot.tuned_differences(plot.load_runs(root)) == []


def test_paired_differences_pair_finished_runs_by_seed(tmp_path):
  root = str(tmp_path)
  for seed, (b, s) in enumerate([(0.70, 0.75), (0.80, 0.81), (0.60, 0.58)]):
    _fake_run(root, f"b{seed}", "sgd", seed, [0.5, b])
    _fake_run(root, f"s{seed}", "sparseopt", seed, [0.5, s])
  _fake_run(root, "b3", "sgd", 3, [0.5, 0.9])  # no partner: not paired
  _fake_run(root, "s4", "sparseopt", 4, [0.5, 0.9], finished=False)
  (row,) = plot.paired_differences(plot.group_runs(plot.load_runs(root)))
  diffs = np.array([0.05, 0.01, -0.02])
  assert row["n"] == 3
  assert row["mean"] == pytest.approx(diffs.mean())
  assert row["sem"] == pytest.approx(diffs.std(ddof=1) / np.sqrt(3))
  assert "| - | 0.95 | sparseopt - sgd | 3 | +1.33 ± 2.03 |" in plot.report(
      root)


def test_panels_follow_varying_fields(tmp_path):
  root = str(tmp_path)
  _fake_run(root, "a", "sgd", 0, [0.5], sparsity=0.9)
  _fake_run(root, "b", "sgd", 0, [0.5], sparsity=0.95)
  groups = plot.group_runs(plot.load_runs(root))
  assert sorted(groups) == [("", 0.9), ("", 0.95)]


def test_report_reads_several_roots_filters_and_counts_links_once(tmp_path):
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  _fake_run(a, "b0", "sgd", 0, [0.5, 0.70])
  _fake_run(a, "s0", "sparseopt", 0, [0.5, 0.74])
  _fake_run(a, "x0", "sgd", 0, [0.5, 0.10], sparsity=0.9)  # filtered out
  _fake_run(b, "b1", "sgd", 1, [0.5, 0.80])
  _fake_run(b, "s1", "sparseopt", 1, [0.5, 0.78])
  os.symlink(os.path.join(a, "b0"), os.path.join(b, "linked_b0"))
  where = sweep.parse_sets(["sparsity=0.95", "method=rigl"])
  runs = plot.load_all([a, b], where)
  assert sorted(r["name"] for r in runs) == ["b0", "b1", "s0", "s1"]
  assert plot.matches({"num_epochs": 3.0}, {"num_epochs": 3})
  assert not plot.matches({"sparsity": 0.9}, {"num_epochs": 3})
  table = plot.report([a, b], where=where)
  assert "| - | 0.95 | sgd | 2 | 75.00 ± 5.00 |" in table
  # Paired by seed across roots: (0.74 - 0.70, 0.78 - 0.80).
  assert "| - | 0.95 | sparseopt - sgd | 2 | +1.00 ± 3.00 |" in table
  assert os.path.getsize(os.path.join(a, "accuracy.png")) > 10_000
  with pytest.raises(FileNotFoundError, match="matching"):
    plot.report([a, b], where={"sparsity": 0.5})


def test_layer_curves_reduce_over_layers_and_skip_turning_keys():
  records = [{"step": 50, "a/kernel/max_scale": 1.5, "b/kernel/max_scale": 2.5,
              "turn/a/kernel/max_scale": 99.0, "a/kernel/s_std": 0.1,
              "b/kernel/s_std": 0.3},
             {"step": 100, "test_accuracy": 0.5},
             {"step": 150, "a/kernel/max_scale": 3.0, "b/kernel/max_scale": 1.0,
              "a/kernel/s_std": 0.2, "b/kernel/s_std": 0.2}]
  steps, top = plot.layer_curve({"records": records}, "max_scale", max)
  np.testing.assert_array_equal(steps, [50, 150])
  np.testing.assert_array_equal(top, [2.5, 3.0])
  np.testing.assert_allclose(
      plot.layer_curve({"records": records}, "s_std", np.mean)[1], [0.2, 0.2])
  steps, values = plot.on_common_steps(
      [(np.array([50, 100, 150]), [1, 2, 3]), (np.array([100, 150]), [4, 5])])
  np.testing.assert_array_equal(steps, [100, 150])
  np.testing.assert_array_equal(values, [[2, 3], [4, 5]])


def test_neuron_churn_sums_deaths_and_revivals_over_updates(tmp_path):
  root = str(tmp_path)
  for seed, opt in ((0, "sgd"), (1, "sgd"), (0, "sparseopt"),
                    (1, "sparseopt")):
    _fake_run(root, f"{opt}{seed}", opt, seed, [0.5, 0.6])
  _fake_run(root, "sgd2", "sgd", 2, [0.5], finished=False)  # Left out.
  # sgd seed 0: two layers, 3 dead at the start; update 1 kills 2 and
  # revives 1, update 2 revives 1: 3 dead at the end. sgd seed 1: 5 -> 9.
  logs = {"sgd0": [(50, {"a/kernel/dead": 2.0, "b/kernel/dead": 1.0}),
                   (150, {"jump/a/kernel/died": 2.0,
                          "jump/a/kernel/revived": 1.0,
                          "jump/b/kernel/died": 0.0,
                          "jump/b/kernel/revived": 0.0,
                          "a/kernel/dead": 3.0, "b/kernel/dead": 1.0}),
                   (250, {"jump/a/kernel/died": 0.0,
                          "jump/a/kernel/revived": 0.0,
                          "jump/b/kernel/died": 0.0,
                          "jump/b/kernel/revived": 1.0,
                          "a/kernel/dead": 3.0, "b/kernel/dead": 0.0})],
          "sgd2": [(50, {"a/kernel/dead": 50.0}),
                   (150, {"jump/a/kernel/died": 40.0, "a/kernel/dead": 90.0})],
          # Resumed across the change that added the counts: its first
          # update has jump keys but no died/revived. Left out.
          "sparseopt1": [(50, {"a/kernel/dead": 1.0}),
                         (150, {"jump/a/kernel/norm_jump": 0.1,
                                "a/kernel/dead": 4.0}),
                         (250, {"jump/a/kernel/norm_jump": 0.1,
                                "jump/a/kernel/died": 0.0,
                                "jump/a/kernel/revived": 1.0,
                                "a/kernel/dead": 3.0})],
          "sgd1": [(50, {"a/kernel/dead": 5.0}),
                   (150, {"jump/a/kernel/died": 4.0,
                          "jump/a/kernel/revived": 0.0,
                          "a/kernel/dead": 9.0})]}
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
  assert ("| - | 0.95 | sgd | 2 | 4.0 | 3.0 | 1.0 | 6.0 |"
          in plot.report(root))


def test_report_draws_skew_diagnostics_when_logged(tmp_path):
  root = str(tmp_path)
  for seed, opt in ((0, "sgd"), (0, "sparseopt")):
    _fake_run(root, f"{opt}{seed}", opt, seed, [0.5, 0.6])
  plot.report(root)
  assert not os.path.exists(tmp_path / "accuracy_skew.png")  # Not logged.
  with open(tmp_path / "sgd0" / "metrics.jsonl", "a") as f:
    for step in (100, 200):
      f.write(json.dumps({"step": step, "conv/kernel/max_scale": 2.0,
                          "conv/kernel/s_std": 0.1,
                          "conv/kernel/dead": 1.0}) + "\n")
  plot.report(root)
  assert plot.skew_path(str(tmp_path / "accuracy.png")) == str(
      tmp_path / "accuracy_skew.png")
  assert os.path.getsize(tmp_path / "accuracy_skew.png") > 10_000


def test_sweep_names_runs_by_their_overrides():
  runs = sweep.expand(sweep.SWEEPS["fmnist_convergence"])
  names = [name for name, _ in runs]
  assert len(names) == len(set(names)) == 2 * 2 * 3 * 2 * 3 + 2 * 2 * 3
  assert "num_epochs-3.0__method-rigl__sparsity-0.99__optimizer-sgd__seed-2" in names
  for name in sweep.SWEEPS:
    for _, overrides in sweep.expand(sweep.SWEEPS[name]):
      sweep.make_config(sweep.SWEEPS[name].config, overrides)  # All valid.


def test_sweep_select_filters_within_a_fixed_shard():
  conv = sweep.SWEEPS["fmnist_convergence"]
  everything = sweep.expand(conv)
  short = sweep.select(conv, where={"num_epochs": 3, "method": "rigl"})
  assert [n for n, _ in short] == [
      n for n, o in everything
      if o["num_epochs"] == 3.0 and o["method"] == "rigl"]
  assert len(short) == 4 * 2 * 3  # 90/95/97/99% x 2 optimizers x 3 seeds
  # A run's shard does not depend on the filter.
  shard1 = sweep.select(conv, shard=(1, 2))
  assert sweep.select(conv, shard=(1, 2), where={"num_epochs": 3.0}) == [
      (n, o) for n, o in shard1 if o["num_epochs"] == 3.0]
  assert {n for n, _ in shard1} == {n for n, _ in everything[1::2]}
  assert not sweep.select(conv, where={"num_epochs": 6.0})


def test_sweep_skips_finished_and_resumes(tmp_path, monkeypatch):
  data = fake_data.write_fashion_mnist(str(tmp_path / "data"), 64, 16)
  calls = []
  monkeypatch.setattr(sweep.train, "train_and_evaluate",
                      lambda config, workdir: calls.append(workdir))
  root = str(tmp_path / "runs")
  done = os.path.join(root, "method-rigl__sparsity-0.95__optimizer-sgd__seed-0")
  os.makedirs(done)
  open(os.path.join(done, "summary.json"), "w").close()
  finished = list(sweep.run_sweep("quickstart", root, extra={"data_dir": data}))
  assert len(finished) == 2
  assert calls == [os.path.join(
      root, "method-rigl__sparsity-0.95__optimizer-sparseopt__seed-0")]


def test_parse_sets():
  assert sweep.parse_sets(["a=1", "b=0.5", "c=x", "d=('h',)"]) == {
      "a": 1, "b": 0.5, "c": "x", "d": ("h",)}
  with pytest.raises(ValueError, match="field=value"):
    sweep.parse_sets(["oops"])


def test_grad_ratio_tiny():
  rng = np.random.default_rng(0)
  images = rng.normal(size=(128, 28, 28, 1)).astype(np.float32)
  labels = rng.integers(0, 10, 128)
  results = grad_ratio.measure(images, labels, sparsities=(0.9,), hidden=64,
                               num_seeds=1, num_batches=2, batch_size=64)
  r = results[0.9]
  # BN amplifies by about 1/sqrt(1 - 0.9) = 3.16; without BN no amplification.
  assert 2.5 < r["bn"] < 4.0
  assert 0.6 < r["no_bn"] < 1.5
  assert r["slope_bn"] > 0.5 and abs(r["slope_bn_sparseopt"]) < 0.5
  assert "| 0.9 | 3.16 |" in grad_ratio.markdown_table(results)


def test_colab_notebook_runs_on_mock_data(tmp_path, monkeypatch):
  with open(os.path.join(_REPO, "experiments", "colab.ipynb")) as f:
    cells = [c for c in json.load(f)["cells"] if c["cell_type"] == "code"]
  assert any("parameters" in c["metadata"].get("tags", []) for c in cells)
  parameters = (
      "NUM_EPOCHS = 1\nMETHOD = 'rigl'\nSPARSITY = 0.9\nSEED = 0\n"
      f"DATA_DIR = None\nWORKDIR = {str(tmp_path)!r}\nPREPARE_DATA = False\n"
      "OVERRIDES = {'num_train_steps': 2, 'batch_size': 8, "
      "'eval_batch_size': 8, 'update_every': 1, 'progress_bar': False,"
      # The MLP: the notebook's code path without a ResNet compile.
      "'model': 'fmnist_mlp'}\n")
  monkeypatch.setenv("MPLBACKEND", "Agg")
  namespace = {}
  with tfds.testing.mock_data(num_examples=16):
    for cell in cells:
      if "parameters" in cell["metadata"].get("tags", []):
        source = parameters
      else:  # Shell lines (pip) are the Colab's setup, not Python.
        source = "".join(l for l in cell["source"]
                         if not l.lstrip().startswith(("!", "%")))
      exec(compile(source, "colab.ipynb", "exec"), namespace)
  assert os.path.exists(tmp_path / "accuracy.png")
  assert sorted(os.listdir(tmp_path)) == ["accuracy.png", "accuracy_skew.png",
                                         "sgd", "sparseopt"]


def test_quickstart_main_writes_table_and_plots(tmp_path):
  data = fake_data.write_fashion_mnist(str(tmp_path / "data"), 64, 16)
  root = tmp_path / "quickstart"
  sets = [f"data_dir={data}", "num_train_steps=4", "eval_every=2",
          "checkpoint_every=2", "log_every=2", "batch_size=16",
          "eval_batch_size=16", "update_every=2", "model=fmnist_mlp",
          "progress_bar=False"]
  result = subprocess.run(
      [sys.executable, "-m", "experiments.quickstart", f"--root={root}"]
      + [f"--set={s}" for s in sets],
      cwd=_REPO, capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "| - | 0.95 | sparseopt - sgd | 1 |" in result.stdout
  for name in ("table.md", "accuracy.png", "accuracy_skew.png"):
    assert os.path.getsize(root / name) > 0, name


def test_markdown_table_layout_and_ragged_rows():
  assert markdown.table(["a", "b"], [[1, "x"], [2.5, None]]) == (
      "| a | b |\n|---|---|\n| 1 | x |\n| 2.5 | None |")
  assert markdown.table(["a"], []) == "| a |\n|---|"
  with pytest.raises(ValueError, match="row 1 has 1 cells, the header has 2"):
    markdown.table(["a", "b"], [[1, 2], [3]])
