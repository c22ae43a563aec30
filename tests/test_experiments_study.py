"""Tests of the studies (`experiments.studies`) and of the training pieces
they study: turning logs, fan-in init, the dense control.

The studies' tests work on small generated workdirs; a few train tiny runs
on generated Fashion-MNIST to check that what training logs is what the
studies read.
"""

import gzip
import json
import math
import os
import statistics
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import sparseopt_jax as sparseopt

from experiments import fake_data
from experiments import input_pipeline
from experiments import optimizers
from experiments import records
from experiments import sweep
from experiments import train
from experiments.studies import compact
from experiments.studies import markdown
from experiments.studies import plot
from experiments.studies import runs
from experiments.studies import study
import reference as ref
import workdirs

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def fmnist_dir(tmp_path_factory):
  return fake_data.write_fashion_mnist(
      str(tmp_path_factory.mktemp("fmnist")), num_train=96, num_test=40
  )


def _mlp(fmnist_dir, **overrides):
  base = dict(
      data_dir=fmnist_dir,
      batch_size=16,
      eval_batch_size=20,
      num_train_steps=9,
      log_every=3,
      eval_every=9,
      checkpoint_every=9,
      update_every=2,
      progress_bar=False,
      num_epochs=3.0,
      sparsity=0.9,
  )
  return sweep.make_config("fmnist_mlp", {**base, **overrides})


def _run(seed, optimizer="sgd", accuracy=(0.5,), finished=True, **config):
  """A `runs.Run` of the study's recipe, without a workdir."""
  config = {**study.BASE, "seed": seed, **config}
  if optimizer == "sparseopt":
    config.update(study.SPARSEOPT)
  steps = [100 * (i + 1) for i in range(len(accuracy))]
  logged = [{"step": s, "test_accuracy": a} for s, a in zip(steps, accuracy)]
  return runs.Run.from_log(
      config, logged, name=f"{optimizer}-{seed}", finished=finished
  )


# Analysis reads result files and never imports the training code.


def test_studies_import_no_training_code():
  code = (
      "import sys\n"
      "import experiments.studies.plot, experiments.studies.study\n"
      "import experiments.studies.compact, experiments.studies.bn_stats\n"
      "import experiments.studies.recalibration, experiments.studies.arms\n"
      "print('\\n'.join(sys.modules))\n"
  )
  loaded = subprocess.run(
      [sys.executable, "-c", code],
      cwd=_REPO,
      check=True,
      capture_output=True,
      text=True,
  ).stdout.split()
  assert "experiments.studies.runs" in loaded  # The check sees imports.
  forbidden = {
      "experiments.train",
      "experiments.sweep",
      "experiments.workdir",
      "experiments.optimizers",
      "experiments.input_pipeline",
      "sparseopt_jax",
      "jax",
      "flax",
      "orbax",
      "tensorflow",
  }
  # A module or any of its submodules.
  assert [m for m in loaded if forbidden & _parents(m)] == []


def _parents(module):
  parts = module.split(".")
  return {".".join(parts[:i]) for i in range(1, len(parts) + 1)}


# The Run record and its loader.


def test_load_run_reads_plain_and_compressed_logs_alike(tmp_path):
  logged = workdirs.curve_log([0.5, 0.7])
  config = {"seed": 3, "sparsity": 0.9, "optimizer": "sgd"}
  plain = runs.load_run(
      workdirs.write_workdir(str(tmp_path / "a"), "r", config, logged)
  )
  packed = runs.load_run(
      workdirs.write_workdir(
          str(tmp_path / "b"), "r", config, logged, compressed=True
      )
  )
  for run in (plain, packed):
    assert run.name == "r" and run.finished and run.seed == 3
    np.testing.assert_array_equal(run.steps, [100, 200])
    np.testing.assert_allclose(run.accuracy, [0.5, 0.7])
    assert run.final_accuracy == 0.7
    assert run.records == logged
    # Fields added since the run are filled in from the defaults.
    assert run.config["update_every"] == 100
  with pytest.raises(AttributeError):
    plain.finished = False  # Frozen: one record, read once.


def test_load_runs_skips_folders_without_a_log_or_an_evaluation(tmp_path):
  root = str(tmp_path)
  workdirs.fake_workdir(root, "b", "sgd", 0, [0.5], compressed=True)
  workdirs.fake_workdir(root, "a", "sgd", 1, [0.5], finished=False)
  workdirs.write_workdir(
      root, "no_eval", {"seed": 2}, [{"step": 1, "train_loss": 1}]
  )
  os.makedirs(tmp_path / "empty")
  loaded = runs.load_runs(root)
  assert [(r.name, r.finished) for r in loaded] == [("a", False), ("b", True)]
  assert loaded[1].workdir == os.path.join(root, "b")


def test_values_match_with_a_tolerance_on_numbers_only():
  assert runs.values_match(3, 3.0)
  assert runs.values_match(5e-05, 5e-5)
  assert runs.values_match(0.1 + 0.2, 0.3)  # A float round trip.
  assert runs.values_match(0.0, 0)
  assert not runs.values_match(0.97, 0.95)
  assert not runs.values_match(5e-4, 5e-4 * (1 + 1e-6))
  assert not runs.values_match(True, 1) and not runs.values_match(0, False)
  assert runs.values_match(True, True)
  assert runs.values_match([0.5, 0.75], (0.5, 0.75 + 1e-12))
  assert not runs.values_match([0.5], [0.5, 0.75])
  assert runs.values_match("rigl", "rigl") and not runs.values_match("1", 1)
  assert runs.values_match(None, None) and not runs.values_match(None, 0.0)
  assert runs.matches({"num_epochs": 3.0, "seed": 0}, {"num_epochs": 3})
  assert not runs.matches({"sparsity": 0.9}, {"num_epochs": 3})  # Missing.
  assert runs.matches({"a": 1}, {})


def test_both_studies_filter_configs_alike():
  config = {**study.BASE, "seed": 0, "weight_decay": 5e-05}
  where = records.parse_sets(["weight_decay=0.00005", "num_epochs=3"])
  assert where == {"weight_decay": 5e-5, "num_epochs": 3}
  assert plot.matches(config, where) and runs.matches(config, where)
  assert study.matches(config, {"weight_decay": 5e-5})
  assert not study.matches(config, {"weight_decay": 5e-4})
  assert records.parse_sets(["method=rigl", "dense_paths=('head',)"]) == {
      "method": "rigl",
      "dense_paths": ("head",),
  }
  with pytest.raises(ValueError, match="field=value"):
    records.parse_sets(["sparsity"])


