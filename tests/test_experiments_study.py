"""Tests of the issue-7 study pieces: turning logs, fan-in init, the dense
control and the paired study report, on tiny generated data."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import sparseopt_jax as sparseopt

from experiments import fake_data
from experiments import input_pipeline
from experiments import study
from experiments import sweep
from experiments import train
import reference as ref


@pytest.fixture(scope="module")
def fmnist_dir(tmp_path_factory):
  return fake_data.write_fashion_mnist(
      str(tmp_path_factory.mktemp("fmnist")), num_train=96, num_test=40)


def _mlp(fmnist_dir, **overrides):
  base = dict(data_dir=fmnist_dir, batch_size=16, eval_batch_size=20,
              num_train_steps=9, log_every=3, eval_every=9,
              checkpoint_every=9, update_every=2, progress_bar=False,
              num_epochs=3.0, sparsity=0.9)
  return sweep.make_config("fmnist_mlp", {**base, **overrides})


def test_turning_and_jump_metrics_are_logged(tmp_path, fmnist_dir):
  # 9 steps, end 0.75 * 9 -> 6: mask updates at counts 2 and 4 (steps 3, 5).
  train.train_and_evaluate(_mlp(fmnist_dir), str(tmp_path))
  records = {r["step"]: r for r in train.read_metrics(str(tmp_path))}
  assert sorted(records) == [3, 6, 9]
  for r in records.values():
    for layer in ("hidden/kernel",):  # The head is dense under ERK at 90%.
      angle = r[f"turn/{layer}/angle_mean"]
      assert np.isfinite(angle) and angle > 0  # Logged on its own step.
      assert np.isfinite(r[f"turn/{layer}/imbalance"])
      assert r[f"turn/{layer}/norm_mean"] > 0
    assert "mask_update" not in r
  # The window ending at step 3 holds the update at step 3, the one ending
  # at 6 the update at step 5; the last window holds none.
  for step in (3, 6):
    assert records[step]["jump/hidden/kernel/factor_jump"] >= 0
    assert records[step]["jump/hidden/kernel/norm_jump"] >= 0
    assert "update_turn/hidden/kernel/angle_mean" in records[step]
  assert "jump/hidden/kernel/factor_jump" not in records[9]


def test_turning_logs_do_not_change_training(tmp_path, fmnist_dir):
  on = train.train_and_evaluate(_mlp(fmnist_dir), str(tmp_path / "on"))
  off = train.train_and_evaluate(_mlp(fmnist_dir, turning_diagnostics=False),
                                 str(tmp_path / "off"))
  assert on["final_test_loss"] == off["final_test_loss"]
  logged_off = train.read_metrics(str(tmp_path / "off"))
  assert not any(k.startswith("turn/") for r in logged_off for k in r)


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
  jax.tree.map(np.testing.assert_array_equal, masks,
               sparseopt.get_masks(fan_in.opt_state))
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
  np.testing.assert_array_equal(dense.params["hidden"]["kernel"] != 0,
                                fan_in.params["hidden"]["kernel"] != 0)
  np.testing.assert_array_equal(dense.params["head"]["bias"],
                                fan_in.params["head"]["bias"])


def test_fan_in_init_needs_a_sparse_method(tmp_path, fmnist_dir):
  with pytest.raises(ValueError, match="init='fan_in'.*sparse method"):
    train.train_and_evaluate(_mlp(fmnist_dir, method="dense", init="fan_in"),
                             str(tmp_path))


@pytest.mark.parametrize("field, value, message", [
    ("init", "orthogonal", "init='orthogonal'"),
    ("grad_scale", 0.0, "grad_scale=0.0"),
    ("grad_scale_fraction", 1.5, "grad_scale_fraction=1.5"),
])
def test_bad_study_fields_are_named(tmp_path, fmnist_dir, field, value,
                                    message):
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(_mlp(fmnist_dir, **{field: value}),
                             str(tmp_path))


def test_dense_control_scales_a_fixed_half_of_the_neurons():
  params = {"conv": {"kernel": jnp.ones((3, 3, 2, 10))},
            "bn": {"scale": jnp.ones(10)},
            "head": {"kernel": jnp.ones((10, 4)), "bias": jnp.ones(4)}}
  scales = train.neuron_gradient_scales(jax.random.key(0), params, 3.0, 0.5)
  c = np.asarray(scales["conv"]["kernel"])
  assert sorted(c.tolist()) == [1.0] * 5 + [3.0] * 5
  assert scales["head"]["kernel"] is None and scales["bn"]["scale"] is None
  grads = jax.tree.map(
      lambda p: jax.random.normal(jax.random.key(1), p.shape), params)
  tx = train.scale_neuron_gradients(scales)
  out, _ = jax.jit(tx.update)(grads, tx.init(params))
  np.testing.assert_allclose(out["conv"]["kernel"],
                             np.asarray(grads["conv"]["kernel"]) * c,
                             rtol=1e-6)
  np.testing.assert_array_equal(out["head"]["kernel"], grads["head"]["kernel"])
  np.testing.assert_array_equal(out["bn"]["scale"], grads["bn"]["scale"])


def test_dense_control_sits_before_weight_decay(fmnist_dir):
  config = _mlp(fmnist_dir, method="dense", optimizer="sgd", grad_scale=2.0,
                weight_decay=0.1, momentum=0.0)
  params = {"hidden": {"kernel": jnp.ones((4, 6))},
            "head": {"kernel": jnp.ones((6, 3)), "bias": jnp.zeros(3)}}
  tx = train.create_optimizer(config, optax.constant_schedule(1.0), None, 9,
                              jax.random.key(0), params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  # -(k * g + wd * w): scaled neurons -2.1, the others -1.1; head unscaled.
  hidden = np.asarray(updates["hidden"]["kernel"])
  assert sorted(np.unique(hidden).tolist()) == pytest.approx([-2.1, -1.1])
  assert (hidden[0] == -2.1).sum() == 3
  np.testing.assert_allclose(updates["head"]["kernel"], -1.1)


def test_study_report_pairs_runs_by_seed(tmp_path, fmnist_dir):
  root = str(tmp_path)
  finals = {}
  for optimizer in ("sgd", "sparseopt"):
    for seed in (0, 1):
      workdir = os.path.join(root, f"{optimizer}-{seed}")
      summary = train.train_and_evaluate(
          _mlp(fmnist_dir, method="rigl", sparsity=0.97, optimizer=optimizer,
               seed=seed), workdir)
      finals[optimizer, seed] = summary["final_test_accuracy"]
  text = study.report([root], root)
  row = study.paired(study.load(root), study.comparisons()[0])
  diffs = [finals["sparseopt", s] - finals["sgd", s] for s in (0, 1)]
  assert row["n"] == 2
  assert row["diff"] == pytest.approx(np.mean(diffs))
  assert row["sem"] == pytest.approx(np.std(diffs, ddof=1) / math.sqrt(2))
  assert "| correction | fan_in (paper) vs none | 2 |" in text
  assert "| 97%, masked dense init | none (SGD) |" in text
  # The histogram rows sum the hidden layer's neurons (the head is left out).
  assert "| 97%, 3 epochs | none (SGD) | 2 |" in text
  for png in ("paired.png", "turning.png", "fan_in.png"):
    assert os.path.getsize(os.path.join(root, png)) > 10_000


def test_fan_in_fractions_merge_bins_and_leave_out_the_head():
  record = {"a/kernel/fan_in/0": 1.0, "a/kernel/fan_in/1": 2.0,
            "a/kernel/fan_in/2-3": 3.0, "a/kernel/fan_in/4-7": 0.0,
            "a/kernel/fan_in/8-15": 2.0, "b/kernel/fan_in/16-31": 2.0,
            "head/kernel/fan_in/1": 100.0, "itop": 0.5}
  np.testing.assert_allclose(study.fan_in_fractions(record),
                             np.array([1, 2, 3, 0, 4]) / 10)
  assert study.fan_in_fractions({"itop": 0.5}) is None


def test_dense_control_plot(tmp_path):
  rows = [{"comparison": c, "diff": -0.01 * i, "sem": 0.002, "n": 3}
          for i, c in enumerate(c for c in study.comparisons()
                                if c.section == "dense control")]
  assert sorted(r["comparison"].treatment["grad_scale"] for r in rows) == (
      pytest.approx([1 / 3, 0.5, 2.0, 3.0]))
  path = str(tmp_path / "dense_control.png")
  study.plot_dense_control(rows, path)
  assert os.path.getsize(path) > 10_000


def test_study_matches_only_the_named_recipe():
  config = {**study.BASE, "seed": 0}
  assert study.matches(config, {})
  assert not study.matches(config, {"weight_decay": 0.0})
  assert study.matches({**config, "weight_decay": 5e-05},
                       {"weight_decay": 5e-5})
  dense = {**config, "method": "dense", "sparsity": 0.5}
  assert study.matches(dense, {"method": "dense"})  # Sparsity is moot.
  assert not study.matches(dense, {})


def test_factors_on_the_live_masks_of_a_run_match_numpy(tmp_path, fmnist_dir):
  # The check behind the negative results: after real mask updates, the
  # factors the train step applies (from the counts cached in the state)
  # equal the NumPy reference on the masks in the final checkpoint.
  config = _mlp(fmnist_dir, method="rigl", sparsity=0.97, update_every=1,
                drop_fraction=0.5)
  spec = input_pipeline.load_dataset(config.dataset, fmnist_dir).spec
  model = train.create_model(config, spec)
  state, tx, _ = train.create_train_state(config, model, spec, 9, 6.0)
  batches = input_pipeline.train_batches(
      input_pipeline.load_dataset(config.dataset, fmnist_dir),
      global_batch_size=16, seed=0)
  step = jax.jit(lambda s, b: train.train_step(
      s, b, model=model, tx=tx, config=config, spec=spec, end_step=6,
      total_steps=9))
  masks0 = sparseopt.get_masks(state.opt_state)
  for _ in range(5):
    state, _ = step(state, next(batches))
  ds = state.opt_state
  masks = sparseopt.get_masks(ds)
  m0, m = (np.asarray(x["hidden"]["kernel"]) for x in (masks0, masks))
  assert (m0 != m).any()  # The topology did change.
  got = sparseopt.sparseopt_scales(masks)
  # What the train step applies: the factor on a gradient of ones, from the
  # counts forwarded by dynamic_sparse.
  ones = jax.tree.map(jnp.ones_like, state.params)
  applied, _ = jax.jit(lambda g, p, m, c: sparseopt.scale_by_sparseopt().update(
      g, None, p, masks=m, neuron_counts=c))(ones, state.params, masks,
                                             ds.neuron_counts)
  for layer in ("hidden", "head"):
    want = ref.sparseopt_factor(np.asarray(masks[layer]["kernel"]))
    np.testing.assert_allclose(got[layer]["kernel"], want, rtol=1e-6)
    np.testing.assert_allclose(applied[layer]["kernel"],
                               np.broadcast_to(want, masks[layer]["kernel"].shape),
                               rtol=1e-6)


def _fake_run(seed, optimizer, epochs, steps, accuracy):
  config = {**study.BASE, "seed": seed, "num_epochs": epochs}
  if optimizer == "sparseopt":
    config.update(study.SPARSEOPT)
  return {"config": config, "finished": True, "steps": np.array(steps),
          "accuracy": np.array(accuracy, dtype=float), "records": [{}]}


def test_paired_curve_aligns_eval_steps_and_pairs_by_seed(tmp_path):
  rng = np.random.default_rng(0)
  steps = [100, 200, 400]
  acc = {(o, s): rng.uniform(0.5, 0.9, 3) for o in ("sgd", "sparseopt")
         for s in range(3)}
  runs = [_fake_run(s, o, 12.0, steps, acc[o, s]) for (o, s) in acc]
  # An extra eval step in one run, and a seed with only one arm: both ignored.
  runs[0]["steps"] = np.array([50, 100, 200, 400])
  runs[0]["accuracy"] = np.concatenate([[0.1], runs[0]["accuracy"]])
  runs.append(_fake_run(7, "sgd", 12.0, steps, [0.1, 0.2, 0.3]))
  long = {"num_epochs": 12.0}
  x, diff, sem, n = study.paired_curve(runs, long, {**long, **study.SPARSEOPT})
  d = np.array([acc["sparseopt", s] - acc["sgd", s] for s in range(3)])
  assert n == 3
  np.testing.assert_allclose(x, np.array(steps) / 400)
  np.testing.assert_allclose(diff, d.mean(0))
  np.testing.assert_allclose(sem, d.std(0, ddof=1) / math.sqrt(3))
  assert study.paired_curve(runs, {"num_epochs": 3.0},
                            {"num_epochs": 3.0, **study.SPARSEOPT}) is None
  path = str(tmp_path / "budget.png")
  assert study.plot_budget(runs, path)
  assert os.path.getsize(path) > 10_000
  assert not study.plot_budget(runs[:0], str(tmp_path / "none.png"))


def test_topology_curves_sum_dead_over_layers_and_plot(tmp_path):
  records = [{"step": 10, "a/kernel/dead": 1.0, "b/kernel/dead": 2.0,
              "turn/a/kernel/dead": 50.0, "itop": 0.1},
             {"step": 15, "test_accuracy": 0.5},
             {"step": 20, "a/kernel/dead": 0.0, "b/kernel/dead": 4.0,
              "itop": 0.2}]
  steps, dead = study.topology_curve({"records": records}, "dead")
  np.testing.assert_array_equal(steps, [10, 20])
  np.testing.assert_array_equal(dead, [3.0, 4.0])
  np.testing.assert_array_equal(
      study.topology_curve({"records": records}, "itop")[1], [0.1, 0.2])
  runs = [_fake_run(s, o, 12.0, [20], [0.5]) for s in (0, 1)
          for o in ("sgd", "sparseopt")]
  for run in runs:
    run["records"] = records
  path = str(tmp_path / "topology.png")
  assert study.plot_topology(runs, path)
  assert os.path.getsize(path) > 10_000
  assert not study.plot_topology(runs[:0], str(tmp_path / "none.png"))


def test_plot_fan_in_draws_only_when_histograms_were_logged(tmp_path):
  runs = [_fake_run(s, o, 3.0, [20], [0.5]) for s in (0, 1)
          for o in ("sgd", "sparseopt")]
  for run in runs:
    run["records"] = [{"step": 20, "conv/kernel/fan_in/0": 3.0,
                       "conv/kernel/fan_in/4-7": 5.0}]
  np.testing.assert_allclose(
      study.final_fan_in(runs, study.SPARSEOPT),
      [3 / 8, 0, 0, 5 / 8, 0])
  path = str(tmp_path / "fan_in.png")
  assert study.plot_fan_in(runs, path)
  assert os.path.getsize(path) > 10_000
  for run in runs:
    run["records"] = [{"step": 20, "itop": 0.5}]  # Predates the histograms.
  assert not study.plot_fan_in(runs, str(tmp_path / "none.png"))
  assert not os.path.exists(tmp_path / "none.png")