# The one pairing by seed.


def test_pair_by_seed_pairs_finished_runs_in_seed_order():
  control = [_run(2), _run(0), _run(1), _run(3, finished=False)]
  treatment = [_run(s, "sparseopt") for s in (3, 1, 0, 5)]
  pairs = runs.pair_by_seed(control, treatment)
  # Seed 2 has no treatment, 5 no control, 3 an unfinished control.
  assert [(c.seed, t.seed) for c, t in pairs] == [(0, 0), (1, 1)]
  assert all(c.config["optimizer"] == "sgd" for c, _ in pairs)
  assert runs.pair_by_seed(control, []) == []


def test_pair_by_seed_refuses_a_seed_twice_in_one_arm():
  twice = [_run(0, accuracy=(0.5,)), _run(0, accuracy=(0.6,))]
  with pytest.raises(ValueError, match="Seed 0 twice"):
    runs.pair_by_seed(twice, [_run(0, "sparseopt")])
  # An unfinished duplicate is no candidate, so no ambiguity.
  twice[1] = _run(0, finished=False)
  assert len(runs.pair_by_seed(twice, [_run(0, "sparseopt")])) == 1


def test_a_single_pair_has_no_standard_error():
  one = runs.difference_stats(np.array([0.02]))
  assert one == {"n": 1, "mean": pytest.approx(0.02), "sem": None}
  assert runs.format_difference(one["mean"], one["sem"]) == "+2.00 ± n/a"
  two = runs.difference_stats(np.array([0.01, 0.03]))
  assert two["sem"] == pytest.approx(0.01)
  assert runs.format_difference(two["mean"], two["sem"]) == "+2.00 ± 1.00"
  assert runs.standard_error(np.zeros((1, 4))) is None
  np.testing.assert_allclose(
      runs.standard_error(np.array([[0.0, 1.0], [2.0, 1.0]])), [1.0, 0.0]
  )


def test_every_std_over_seeds_is_the_sample_std():
  # statistics.stdev (n - 1 in the denominator) is the reference.
  acc = [0.80, 0.83, 0.78]
  want = f"{100 * statistics.mean(acc):.2f} ± {100 * statistics.stdev(acc):.2f}"
  assert runs.format_mean_std(np.array(acc)) == want == "80.33 ± 2.52"
  assert runs.format_mean_std(np.array([0.8])) == "80.00"
  assert runs.format_mean_std(np.array([])) == "n/a"
  assert runs.sample_std(np.array([0.8])) is None
  curves = np.array([[0.1, 0.5], [0.3, 0.5], [0.2, 0.8]])
  np.testing.assert_allclose(
      runs.sample_std(curves),
      [statistics.stdev(curves[:, 0]), statistics.stdev(curves[:, 1])],
  )
  rows = plot.summarize(
      {("", 0.9): {"sgd": [_run(s, "sgd", (a,)) for s, a in enumerate(acc)]}}
  )
  assert want in plot.markdown_table(rows)


def test_plot_and_study_agree_on_the_same_pairs(tmp_path):
  # Seeds 0-2 of each arm finished, seed 3 of SparseOpt unfinished, seed 4
  # of SGD without a partner: both modules pair seeds 0-2 alike.
  accuracies = {
      "sgd": [0.70, 0.80, 0.60, None, 0.9],
      "sparseopt": [0.75, 0.81, 0.58, 0.99, None],
  }
  loaded = []
  for optimizer, accs in accuracies.items():
    for seed, acc in enumerate(accs):
      if acc is not None:
        loaded.append(
            _run(seed, optimizer, (0.5, acc), finished=(seed, acc) != (3, 0.99))
        )
  (plotted,) = plot.paired_differences(plot.group_runs(loaded))
  studied = study.paired(loaded, study.comparisons()[0])
  diffs = np.array([0.05, 0.01, -0.02])
  assert plotted["n"] == studied["n"] == 3
  assert plotted["mean"] == pytest.approx(diffs.mean())
  assert studied["diff"] == pytest.approx(diffs.mean())
  assert plotted["sem"] == pytest.approx(studied["sem"])
  assert studied["sem"] == pytest.approx(diffs.std(ddof=1) / math.sqrt(3))
  np.testing.assert_allclose(studied["control"], [0.70, 0.80, 0.60])


def test_one_seed_renders_n_a_in_both_reports(tmp_path):
  loaded = [_run(0, "sgd", (0.5, 0.7)), _run(0, "sparseopt", (0.5, 0.74))]
  (plotted,) = plot.paired_differences(plot.group_runs(loaded))
  studied = study.paired(loaded, study.comparisons()[0])
  assert plotted["sem"] is None and studied["sem"] is None
  assert "| +4.00 ± n/a |" in plot.paired_table([plotted])
  assert "| +4.00 ± n/a |" in study.paired_markdown([studied])
  path = str(tmp_path / "paired.png")
  study.plot_paired([studied], path)  # Drawn without an error bar.
  assert os.path.getsize(path) > 10_000


# The mask-update steps come from the log.


def test_mask_update_steps_are_read_from_the_log():
  logged = [
      {"step": 50, "train_loss": 1.0},
      {"step": 100, "train_loss": 1.0, "mask_update_steps": [51, 76]},
      {"step": 150, "train_loss": 1.0, "jump/a/kernel/norm_jump": 0.1},
      {"step": 200, "train_loss": 1.0, "mask_update_steps": [151]},
  ]
  # Where the log lists them, the list is the whole truth.
  assert runs.Run.from_log({}, logged).mask_update_steps() == [51, 76, 151]
  assert runs.is_mask_update_record(logged[1])
  assert runs.is_mask_update_record(logged[2])
  assert not runs.is_mask_update_record(logged[0])


def test_mask_update_steps_of_older_logs_start_their_windows():
  # No mask_update_steps: a record with jump/ keys had an update in its
  # window, placed at the window's first step; an eval-only record (step
  # 120) closes no window.
  jump = {"jump/a/kernel/norm_jump": 0.1}
  logged = [
      {"step": 50, "train_loss": 1.0},
      {"step": 100, "train_loss": 1.0},
      {"step": 120, "test_accuracy": 0.5},
      {"step": 150, "train_loss": 1.0, **jump},
      {"step": 200, "train_loss": 1.0},
      {"step": 250, "train_loss": 1.0, **jump},
  ]
  assert runs.Run.from_log({}, logged).mask_update_steps() == [101, 201]
  # No jump/ keys (turning diagnostics off): no steps, rather than a guess.
  assert runs.Run.from_log({}, logged[:3]).mask_update_steps() == []


def test_committed_logs_give_the_configured_schedule():
  # Every committed RigL run of the study logged its updates; the log gives
  # the schedule the config implies (one step past each multiple of
  # update_every before end_fraction of training).
  root = os.path.join(_REPO, "experiments", "results", "fmnist_when")
  name = "optimizer-sgd__seed-0"
  if not os.path.isdir(os.path.join(root, name)):
    pytest.skip("committed results not in this checkout")
  run = runs.load_run(os.path.join(root, name))
  total = int(run.steps[-1])
  every = run.config["update_every"]
  end = int(run.config["end_fraction"] * total)
  assert run.mask_update_steps() == [t + 1 for t in range(every, end, every)]


# Compressed results.


def test_compact_gzips_finished_logs_deterministically(tmp_path):
  root = str(tmp_path / "results")
  done = workdirs.fake_workdir(root, "done", "sgd", 0, [0.5, 0.7])
  running = workdirs.fake_workdir(
      root, "running", "sgd", 1, [0.5], finished=False
  )
  with open(os.path.join(done, records.METRICS), "rb") as f:
    original = f.read()
  before = [(r.name, r.records) for r in runs.load_runs(root)]
  compressed, unfinished = compact.compact([root])
  assert (compressed, unfinished) == ([done], [running])
  assert sorted(os.listdir(done)) == [
      records.CONFIG,
      records.METRICS_GZ,
      records.SUMMARY,
  ]
  assert os.path.exists(os.path.join(running, records.METRICS))
  with open(os.path.join(done, records.METRICS_GZ), "rb") as f:
    packed = f.read()
  assert gzip.decompress(packed) == original
  # Same bytes from the same log, whenever it is compressed.
  assert packed == gzip.compress(original, compresslevel=9, mtime=0)
  assert [(r.name, r.records) for r in runs.load_runs(root)] == before
  assert compact.compact([root]) == ([], [running])  # Nothing left to do.
  assert compact.main(["compact", root]) == 0
  assert compact.main(["compact"]) == 2


def test_no_plain_metrics_log_is_committed():
  results = os.path.join(_REPO, "experiments", "results")
  plain = [
      folder
      for folder, _, files in os.walk(results)
      if records.METRICS in files and records.is_finished(folder)
  ]
  assert plain == [], "run python -m experiments.studies.compact"


# The plot module on Run records.


def test_table_and_plot(tmp_path):
  root = str(tmp_path)
  workdirs.fake_workdir(root, "b0", "sgd", 0, [0.5, 0.6, 0.70])
  workdirs.fake_workdir(root, "b1", "sgd", 1, [0.5, 0.6, 0.80], compressed=True)
  workdirs.fake_workdir(root, "s0", "sparseopt", 0, [0.6, 0.76, 0.80])
  workdirs.fake_workdir(
      root, "s1", "sparseopt", 1, [0.7, 0.74, 0.78], finished=False
  )
  rows = {
      r["optimizer"]: r
      for r in plot.summarize(plot.group_runs(plot.load_runs(root)))
  }
  assert rows["sgd"]["final_mean"] == pytest.approx(0.75)
  assert rows["sparseopt"]["steps_to_baseline"] == pytest.approx(250)
  assert not rows["sparseopt"]["finished"]
  table = plot.report(root)
  assert (
      "| - | 0.95 | sparseopt | 2 | 79.00 ± 1.41 (unfinished) | 250 / 300 |"
      in table
  )
  # Seed 1 of SparseOpt is unfinished: one pair, no standard error.
  assert "| - | 0.95 | sparseopt - sgd | 1 | +10.00 ± n/a |" in table
  assert os.path.getsize(tmp_path / "accuracy.png") > 10_000


def test_curves_follow_the_longest_run_whatever_the_order(tmp_path):
  root = str(tmp_path)
  workdirs.fake_workdir(root, "a_partial", "sgd", 0, [0.5, 0.6], finished=False)
  workdirs.fake_workdir(root, "b_full", "sgd", 1, [0.5, 0.6, 0.70])
  workdirs.fake_workdir(root, "c_full", "sgd", 2, [0.5, 0.7, 0.90])
  ((_, by_opt),) = plot.group_runs(plot.load_runs(root)).items()
  assert by_opt["sgd"][0].name == "a_partial"
  steps, curves = plot.full_length_curves(by_opt["sgd"])
  np.testing.assert_array_equal(steps, [100, 200, 300])
  np.testing.assert_allclose(curves, [[0.5, 0.6, 0.7], [0.5, 0.7, 0.9]])


def test_tuned_differences_pair_each_optimizer_at_its_best_lr(tmp_path):
  root = str(tmp_path)
  finals = {
      "sgd": {0.05: [0.80, 0.82], 0.1: [0.78, 0.79], 0.2: [0.70, 0.71]},
      "sparseopt": {0.05: [0.75, 0.77], 0.1: [0.79, 0.83], 0.2: [0.6, 0.6]},
  }
  for opt, by_lr in finals.items():
    for lr, accs in by_lr.items():
      for seed, acc in enumerate(accs):
        workdirs.fake_workdir(
            root, f"{opt}_{lr}_{seed}", opt, seed, [0.5, acc], learning_rate=lr
        )
  (row,) = plot.tuned_differences(plot.load_runs(root))
  diffs = np.array([0.79 - 0.80, 0.83 - 0.82])
  assert (row["value"], row["baseline_value"], row["edge"]) == (0.1, 0.05, True)
  np.testing.assert_allclose(row["diffs"], diffs)
  assert row["sem"] == pytest.approx(diffs.std(ddof=1) / np.sqrt(2))
  assert (
      "| - | 0.95 | sparseopt at 0.1 - sgd at 0.05 (edge of grid) | 2 | "
      "+0.00 ± 1.00 | -1.00, +1.00 |"
  ) in plot.report(root)


def test_report_reads_several_roots_filters_and_counts_links_once(tmp_path):
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  workdirs.fake_workdir(a, "b0", "sgd", 0, [0.5, 0.70])
  workdirs.fake_workdir(a, "s0", "sparseopt", 0, [0.5, 0.74], compressed=True)
  workdirs.fake_workdir(
      a, "x0", "sgd", 0, [0.5, 0.10], sparsity=0.9
  )  # filtered out
  workdirs.fake_workdir(b, "b1", "sgd", 1, [0.5, 0.80])
  workdirs.fake_workdir(b, "s1", "sparseopt", 1, [0.5, 0.78])
  os.symlink(os.path.join(a, "b0"), os.path.join(b, "linked_b0"))
  where = records.parse_sets(["sparsity=0.95", "method=rigl"])
  loaded = plot.load_all([a, b], where)
  assert sorted(r.name for r in loaded) == ["b0", "b1", "s0", "s1"]
  table = plot.report([a, b], where=where)
  assert "| - | 0.95 | sgd | 2 | 75.00 ± 7.07 |" in table
  assert "| - | 0.95 | sparseopt - sgd | 2 | +1.00 ± 3.00 |" in table
  with pytest.raises(FileNotFoundError, match="matching"):
    plot.report([a, b], where={"sparsity": 0.5})


def test_layer_curves_reduce_over_layers_and_skip_turning_keys():
  logged = [
      {
          "step": 50,
          "a/kernel/max_scale": 1.5,
          "b/kernel/max_scale": 2.5,
          "turn/a/kernel/max_scale": 99.0,
          "mask_update_steps": [41],
      },
      {"step": 100, "test_accuracy": 0.5},
      {"step": 150, "a/kernel/max_scale": 3.0, "b/kernel/max_scale": 1.0},
  ]
  run = runs.Run.from_log({}, logged)
  steps, top = plot.layer_curve(run, "max_scale", max)
  np.testing.assert_array_equal(steps, [50, 150])
  np.testing.assert_array_equal(top, [2.5, 3.0])
  steps, values = plot.on_common_steps(
      [(np.array([50, 100, 150]), [1, 2, 3]), (np.array([100, 150]), [4, 5])]
  )
  np.testing.assert_array_equal(steps, [100, 150])
  np.testing.assert_array_equal(values, [[2, 3], [4, 5]])


def test_neuron_churn_needs_died_counts_at_every_update():
  def churn_run(seed, logged):
    return runs.Run.from_log(
        {"sparsity": 0.95, "optimizer": "sgd", "seed": seed},
        [{"step": 10, "test_accuracy": 0.5}, *logged],
    )

  full = churn_run(
      0,
      [
          {"step": 50, "a/kernel/dead": 3.0},
          {"step": 150, "jump/a/kernel/died": 2.0, "a/kernel/dead": 5.0},
      ],
  )
  # An update listed by mask_update_steps without died counts.
  partial = churn_run(
      1,
      [
          {"step": 50, "a/kernel/dead": 1.0, "mask_update_steps": [41]},
          {"step": 150, "jump/a/kernel/died": 2.0, "a/kernel/dead": 3.0},
      ],
  )
  (row,) = plot.neuron_churn(plot.group_runs([full, partial]))
  assert row["seeds"] == 1 and row["died"] == 2.0 and row["dead_end"] == 5.0


def test_markdown_table_checks_row_lengths():
  assert (
      markdown.table(["a", "b"], [[1, 2]]) == "| a | b |\n|---|---|\n| 1 | 2 |"
  )
  with pytest.raises(ValueError, match="row 0 has 1 cells"):
    markdown.table(["a", "b"], [[1]])


# The study module on Run records.


def test_study_matches_only_the_named_recipe():
  config = {**study.BASE, "seed": 0}
  assert study.matches(config, {})
  assert not study.matches(config, {"weight_decay": 0.0})
  assert study.matches(
      {**config, "weight_decay": 5e-05}, {"weight_decay": 5e-5}
  )
  dense = {**config, "method": "dense", "sparsity": 0.5}
  assert study.matches(dense, {"method": "dense"})  # Sparsity is moot.
  assert not study.matches(dense, {})


def test_fan_in_fractions_merge_bins_and_leave_out_the_head():
  record = {
      "a/kernel/fan_in/0": 1.0,
      "a/kernel/fan_in/1": 2.0,
      "a/kernel/fan_in/2-3": 3.0,
      "a/kernel/fan_in/4-7": 0.0,
      "a/kernel/fan_in/8-15": 2.0,
      "b/kernel/fan_in/16-31": 2.0,
      "head/kernel/fan_in/1": 100.0,
      "itop": 0.5,
  }
  np.testing.assert_allclose(
      study.fan_in_fractions(record), np.array([1, 2, 3, 0, 4]) / 10
  )
  assert study.fan_in_fractions({"itop": 0.5}) is None


def test_dense_control_plot(tmp_path):
  rows = [
      {"comparison": c, "diff": -0.01 * i, "sem": 0.002, "n": 3}
      for i, c in enumerate(
          c for c in study.comparisons() if c.section == "dense control"
      )
  ]
  rows[0]["sem"] = None  # A single seed: no error bar.
  assert sorted(r["comparison"].treatment["grad_scale"] for r in rows) == (
      pytest.approx([1 / 3, 0.5, 2.0, 3.0])
  )
  path = str(tmp_path / "dense_control.png")
  study.plot_dense_control(rows, path)
  assert os.path.getsize(path) > 10_000


def test_paired_curve_aligns_eval_steps_and_pairs_by_seed(tmp_path):
  rng = np.random.default_rng(0)
  steps = [100, 200, 300]
  acc = {
      (o, s): rng.uniform(0.5, 0.9, 3)
      for o in ("sgd", "sparseopt")
      for s in range(3)
  }
  loaded = [_run(s, o, acc[o, s], num_epochs=12.0) for (o, s) in acc]
  # An extra eval step in one run, and a seed with only one arm: ignored.
  extra = loaded[0]
  loaded[0] = runs.Run.from_log(
      extra.config,
      [{"step": 50, "test_accuracy": 0.1}, *extra.records],
  )
  loaded.append(_run(7, "sgd", [0.1, 0.2, 0.3], num_epochs=12.0))
  long = {"num_epochs": 12.0}
  x, diff, sem, n = study.paired_curve(
      loaded, long, {**long, **study.SPARSEOPT}
  )
  d = np.array([acc["sparseopt", s] - acc["sgd", s] for s in range(3)])
  assert n == 3
  np.testing.assert_allclose(x, np.array(steps) / 300)
  np.testing.assert_allclose(diff, d.mean(0))
  np.testing.assert_allclose(sem, d.std(0, ddof=1) / math.sqrt(3))
  three = {"num_epochs": 3.0}
  assert study.paired_curve(loaded, three, {**three, **study.SPARSEOPT}) is None
  path = str(tmp_path / "budget.png")
  assert study.plot_budget(loaded, path)
  assert os.path.getsize(path) > 10_000
  assert not study.plot_budget([], str(tmp_path / "none.png"))
  # One seed: the mean gap without a band.
  one = [r for r in loaded if r.seed == 0]
  assert study.paired_curve(one, long, {**long, **study.SPARSEOPT})[2] is None
  assert study.plot_budget(one, str(tmp_path / "one.png"))


def test_topology_curves_sum_dead_over_layers_and_plot(tmp_path):
  logged = [
      {
          "step": 10,
          "a/kernel/dead": 1.0,
          "b/kernel/dead": 2.0,
          "turn/a/kernel/dead": 50.0,
          "itop": 0.1,
      },
      {"step": 15, "test_accuracy": 0.5},
      {"step": 20, "a/kernel/dead": 0.0, "b/kernel/dead": 4.0, "itop": 0.2},
  ]
  run = runs.Run.from_log({}, logged)
  steps, dead = study.topology_curve(run, "dead")
  np.testing.assert_array_equal(steps, [10, 20])
  np.testing.assert_array_equal(dead, [3.0, 4.0])
  np.testing.assert_array_equal(
      study.topology_curve(run, "itop")[1], [0.1, 0.2]
  )
  loaded = [
      runs.Run.from_log(
          {**study.BASE, **o, "seed": s, "num_epochs": 12.0}, logged
      )
      for s in (0, 1)
      for o in ({}, study.SPARSEOPT)
  ]
  path = str(tmp_path / "topology.png")
  assert study.plot_topology(loaded, path)
  assert os.path.getsize(path) > 10_000
  assert not study.plot_topology([], str(tmp_path / "none.png"))


def test_plot_fan_in_draws_only_when_histograms_were_logged(tmp_path):
  def arms(record):
    return [
        runs.Run.from_log(
            {**study.BASE, **o, "seed": s},
            [{"step": 20, "test_accuracy": 0.5, **record}],
        )
        for s in (0, 1)
        for o in ({}, study.SPARSEOPT)
    ]

  loaded = arms({"conv/kernel/fan_in/0": 3.0, "conv/kernel/fan_in/4-7": 5.0})
  np.testing.assert_allclose(
      study.final_fan_in(loaded, study.SPARSEOPT), [3 / 8, 0, 0, 5 / 8, 0]
  )
  path = str(tmp_path / "fan_in.png")
  assert study.plot_fan_in(loaded, path)
  assert os.path.getsize(path) > 10_000
  loaded = arms({"itop": 0.5})  # Predates the histograms.
  assert not study.plot_fan_in(loaded, str(tmp_path / "none.png"))
  assert not os.path.exists(tmp_path / "none.png")


def test_turning_plot_marks_the_logged_updates(tmp_path, monkeypatch):
  logged = [
      {
          "step": 50,
          "train_loss": 1.0,
          "turn/a/kernel/imbalance": -0.1,
          "turn/a/kernel/angle_mean": 0.01,
      },
      {
          "step": 100,
          "train_loss": 1.0,
          "turn/a/kernel/imbalance": -0.2,
          "turn/a/kernel/angle_mean": 0.01,
          "mask_update_steps": [61],
          "test_accuracy": 0.5,
      },
  ]
  loaded = [
      runs.Run.from_log({**study.BASE, **o, "seed": s}, logged)
      for s in (0, 1)
      for o in ({}, study.SPARSEOPT)
  ]
  marked = []
  import matplotlib.axes  # pylint: disable=g-import-not-at-top

  axvline = matplotlib.axes.Axes.axvline
  monkeypatch.setattr(
      matplotlib.axes.Axes,
      "axvline",
      lambda self, x, **kw: marked.append(x) or axvline(self, x, **kw),
  )
  study.plot_turning(loaded, str(tmp_path / "turning.png"))
  assert set(marked) == {61}  # Read from the log, not from the config.


# Training logs what the studies read.


def test_turning_and_jump_metrics_are_logged(tmp_path, fmnist_dir):
  # 9 steps, end 0.75 * 9 -> 6: mask updates at counts 2 and 4 (steps 3, 5).
  train.train_and_evaluate(_mlp(fmnist_dir), str(tmp_path))
  logged = {r["step"]: r for r in records.read_metrics(str(tmp_path))}
  assert sorted(logged) == [3, 6, 9]
  for r in logged.values():
    for layer in ("hidden/kernel",):  # The head is dense under ERK at 90%.
      angle = r[f"turn/{layer}/angle_mean"]
      assert np.isfinite(angle) and angle > 0  # Logged on its own step.
      assert np.isfinite(r[f"turn/{layer}/imbalance"])
      assert r[f"turn/{layer}/norm_mean"] > 0
    assert "mask_update" not in r
  # The window ending at step 3 holds the update at step 3, the one ending
  # at 6 the update at step 5; the last window holds none.
  for step in (3, 6):
    assert logged[step]["jump/hidden/kernel/factor_jump"] >= 0
    assert logged[step]["jump/hidden/kernel/norm_jump"] >= 0
    assert "update_turn/hidden/kernel/angle_mean" in logged[step]
  assert "jump/hidden/kernel/factor_jump" not in logged[9]
  # The studies read the same schedule back from the log.
  assert runs.load_run(str(tmp_path)).mask_update_steps() == [3, 5]


def test_turning_logs_do_not_change_training(tmp_path, fmnist_dir):
  on = train.train_and_evaluate(_mlp(fmnist_dir), str(tmp_path / "on"))
  off = train.train_and_evaluate(
      _mlp(fmnist_dir, turning_diagnostics=False), str(tmp_path / "off")
  )
  assert on["final_test_loss"] == off["final_test_loss"]
  logged_off = records.read_metrics(str(tmp_path / "off"))
  assert not any(k.startswith("turn/") for r in logged_off for k in r)


def test_study_report_pairs_trained_runs_by_seed(tmp_path, fmnist_dir):
  root = str(tmp_path / "runs")
  finals = {}
  for optimizer in ("sgd", "sparseopt"):
    for seed in (0, 1):
      workdir = os.path.join(root, f"{optimizer}-{seed}")
      summary = train.train_and_evaluate(
          _mlp(
              fmnist_dir,
              method="rigl",
              sparsity=0.97,
              optimizer=optimizer,
              seed=seed,
          ),
          workdir,
      )
      finals[optimizer, seed] = summary["final_test_accuracy"]
  out = str(tmp_path / "out")
  os.makedirs(out)
  text = study.report([root], out)
  row = study.paired(runs.load_runs(root), study.comparisons()[0])
  diffs = [finals["sparseopt", s] - finals["sgd", s] for s in (0, 1)]
  assert row["n"] == 2
  assert row["diff"] == pytest.approx(np.mean(diffs))
  assert row["sem"] == pytest.approx(np.std(diffs, ddof=1) / math.sqrt(2))
  assert "| correction | fan_in (paper) vs none | 2 |" in text
  assert "| 97%, masked dense init | none (SGD) |" in text
  # The histogram rows sum the hidden layer's neurons (the head is left out).
  assert "| 97%, 3 epochs | none (SGD) | 2 |" in text
  for png in ("paired.png", "turning.png", "fan_in.png"):
    assert os.path.getsize(os.path.join(out, png)) > 10_000
  # Compressed as committed, the runs give the same report.
  assert len(compact.compact([root])[0]) == 4
  assert study.report([root], out) == text


def _init_state(fmnist_dir, **overrides):
  config = _mlp(fmnist_dir, **overrides)
  spec = input_pipeline.load_dataset(config.dataset, fmnist_dir).spec
  model = train.create_model(config, spec)
  state, _, _ = train.create_train_state(config, model, spec, 9, 6.0)
  return state


def test_fan_in_init_redraws_with_the_same_masks(fmnist_dir):
  dense = _init_state(fmnist_dir)
  fan_in = _init_state(fmnist_dir, init="fan_in")
  masks = sparseopt.get_masks(dense.opt_state)
  # Same masks (paired runs differ only in the init).
  jax.tree.map(
      np.testing.assert_array_equal,
      masks,
      sparseopt.get_masks(fan_in.opt_state),
  )
  w = np.asarray(fan_in.params["hidden"]["kernel"])
  m = np.asarray(masks["hidden"]["kernel"])
  assert np.all(w[~m] == 0) and np.all(w[m] != 0)
  # Variance 2 / active fan-in: the neuron norms no longer follow sqrt(1-s_i)
  # (masked dense init) but average 2 whatever the density.
  norms_sq = (w * w).sum(0)
  assert norms_sq.mean() == pytest.approx(2.0, rel=0.1)
  fan = m.sum(0)
  dense_sq = (np.asarray(dense.params["hidden"]["kernel"]) ** 2).sum(0)
  assert np.corrcoef(fan, dense_sq)[0, 1] > 0.3
  assert abs(np.corrcoef(fan, norms_sq)[0, 1]) < 0.3
  np.testing.assert_array_equal(
      dense.params["hidden"]["kernel"] != 0,
      fan_in.params["hidden"]["kernel"] != 0,
  )
  np.testing.assert_array_equal(
      dense.params["head"]["bias"], fan_in.params["head"]["bias"]
  )


def test_fan_in_init_needs_a_sparse_method(tmp_path, fmnist_dir):
  with pytest.raises(ValueError, match="init='fan_in'.*sparse method"):
    train.train_and_evaluate(
        _mlp(fmnist_dir, method="dense", init="fan_in"), str(tmp_path)
    )


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("init", "orthogonal", "init='orthogonal'"),
        ("grad_scale", 0.0, "grad_scale=0.0"),
        ("grad_scale_fraction", 1.5, "grad_scale_fraction=1.5"),
    ],
)
def test_bad_study_fields_are_named(
    tmp_path, fmnist_dir, field, value, message
):
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(_mlp(fmnist_dir, **{field: value}), str(tmp_path))


def test_dense_control_scales_a_fixed_half_of_the_neurons():
  params = {
      "conv": {"kernel": jnp.ones((3, 3, 2, 10))},
      "bn": {"scale": jnp.ones(10)},
      "head": {"kernel": jnp.ones((10, 4)), "bias": jnp.ones(4)},
  }
  scales = optimizers.neuron_gradient_scales(
      jax.random.key(0), params, 3.0, 0.5
  )
  c = np.asarray(scales["conv"]["kernel"])
  assert sorted(c.tolist()) == [1.0] * 5 + [3.0] * 5
  assert scales["head"]["kernel"] is None and scales["bn"]["scale"] is None
  grads = jax.tree.map(
      lambda p: jax.random.normal(jax.random.key(1), p.shape), params
  )
  tx = optimizers.scale_neuron_gradients(scales)
  out, _ = jax.jit(tx.update)(grads, tx.init(params))
  np.testing.assert_allclose(
      out["conv"]["kernel"], np.asarray(grads["conv"]["kernel"]) * c, rtol=1e-6
  )
  np.testing.assert_array_equal(out["head"]["kernel"], grads["head"]["kernel"])
  np.testing.assert_array_equal(out["bn"]["scale"], grads["bn"]["scale"])


def test_dense_control_sits_before_weight_decay(fmnist_dir):
  config = _mlp(
      fmnist_dir,
      method="dense",
      optimizer="sgd",
      grad_scale=2.0,
      weight_decay=0.1,
      momentum=0.0,
  )
  params = {
      "hidden": {"kernel": jnp.ones((4, 6))},
      "head": {"kernel": jnp.ones((6, 3)), "bias": jnp.zeros(3)},
  }
  tx = optimizers.create_optimizer(
      config, optax.constant_schedule(1.0), None, 9, jax.random.key(0), params
  )
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  # -(k * g + wd * w): scaled neurons -2.1, the others -1.1; head unscaled.
  hidden = np.asarray(updates["hidden"]["kernel"])
  assert sorted(np.unique(hidden).tolist()) == pytest.approx([-2.1, -1.1])
  assert (hidden[0] == -2.1).sum() == 3
  np.testing.assert_allclose(updates["head"]["kernel"], -1.1)


def test_renormalize_and_ham_compose_as_documented(fmnist_dir):
  # renormalize: the loss gradient at unit norm (global) before weight
  # decay; ham: the multiplicative step on kernels after SGD's, with the
  # gradient it receives in its exponent (NumPy reference).
  params = {
      "hidden": {"kernel": jnp.array([[1.0, -2.0], [0.5, 0.0]])},
      "head": {"kernel": jnp.array([[1.0], [-1.0]]), "bias": jnp.ones(1)},
  }
  grads = {
      "hidden": {"kernel": jnp.array([[3.0, 0.0], [0.0, -4.0]])},
      "head": {"kernel": jnp.zeros((2, 1)), "bias": jnp.zeros(1)},
  }
  common = dict(method="dense", optimizer="sgd", momentum=0.0)
  lr = 0.01

  def updates_of(**fields):
    config = _mlp(fmnist_dir, **common, **fields)
    tx = optimizers.create_optimizer(
        config, optax.constant_schedule(lr), None, 9, jax.random.key(0), params
    )
    return tx.update(grads, tx.init(params), params)[0]

  renorm = updates_of(renormalize="global", weight_decay=0.1)
  want = -lr * (
      np.array([[3.0, 0.0], [0.0, -4.0]]) / 5.0
      + 0.1 * np.array([[1.0, -2.0], [0.5, 0.0]])
  )
  np.testing.assert_allclose(renorm["hidden"]["kernel"], want, rtol=1e-5)

  ham = updates_of(ham=True, weight_decay=0.0, ham_alpha=200.0, ham_beta=1e-3)
  for name in ("hidden", "head"):
    w = np.asarray(params[name]["kernel"], np.float64)
    g = np.asarray(grads[name]["kernel"], np.float64)
    h = w - lr * g
    e = np.clip(-lr * (200.0 * np.sign(h) * g + 1e-3), -5.0, 5.0)
    want = np.where(h != 0, h * np.exp(e), 0.0) - w
    # w' - w in float32 loses what w's own rounding carries (|w| <= 2).
    np.testing.assert_allclose(ham[name]["kernel"], want, rtol=1e-5, atol=5e-7)
  # The bias is not a kernel: plain SGD.
  np.testing.assert_allclose(ham["head"]["bias"], 0.0)


def test_factors_on_the_live_masks_of_a_run_match_numpy(fmnist_dir):
  # The check behind the negative results: after real mask updates, the
  # factors SparseOpt applies equal the NumPy reference on the live masks.
  config = _mlp(
      fmnist_dir,
      method="rigl",
      sparsity=0.97,
      update_every=1,
      drop_fraction=0.5,
  )
  spec = input_pipeline.load_dataset(config.dataset, fmnist_dir).spec
  model = train.create_model(config, spec)
  state, tx, _ = train.create_train_state(config, model, spec, 9, 6.0)
  batches = input_pipeline.train_batches(
      input_pipeline.load_dataset(config.dataset, fmnist_dir),
      global_batch_size=16,
      seed=0,
  )
  step = jax.jit(
      lambda s, b: train.train_step(
          s, b, model=model, tx=tx, config=config, spec=spec, total_steps=9
      )
  )
  masks0 = sparseopt.get_masks(state.opt_state)
  for _ in range(5):
    given = sparseopt.get_masks(state.opt_state)
    state, _ = step(state, next(batches))
  masks = sparseopt.get_masks(state.opt_state)
  m0, m = (np.asarray(x["hidden"]["kernel"]) for x in (masks0, masks))
  assert (m0 != m).any()  # The topology did change.
  got = sparseopt.diagnostics.sparseopt_scales(masks)
  # What SparseOpt applies: the factor on a gradient of ones.
  ones = jax.tree.map(jnp.ones_like, state.params)
  applied, _ = jax.jit(
      lambda g, p, m: sparseopt.scale_by_sparseopt().update(g, None, p, masks=m)
  )(ones, state.params, masks)
  # What the train step applied: the factors cached in its state, which
  # follow the masks SparseOpt was given (those before the step's mask
  # update; the next step recounts them, told by masks_updated).
  cached = optax.tree_utils.tree_get(state.opt_state, "scales")
  for layer in ("hidden", "head"):
    want = ref.sparseopt_factor(np.asarray(masks[layer]["kernel"]))
    np.testing.assert_allclose(got[layer]["kernel"], want, rtol=1e-6)
    np.testing.assert_allclose(
        cached[layer]["kernel"],
        ref.sparseopt_factor(np.asarray(given[layer]["kernel"])),
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        applied[layer]["kernel"],
        np.broadcast_to(want, masks[layer]["kernel"].shape),
        rtol=1e-6,
    )


def test_a_diverged_run_is_not_finished_and_never_pairs(tmp_path):
  root = str(tmp_path)
  workdirs.fake_workdir(root, "sgd", "sgd", 0, [0.5, 0.7])
  workdirs.fake_workdir(root, "so", "sparseopt", 0, [0.5, 0.6])
  with open(os.path.join(root, "so", records.SUMMARY), "w") as f:
    json.dump({"status": records.DIVERGED, "diverged_at_step": 150}, f)
  loaded = {r.name: r for r in runs.load_runs(root)}
  assert records.has_diverged(loaded["so"].workdir)
  assert loaded["sgd"].finished and not loaded["so"].finished
  assert runs.pair_by_seed([loaded["sgd"]], [loaded["so"]]) == []


def test_table_shows_flops_from_summaries_and_na_without(tmp_path):
  root = str(tmp_path)
  for seed, ratio in ((0, 0.2), (1, 0.3)):
    workdir = workdirs.fake_workdir(
        root, f"s{seed}", "sparseopt", seed, [0.7, 0.8]
    )
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump({"flops": {"training_ratio": ratio, "inference_ratio": 0.1}}, f)
  # Written before FLOPs were counted (an empty summary, as in old runs).
  workdirs.fake_workdir(root, "b0", "sgd", 0, [0.7, 0.8])
  rows = {
      r["optimizer"]: r
      for r in plot.summarize(plot.group_runs(plot.load_runs(root)))
  }
  assert rows["sparseopt"]["flops_training"] == pytest.approx(0.25)
  assert rows["sgd"]["flops_training"] is None
  table = plot.markdown_table(list(rows.values()))
  assert "FLOPs train / inference (x dense)" in table
  assert "| 0.250 / 0.100 |" in table
  assert "| 200 / 200 | n/a |" in table


# The BatchNorm-statistics mechanism test (experiments.studies.bn_stats).


def _bn_run(seed, optimizer, correction, lr, final, slope):
  config = {
      "seed": seed,
      "optimizer": optimizer,
      "correction": correction,
      "learning_rate": lr,
      "sparsity": 0.97,
      "num_epochs": 3.0,
  }
  logged = [
      {"step": 50, "sigma/L0/slope_fan_in": slope, "sigma/L1/slope_fan_in": 0},
      {"step": 100, "test_accuracy": final - 0.1},
      {"step": 100, "sigma/L0/slope_fan_in": slope, "sigma/L1/slope_fan_in": 0},
      {"step": 200, "test_accuracy": final},
  ]
  return runs.Run.from_log(config, logged, name=f"{optimizer}-{seed}")


def test_bn_stats_pairs_each_arm_with_sgd_and_tunes_each_arm():
  from experiments.studies import bn_stats  # pylint: disable=g-import-not-at-top

  loaded = []
  for seed in range(3):
    for lr, base in ((0.1, 0.70), (0.2, 0.72)):
      loaded.append(_bn_run(seed, "sgd", "fan_in", lr, base + seed / 100, 1.0))
      loaded.append(_bn_run(seed, "sparseopt", "fan_in", lr, base - 0.01, 1.0))
    loaded.append(
        _bn_run(seed, "sparseopt", "batch_stats", 0.1, 0.80 + seed / 50, 0.6)
    )
  by_arm = {n: bn_stats.arm_runs(loaded, w) for n, w in bn_stats.ARMS}
  assert sorted(by_arm["SGD"]) == [0.1, 0.2]
  assert list(by_arm["SparseOpt, BatchNorm's std"]) == [0.1]
  table = bn_stats.accuracy_table(by_arm)
  # At lr 0.1: batch_stats - sgd = (0.80 + s/50) - (0.70 + s/100), seeds 0-2.
  diffs = np.array([0.10 + s / 100 for s in range(3)])
  want = runs.format_difference(diffs.mean(), diffs.std(ddof=1) / np.sqrt(3))
  assert f"{want} (3)" in table
  tuned = bn_stats.tuned_table(by_arm)
  assert "| SGD | 0.2 (grid edge) |" in tuned
  # Each arm at its own best lr: batch_stats at 0.1 against SGD at 0.2.
  diffs = np.array([0.80 + s / 50 - (0.72 + s / 100) for s in range(3)])
  want = runs.format_difference(diffs.mean(), diffs.std(ddof=1) / np.sqrt(3))
  assert "| SparseOpt, BatchNorm's std | 0.1 | " in tuned and want in tuned
  steps, slope = bn_stats.sigma_curve(loaded[-1], "slope_fan_in")
  np.testing.assert_array_equal(steps, [50, 100])
  np.testing.assert_allclose(slope, [0.3, 0.3])  # Mean over the two layers.
  assert bn_stats.setting(by_arm) == "RigL 97% (ERK), 3 epochs"


def test_recalibration_table_pairs_the_two_evaluations_by_seed():
  from experiments.studies import recalibration  # pylint: disable=g-import-not-at-top

  loaded = []
  for seed in range(2):
    for k, acc in ((0, (0.60, 0.80)), (20, (0.70 + seed / 100, 0.80))):
      logged = [
          {"step": s, "test_accuracy": a} for s, a in zip((150, 300), acc)
      ]
      config = {"seed": seed, "optimizer": "sgd", "recalibrate_batches": k}
      loaded.append(runs.Run.from_log(config, logged, name=f"{k}-{seed}"))
  table = recalibration.table(loaded)
  diffs = np.array([0.10, 0.11])
  want = runs.format_difference(diffs.mean(), diffs.std(ddof=1) / np.sqrt(2))
  assert f"| sgd | 150 | 2 | 60.00 | 70.50 | {want} |" in table
  assert "| sgd | 300 | 2 | 80.00 | 80.00 | +0.00 ± 0.00 |" in table


def test_arms_table_pairs_each_arm_with_the_reference(tmp_path):
  from experiments.studies import arms

  root = str(tmp_path)
  finals = {"sgd": [0.80, 0.82, 0.84], "sparseopt": [0.81, 0.80, 0.86]}
  for opt, accs in finals.items():
    for seed, acc in enumerate(accs):
      workdirs.fake_workdir(root, f"{opt}{seed}", opt, seed, [0.5, acc])
  workdirs.fake_workdir(root, "late", "sparseopt", 3, [0.5], finished=False)
  parsed = [
      arms.parse_arm("SGD:optimizer=sgd"),
      arms.parse_arm("SO:optimizer=sparseopt"),
  ]
  by_arm = arms.select(runs.load_all(root), parsed)
  text = arms.table(by_arm, "SGD")
  # By hand: differences +1, -2, +2 points: mean +0.33, std 2.08, s.e.
  # 2.08 / sqrt(3) = 1.20; SO's finals 81, 80, 86: std 3.21.
  assert (
      "| SO | 3 | 82.33 ± 3.21 | n/a | +0.33 ± 1.20 (n=3: +1.00, -2.00, +2.00) |"
      in text
  )
  assert "| SGD | 3 | 82.00 ± 2.00 | n/a | (reference) |" in text
  arms.draw(by_arm, str(tmp_path / "arms.png"), "t")
  assert os.path.getsize(tmp_path / "arms.png") > 0
  with pytest.raises(ValueError, match="matches arms"):
    arms.select(
        runs.load_all(root), [parsed[0], arms.parse_arm("all:method=rigl")]
    )
  with pytest.raises(ValueError, match="label"):
    arms.parse_arm("optimizer=sgd")
