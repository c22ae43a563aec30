"""End-to-end tests of the training CLI pieces on generated or mock data."""

import functools
import glob
import json
import os
import shutil
import struct
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds
from tensorboardX.proto import event_pb2

from experiments import fake_data
from experiments import input_pipeline
from experiments import optimizers
from experiments import records
from experiments import sweep
from experiments import train
from experiments.configs import fields
import sparseopt_jax as sparseopt
from sparseopt_jax import flax_utils

_TIMING = ("step_time",)


@pytest.fixture(scope="module")
def fmnist_dir(tmp_path_factory):
  return fake_data.write_fashion_mnist(
      str(tmp_path_factory.mktemp("fmnist")), num_train=96, num_test=40
  )


def _config(name, **overrides):
  config = sweep.make_config(name, {"progress_bar": False, **overrides})
  return config


def _mlp(fmnist_dir, **overrides):
  base = dict(
      data_dir=fmnist_dir,
      batch_size=16,
      eval_batch_size=16,
      num_train_steps=6,
      log_every=2,
      eval_every=3,
      checkpoint_every=3,
      update_every=2,
  )
  return _config("fmnist_mlp", **{**base, **overrides})


def _deterministic(logged):
  return [{k: v for k, v in r.items() if k not in _TIMING} for r in logged]


def _checkpoint(workdir, step, item=records.STATE_ITEM):
  path = os.path.join(workdir, "checkpoints", str(step), item)
  return ocp.PyTreeCheckpointer().restore(path)


def _strict_json(path):
  """The JSON at ``path``; fails on the bare NaN/Infinity Python accepts."""

  def refuse(name):
    raise ValueError(f"{path} holds a bare {name}")

  with open(path) as f:
    return json.loads(f.read(), parse_constant=refuse)


def _cli(workdir, *flags):
  """Runs ``experiments.main`` on fmnist_mlp; returns the finished process."""
  return subprocess.run(
      [
          sys.executable,
          "-m",
          "experiments.main",
          "--config=experiments/configs/fmnist_mlp.py",
          f"--workdir={workdir}",
          "--config.progress_bar=False",
          *flags,
      ],
      env={**os.environ, "JAX_PLATFORMS": "cpu"},
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
      capture_output=True,
      text=True,
  )


def _event_files(workdir):
  """The events of each TensorBoard event file of ``workdir``, oldest first.

  Parsed with tensorboardX's protobuf classes, so the test needs neither
  TensorFlow nor TensorBoard.
  """
  files = []
  for path in sorted(
      glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*")),
      key=os.path.getmtime,
  ):
    events = []
    with open(path, "rb") as f:
      data = f.read()
    # TFRecord framing: u64 length, u32 length CRC, payload, u32 payload CRC.
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset : offset + 8])
      payload = data[offset + 12 : offset + 12 + length]
      events.append(event_pb2.Event.FromString(payload))
      offset += 12 + length + 4
    files.append(events)
  return files


def _scalars(events):
  """``{tag: {step: value}}`` of the scalar summaries in ``events``."""
  out = {}
  for event in events:
    for value in event.summary.value:
      out.setdefault(value.tag, {})[event.step] = value.simple_value
  return out


def test_ham_and_renormalization_train(tmp_path, fmnist_dir):
  summary = train.train_and_evaluate(
      _mlp(
          fmnist_dir,
          method="rigl",
          optimizer="sparseopt",
          sparsity=0.9,
          ham=True,
          renormalize="layer",
      ),
      str(tmp_path),
  )
  logged = records.read_metrics(str(tmp_path))
  assert all(np.isfinite(r["train_loss"]) for r in logged if "train_loss" in r)
  assert summary["step"] == 6
  assert logged[-1]["sparsity"] == pytest.approx(0.9, abs=2e-3)


# Every method and every optimizer at least once (rigl + sparseopt is in the
# resume test); the full product would only repeat the same code paths.
@pytest.mark.parametrize(
    "method, optimizer",
    [
        ("dense", "sparseopt"),
        ("static", "sgd"),
        ("set", "sparseopt+adam"),
        ("rigl", "adam"),
    ],
)
def test_every_method_and_optimizer_trains(
    tmp_path, fmnist_dir, method, optimizer
):
  summary = train.train_and_evaluate(
      _mlp(fmnist_dir, method=method, optimizer=optimizer, sparsity=0.9),
      str(tmp_path),
  )
  logged = records.read_metrics(str(tmp_path))
  assert [r["step"] for r in logged] == [2, 3, 4, 6]
  assert all(np.isfinite(r["train_loss"]) for r in logged if "train_loss" in r)
  assert summary["step"] == 6 and 0 <= summary["final_test_accuracy"] <= 1
  flops = summary["flops"]
  if method == "dense":
    assert flops["training_ratio"] == flops["inference_ratio"] == 1.0
    assert "itop" not in logged[-1]
  else:
    # A Dense layer's FLOPs are 2 x its kernel's size per example, so the
    # MLP's sparse/dense inference ratio is its density.
    assert flops["inference_ratio"] == pytest.approx(0.1, abs=2e-3)
    # RigL pays dense gradients at its mask updates; SET, static do not.
    extra = flops["training_ratio"] - flops["inference_ratio"]
    assert extra > 0 if method == "rigl" else extra == pytest.approx(0.0)
    # Sparsity is kept exactly through mask updates (ERK over two layers).
    assert logged[-1]["sparsity"] == pytest.approx(0.9, abs=2e-3)
    assert logged[-1]["itop"] >= 1 - logged[-1]["sparsity"] - 1e-6
    # The fan-in histogram of every sparse layer covers all its neurons.
    hist = {}
    for key, value in logged[-1].items():
      if "/fan_in/" in key:
        layer = key.split("/fan_in/")[0]
        hist[layer] = hist.get(layer, 0.0) + value
    neurons = {
        sparseopt.path_str(path): float(x.shape[-1])
        for path, x in jax.tree_util.tree_leaves_with_path(
            _checkpoint(str(tmp_path), 6)["params"]
        )
        if x.ndim >= 2
    }
    assert hist and all(hist[layer] == neurons[layer] for layer in hist)
  assert os.path.exists(tmp_path / "summary.json")


def test_summary_records_environment(tmp_path, fmnist_dir):
  summary = train.train_and_evaluate(
      _mlp(fmnist_dir, num_train_steps=2), str(tmp_path)
  )
  with open(tmp_path / "summary.json") as f:
    written = json.load(f)
  assert written["environment"] == summary["environment"]
  versions = written["environment"]["versions"]
  assert versions["jax"] == jax.__version__
  assert versions["optax"] == optax.__version__
  assert written["environment"]["device_kind"] == jax.devices()[0].device_kind


def test_records_name_their_mask_update_steps(tmp_path, fmnist_dir):
  # Updates at DST counts 2 and 4 (end 1.0 * 6): logged steps 3 and 5, in
  # the windows that end at steps 4 and 6.
  train.train_and_evaluate(
      _mlp(fmnist_dir, method="rigl", end_fraction=1.0), str(tmp_path)
  )
  logged = records.read_metrics(str(tmp_path))
  updates = {
      r["step"]: r["mask_update_steps"]
      for r in logged
      if "mask_update_steps" in r
  }
  assert updates == {4: [3], 6: [5]}
  # The windows with an update are the ones that logged its jump.
  assert set(updates) == {
      r["step"] for r in logged if any(k.startswith("jump/") for k in r)
  }


def test_records_go_to_tensorboard(tmp_path, fmnist_dir):
  train.train_and_evaluate(_mlp(fmnist_dir), str(tmp_path))
  logged = records.read_metrics(str(tmp_path))
  (events,) = _event_files(str(tmp_path))
  scalars = _scalars(events)
  for key in ("train_loss", "test_accuracy", "itop", "lr"):
    expected = {r["step"]: r[key] for r in logged if key in r}
    assert expected and scalars[key].keys() == expected.keys(), key
    for step, value in expected.items():
      assert scalars[key][step] == pytest.approx(value, rel=1e-6)
  assert sorted(scalars["train_loss"]) == [2, 4, 6]


def test_learns_on_separable_data(tmp_path, fmnist_dir):
  summary = train.train_and_evaluate(
      _mlp(fmnist_dir, num_train_steps=30, sparsity=0.5, learning_rate=0.1),
      str(tmp_path),
  )
  assert summary["final_test_accuracy"] > 0.5  # Chance is 0.1.


def test_resume_is_bit_identical(tmp_path, fmnist_dir):
  # Mask updates at steps 2 and 4 (end 0.75 * 8 = 6); the resumed part
  # (steps 5-8 from the checkpoint at 4) contains one.
  config = _mlp(
      fmnist_dir,
      method="rigl",
      num_train_steps=8,
      checkpoint_every=4,
      eval_every=4,
      drop_fraction=0.5,
  )
  full, part = str(tmp_path / "full"), str(tmp_path / "part")
  train.train_and_evaluate(config, full)
  shutil.copytree(full, part)
  shutil.rmtree(os.path.join(part, "checkpoints", "8"))
  os.remove(os.path.join(part, "summary.json"))
  with open(os.path.join(part, "metrics.jsonl"), "a") as f:
    f.write(
        json.dumps({"step": 6, "train_loss": -1.0}) + "\n"
    )  # A killed run's tail.
  summary = train.train_and_evaluate(config, part)
  assert summary["resumed_from"] == 4
  # TensorBoard: the resumed session writes a new event file that purges
  # the first session's steps after 4 and logs only steps after 4.
  first, resumed = _event_files(part)
  assert sorted(_scalars(first)["train_loss"]) == [2, 4, 6, 8]
  assert [e.step for e in resumed if e.HasField("session_log")] == [5]
  assert sorted(_scalars(resumed)["train_loss"]) == [6, 8]
  jax.tree.map(
      np.testing.assert_array_equal, _checkpoint(full, 8), _checkpoint(part, 8)
  )
  assert _deterministic(records.read_metrics(full)) == _deterministic(
      records.read_metrics(part)
  )
  assert any(r.get("changed", 0) > 0 for r in records.read_metrics(full))


def test_finished_run_is_left_as_it_is(tmp_path, fmnist_dir, capsys):
  config = _mlp(fmnist_dir)
  first = train.train_and_evaluate(config, str(tmp_path))
  files = {
      name: (tmp_path / name).read_bytes()
      for name in ("summary.json", "config.json", "metrics.jsonl")
  }
  again = train.train_and_evaluate(config, str(tmp_path))
  assert "already finished" in capsys.readouterr().out
  assert again == _strict_json(tmp_path / "summary.json")
  assert again["compile_time"] == first["compile_time"] is not None
  assert again["median_step_time"] == first["median_step_time"] is not None
  for name, data in files.items():
    assert (tmp_path / name).read_bytes() == data, name
  with pytest.raises(ValueError, match=r"different config \(sparsity"):
    train.train_and_evaluate(_mlp(fmnist_dir, sparsity=0.8), str(tmp_path))


def test_refuses_incompatible_workdir(tmp_path, fmnist_dir):
  config = _mlp(fmnist_dir, num_train_steps=8, checkpoint_every=2)
  train.train_and_evaluate(config, str(tmp_path))
  # Not even with config.json and the last checkpoint gone: every
  # checkpoint holds its config.
  for name in ("summary.json", "config.json"):
    os.remove(tmp_path / name)
  shutil.rmtree(tmp_path / "checkpoints" / "8")
  with pytest.raises(
      ValueError, match=r"different config \(sparsity.*checkpoint 6"
  ):
    train.train_and_evaluate(
        _mlp(fmnist_dir, num_train_steps=8, checkpoint_every=2, sparsity=0.8),
        str(tmp_path),
    )
  # Nor with config.json edited to the new config.
  with open(tmp_path / "config.json", "w") as f:
    json.dump({**json.loads(config.to_json()), "sparsity": 0.8}, f)
  with pytest.raises(ValueError, match="checkpoint 6"):
    train.train_and_evaluate(
        _mlp(fmnist_dir, num_train_steps=8, checkpoint_every=2, sparsity=0.8),
        str(tmp_path),
    )
  # Bookkeeping fields may change; config.json is the run's again.
  summary = train.train_and_evaluate(
      _mlp(fmnist_dir, num_train_steps=8, checkpoint_every=2, log_every=1),
      str(tmp_path),
  )
  assert summary["resumed_from"] == 6
  assert records.load_saved_config(str(tmp_path))["sparsity"] == 0.95


def test_corrupt_checkpoint_and_torn_log_are_survived(tmp_path, fmnist_dir):
  config = _mlp(fmnist_dir, num_train_steps=8, checkpoint_every=2)
  full, part = str(tmp_path / "full"), str(tmp_path / "part")
  train.train_and_evaluate(config, full)
  shutil.copytree(full, part)
  os.remove(os.path.join(part, "summary.json"))
  shutil.rmtree(os.path.join(part, "checkpoints", "8"))
  os.remove(os.path.join(part, "checkpoints", "6", "state", "_METADATA"))
  with open(os.path.join(part, "metrics.jsonl"), "a") as f:
    f.write('{"step": 7, "train_lo')  # A write torn by a kill.
  with pytest.warns(UserWarning, match="torn last line"):
    assert len(records.read_metrics(part)) == len(records.read_metrics(full))
  summary = train.train_and_evaluate(config, part)
  assert summary["resumed_from"] == 4  # Fell back past the corrupt 6 ...
  assert os.listdir(os.path.join(part, "corrupt_checkpoints")) == ["6"]
  assert os.path.exists(  # ... kept aside, not deleted.
      os.path.join(part, "corrupt_checkpoints", "6", "state", "d")
  )
  jax.tree.map(
      np.testing.assert_array_equal, _checkpoint(full, 8), _checkpoint(part, 8)
  )
  assert _deterministic(records.read_metrics(full)) == _deterministic(
      records.read_metrics(part)
  )


def test_train_step_keeps_pruned_weights_zero_through_nan(fmnist_dir):
  # A diverged step: NaN weights in every active position and NaN gradients,
  # on a mask-update step. Pruned positions stay exactly 0 and the step says
  # it is not finite.
  config = _mlp(fmnist_dir, method="rigl", update_every=1, end_fraction=1.0)
  spec = input_pipeline.DATASETS["fashion_mnist"]
  model = train.create_model(config, spec)
  state, tx, _ = train.create_train_state(config, model, spec, 6, 6.0)
  masks = sparseopt.get_masks(state.opt_state)
  state = state.replace(
      step=jnp.int32(1),
      params=jax.tree.map(
          lambda p, m: p if m is None else jnp.where(m, jnp.nan, 0.0),
          state.params,
          masks,
          is_leaf=lambda x: x is None,
      ),
  )
  batch = {
      "image": np.zeros((16, 28, 28, 1), np.uint8),
      "label": np.zeros(16, np.int32),
  }
  step = jax.jit(
      functools.partial(
          train.train_step, model=model, tx=tx, config=config, spec=spec
      )
  )
  for _ in range(2):  # Drops the NaN weights, then regrows connections.
    state, metrics = step(state, batch)
    assert not bool(metrics["finite"])
  assert bool(sparseopt.masks_updated(state.opt_state))
  new_masks = sparseopt.get_masks(state.opt_state)
  for p, m in zip(
      jax.tree.leaves(state.params),
      jax.tree.leaves(new_masks, is_leaf=lambda x: x is None),
  ):
    if m is not None:
      assert np.all(np.asarray(p)[~np.asarray(m)] == 0)


def test_divergence_stops_the_run(tmp_path, fmnist_dir):
  # Through the command line, as it was found: learning rate 1e6.
  workdir = str(tmp_path / "w")
  out = _cli(
      workdir,
      f"--config.data_dir={fmnist_dir}",
      "--config.learning_rate=1e6",
      "--config.batch_size=16",
      "--config.eval_batch_size=16",
      "--config.num_train_steps=12",
      "--config.log_every=4",
      "--config.checkpoint_every=1",
  )
  assert out.returncode == 1, out.stderr
  summary = _strict_json(os.path.join(workdir, "summary.json"))
  step = summary["diverged_at_step"]
  assert summary["status"] == "diverged" and 1 < step <= 12
  assert f"diverged at step {step}" in out.stderr
  assert "test accuracy" not in out.stdout
  # The checkpoints before it are kept, finite, pruned weights exactly 0;
  # nothing from the diverged step on was saved.
  steps = sorted(
      int(d) for d in os.listdir(os.path.join(workdir, "checkpoints"))
  )
  assert steps and steps[-1] == step - 1 == summary["last_checkpoint"]
  saved = _checkpoint(workdir, steps[-1])
  masks = saved["opt_state"]["masks"]  # A raw restore: dicts.
  for p in jax.tree.leaves(saved["params"]):
    assert np.all(np.isfinite(p))
  for layer in ("hidden", "head"):
    kernel = np.asarray(saved["params"][layer]["kernel"])
    assert np.all(kernel[~np.asarray(masks[layer]["kernel"])] == 0)
  for record in (
      records.read_metrics(workdir)
      if os.path.exists(os.path.join(workdir, "metrics.jsonl"))
      else []
  ):
    assert record["step"] < step
  # Running it again says so and changes nothing.
  before = open(os.path.join(workdir, "summary.json")).read()
  again = _cli(
      workdir,
      f"--config.data_dir={fmnist_dir}",
      "--config.learning_rate=1e6",
      "--config.batch_size=16",
      "--config.eval_batch_size=16",
      "--config.num_train_steps=12",
      "--config.log_every=4",
      "--config.checkpoint_every=1",
  )
  assert again.returncode == 1 and "already ended" in again.stderr
  assert open(os.path.join(workdir, "summary.json")).read() == before


# The hostile-input table: each value passes the type check of ConfigDict but
# cannot run. Each must fail at once, naming the field and what it accepts,
# and leave nothing in the workdir that would block the corrected command.
@pytest.mark.parametrize(
    "field, value, message",
    [
        ("method", "lottery", "method='lottery'.*one of"),
        ("optimizer", "lion", "optimizer='lion'"),
        ("sparsity", 1.0, "sparsity=1.0"),
        ("correct_filter", "head", "correct_filter='head'"),
        ("batch_size", 0, "batch_size=0"),
        ("batch_size", 1, "batch_size=1: expected an int >= 2"),
        ("eval_batch_size", 0, "eval_batch_size=0: expected an int >= 1"),
        ("keep_checkpoints", 0, "keep_checkpoints=0: expected an int >= 1"),
        ("keep_checkpoints", -1, "keep_checkpoints=-1"),
        ("width", -1, "width=-1: expected an int >= 0"),
        ("model", "foo", "model='foo': expected one of .*'fmnist_mlp'"),
        ("dataset", "foo", "dataset='foo': expected one of"),
        ("grow_with", "foo", r"grow_with='foo': expected one of \('raw'"),
        ("drop_schedule", "foo", "drop_schedule='foo'"),
        ("augment", "foo", "augment='foo': expected one of"),
        ("distribution", "foo", "distribution='foo'"),
        ("dtype", "foo", r"dtype='foo': expected one of \('float32'"),
        ("learning_rate", float("inf"), "learning_rate=inf: expected a finite"),
        ("learning_rate", float("nan"), "learning_rate=nan"),
        ("learning_rate", 0.0, "learning_rate=0.0"),
        ("log_every", 0, "log_every=0"),
        ("step_boundaries", (0.5, 2.0), "step_boundaries"),
        ("init", "fan_in", None),  # with method dense: a cross-field check
    ],
)
def test_bad_config_values_are_named(
    tmp_path, fmnist_dir, field, value, message
):
  workdir = tmp_path / "w"
  overrides = {field: value}
  if message is None:
    overrides["method"], message = "dense", "init='fan_in'.*sparse method"
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(_mlp(fmnist_dir, **overrides), str(workdir))
  assert not workdir.exists()


def test_corrected_command_runs_after_a_failed_start(tmp_path, fmnist_dir):
  workdir = str(tmp_path / "w")
  flags = (
      f"--config.data_dir={fmnist_dir}",
      "--config.batch_size=16",
      "--config.eval_batch_size=16",
      "--config.num_train_steps=2",
  )
  for bad, message in (
      ("--config.foo=1", "unknown field 'foo'; the fields are"),
      ("--config.model=foo", "model='foo': expected one of"),
      ("--config.keep_checkpoints=0", "keep_checkpoints=0"),
  ):
    out = _cli(workdir, *flags, bad)
    assert out.returncode == 1 and message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
  out = _cli(workdir, *flags)
  assert out.returncode == 0, out.stderr
  assert _strict_json(os.path.join(workdir, "summary.json"))["status"] == (
      "finished"
  )


def test_every_config_field_is_in_the_table():
  for name in ("default", "fmnist_mlp", "fmnist_resnet", "resnet20_cifar100"):
    config = sweep.make_config(name, {})
    assert set(config.keys()) == set(fields.FIELDS), name
    fields.validate(config)
  config = sweep.make_config("fmnist_mlp", {})
  with config.unlocked():
    config.foo = 1
  with pytest.raises(ValueError, match="unknown field 'foo'"):
    fields.validate(config)
  with pytest.raises(ValueError, match="multiple of the 3 devices"):
    fields.validate(sweep.make_config("fmnist_mlp", {}), num_devices=3)


def test_missing_dataset_says_how_to_get_it(tmp_path):
  with pytest.raises(
      FileNotFoundError, match="apt-get install dataset-fashion"
  ):
    train.train_and_evaluate(_mlp(str(tmp_path / "empty")), str(tmp_path / "w"))


def test_fmnist_resnet_preset_runs(tmp_path, fmnist_dir):
  config = _config(
      "fmnist_resnet",
      data_dir=fmnist_dir,
      batch_size=16,
      eval_batch_size=40,
      num_train_steps=2,
      log_every=1,
      update_every=1,
      end_fraction=1.0,
  )
  summary = train.train_and_evaluate(config, str(tmp_path))
  logged = records.read_metrics(str(tmp_path))
  assert np.isfinite(logged[-1]["train_loss"]) and summary["step"] == 2
  assert logged[-1]["changed"] > 0  # The mask update at step 1 regrew weights.


def test_resnet20_cifar100_preset_runs_on_mock_data(tmp_path):
  config = _config(
      "resnet20_cifar100",
      batch_size=8,
      eval_batch_size=8,
      num_train_steps=2,
      log_every=1,
      eval_every=2,
      update_every=1,
      end_fraction=1.0,
  )
  with tfds.testing.mock_data(num_examples=16):
    summary = train.train_and_evaluate(config, str(tmp_path))
  logged = records.read_metrics(str(tmp_path))
  assert np.isfinite(logged[-1]["train_loss"])
  assert logged[-1]["sparsity"] == pytest.approx(0.9, abs=2e-3)
  assert summary["step"] == 2


def test_resnet50_imagenet_preset_runs_on_mock_data(tmp_path):
  # ResNet-50's layout at 1/8 width, tiny images and batch: full-width
  # kernels make the CPU compile of the RigL step take minutes. The stem
  # stays dense as in RigL.
  config = _config(
      "resnet50_imagenet",
      batch_size=2,
      eval_batch_size=4,
      image_size=32,
      width=8,
      dtype="float32",
      num_train_steps=1,
      num_data_threads=1,
  )
  with tfds.testing.mock_data(num_examples=4):
    summary = train.train_and_evaluate(config, str(tmp_path))
  logged = records.read_metrics(str(tmp_path))
  assert np.isfinite(logged[-1]["train_loss"])
  assert "conv_init/kernel/s_mean" not in logged[-1]
  assert logged[-1]["lr"] == pytest.approx(0.0)  # Step 0 of the warmup.
  assert summary["step"] == 1


_MULTI_DEVICE = """
import json, sys
import jax
from experiments import sweep, train
config = sweep.make_config("fmnist_mlp", json.loads(sys.argv[1]))
train.train_and_evaluate(config, sys.argv[2])
print(jax.device_count())
"""


def _run_on_devices(script, overrides, workdir, devices):
  """Runs ``script overrides workdir`` in a process with ``devices`` CPUs.

  ``XLA_FLAGS`` is read when jax starts, hence the subprocess. Returns its
  completed process; its stderr's tail is the assertion message on failure.
  """
  env = {
      **os.environ,
      "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
      "JAX_PLATFORMS": "cpu",
  }
  out = subprocess.run(
      [sys.executable, "-c", script, json.dumps(overrides), workdir],
      env=env,
      capture_output=True,
      text=True,
  )
  assert out.returncode == 0, out.stderr[-4000:]
  return out


def test_eight_devices_match_one(tmp_path, fmnist_dir):
  overrides = dict(
      data_dir=fmnist_dir,
      batch_size=16,
      eval_batch_size=16,
      num_train_steps=6,
      log_every=1,
      eval_every=6,
      update_every=2,
      progress_bar=False,
  )
  results = {}
  for devices in (1, 8):
    workdir = str(tmp_path / str(devices))
    out = _run_on_devices(_MULTI_DEVICE, overrides, workdir, devices)
    assert out.stdout.strip().endswith(str(devices))
    results[devices] = records.read_metrics(workdir)
  for one, eight in zip(results[1], results[8]):
    assert one["train_loss"] == pytest.approx(eight["train_loss"], rel=1e-4)
    assert one["itop"] == eight["itop"]  # Same mask updates.


def test_fsdp_sharding_trains_like_replicated_and_resumes_across(
    tmp_path, fmnist_dir
):
  # One device: fsdp's mesh axis has size 1, so the numbers are those of
  # the replicated run exactly; what runs is fsdp's path (state shardings,
  # train step out_shardings, checkpoints). A replicated run's checkpoint
  # resumes under fsdp ("sharding" is resumable: restore re-shards) and
  # ends bit-identical to the uninterrupted replicated run.
  base = dict(method="rigl", num_train_steps=8, checkpoint_every=4)
  base.update(eval_every=4, drop_fraction=0.5)
  replicated, fsdp = str(tmp_path / "replicated"), str(tmp_path / "fsdp")
  train.train_and_evaluate(_mlp(fmnist_dir, **base), replicated)
  train.train_and_evaluate(_mlp(fmnist_dir, **base, sharding="fsdp"), fsdp)
  a, b = records.read_metrics(replicated), records.read_metrics(fsdp)
  assert [r["step"] for r in a] == [r["step"] for r in b]
  for x, y in zip(a, b):
    assert y["train_loss"] == pytest.approx(x["train_loss"], rel=1e-6)
    assert x["itop"] == y["itop"]
  assert any(r.get("changed", 0) > 0 for r in b)
  resumed = str(tmp_path / "resumed")
  shutil.copytree(replicated, resumed)
  shutil.rmtree(os.path.join(resumed, "checkpoints", "8"))
  os.remove(os.path.join(resumed, "summary.json"))
  summary = train.train_and_evaluate(
      _mlp(fmnist_dir, **base, sharding="fsdp"), resumed
  )
  assert summary["resumed_from"] == 4
  jax.tree.map(
      np.testing.assert_array_equal,
      _checkpoint(replicated, 8),
      _checkpoint(resumed, 8),
  )
  with pytest.raises(ValueError, match=r"sharding='fsdp2'.*'replicated'"):
    train.train_and_evaluate(
        _mlp(fmnist_dir, **base, sharding="fsdp2"), str(tmp_path / "bad")
    )


def test_fsdp_spec_splits_the_largest_divisible_axis():
  assert train.fsdp_spec((784, 100), 8) == jax.sharding.PartitionSpec(
      "data", None
  )
  assert train.fsdp_spec((100, 784), 8) == jax.sharding.PartitionSpec(
      None, "data"
  )
  # 300 is not a multiple of 8: the largest axis that is.
  assert train.fsdp_spec((16, 300), 8) == jax.sharding.PartitionSpec(
      "data", None
  )
  assert train.fsdp_spec((3, 3, 5, 24), 8) == jax.sharding.PartitionSpec(
      None, None, None, "data"
  )
  for shape in [(784,), (), (3, 5)]:  # Biases, scalars, nothing divisible.
    assert train.fsdp_spec(shape, 8) == jax.sharding.PartitionSpec()


_FSDP_DEVICES = """
import json, sys
import jax
from experiments import optimizers, records, sweep, train
# Record what the optimizer is told: each sparse kernel's sharding.
told = []
build = optimizers.sparseopt.dynamic_sparse
def recording(*args, shardings=None, **kwargs):
  leaves = jax.tree.leaves(shardings)
  told.extend(str(s.spec) for s in leaves if "data" in str(s.spec))
  return build(*args, shardings=shardings, **kwargs)
optimizers.sparseopt.dynamic_sparse = recording
config = sweep.make_config("fmnist_mlp", json.loads(sys.argv[1]))
train.train_and_evaluate(config, sys.argv[2])
print(json.dumps({"devices": jax.device_count(), "split": told}))
"""


def test_fsdp_on_eight_devices_matches_replicated(tmp_path, fmnist_dir):
  # Eight simulated devices: fsdp splits the MLP's kernels (masks, moments)
  # over "data", its mask updates select per shard, and its losses and mask
  # updates are those of the replicated run (float tolerance: sums over
  # split kernels add in another order), also when it resumes a replicated
  # run's checkpoint.
  overrides = dict(
      data_dir=fmnist_dir,
      batch_size=16,
      eval_batch_size=16,
      num_train_steps=6,
      log_every=1,
      eval_every=3,
      checkpoint_every=3,
      update_every=2,
      drop_fraction=0.5,
      progress_bar=False,
  )
  results = {}
  for sharding, workdir in (
      ("replicated", "replicated"),
      ("fsdp", "fsdp"),
      ("fsdp", "resumed"),
  ):
    if workdir == "resumed":
      # The replicated run's checkpoint at step 3, resumed under fsdp: the
      # restore re-shards every array into fsdp's layout.
      shutil.copytree(str(tmp_path / "replicated"), str(tmp_path / workdir))
      shutil.rmtree(str(tmp_path / workdir / "checkpoints" / "6"))
      os.remove(str(tmp_path / workdir / "summary.json"))
    workdir = str(tmp_path / workdir)
    out = _run_on_devices(
        _FSDP_DEVICES, {**overrides, "sharding": sharding}, workdir, 8
    )
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["devices"] == 8
    results[os.path.basename(workdir)] = (
        records.read_metrics(workdir),
        report["split"],
        _strict_json(os.path.join(workdir, "summary.json")),
    )
  replicated, none, _ = results["replicated"]
  fsdp, split, _ = results["fsdp"]
  resumed, _, resumed_summary = results["resumed"]
  assert none == []
  assert split and all("data" in s for s in split), split
  assert resumed_summary["resumed_from"] == 3
  assert len(replicated) == len(fsdp) == len(resumed) == 6
  for a, b, c in zip(replicated, fsdp, resumed):
    assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
    assert c["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
    assert a["itop"] == b["itop"] == c["itop"]  # Same mask updates.
  assert any(r.get("changed", 0) > 0 for r in fsdp)


_TRAIN = """
import json, sys
from experiments import sweep, train
config = sweep.make_config("fmnist_mlp", json.loads(sys.argv[1]))
train.train_and_evaluate(config, sys.argv[2])
"""


def test_sigkill_then_resume_matches_uninterrupted(tmp_path, fmnist_dir):
  # A real crash: the run is SIGKILLed after its first checkpoint (which
  # follows several mask updates), restarted on the same workdir, and must
  # end bit-identical to a run that was never interrupted.
  import signal
  import time

  overrides = dict(
      data_dir=fmnist_dir,
      batch_size=16,
      eval_batch_size=16,
      num_train_steps=600,
      log_every=50,
      eval_every=200,
      checkpoint_every=100,
      update_every=20,
      method="rigl",
      progress_bar=False,
  )
  killed = str(tmp_path / "killed")
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  args = [sys.executable, "-c", _TRAIN, json.dumps(overrides), killed]
  proc = subprocess.Popen(
      args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
  )
  first = os.path.join(killed, "checkpoints", "100")
  deadline = time.monotonic() + 240
  while not os.path.isdir(first) and proc.poll() is None:
    assert time.monotonic() < deadline, "no checkpoint within 240 s"
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
  assert not os.path.exists(
      os.path.join(killed, "summary.json")
  ), "the run finished before it was killed; make it longer"
  subprocess.run(args, env=env, check=True, capture_output=True)
  with open(os.path.join(killed, "summary.json")) as f:
    assert json.load(f)["resumed_from"] >= 100  # Resumed, not restarted.

  full = str(tmp_path / "full")
  train.train_and_evaluate(sweep.make_config("fmnist_mlp", overrides), full)
  jax.tree.map(
      np.testing.assert_array_equal,
      _checkpoint(full, 600),
      _checkpoint(killed, 600),
  )
  assert _deterministic(records.read_metrics(full)) == _deterministic(
      records.read_metrics(killed)
  )
  assert sum(r.get("changed", 0) > 0 for r in records.read_metrics(full)) >= 1


@pytest.mark.parametrize("bn_stats", ["batch", "running"])
def test_batch_stats_correction_trains(tmp_path, fmnist_dir, bn_stats):
  summary = train.train_and_evaluate(
      _mlp(
          fmnist_dir,
          method="rigl",
          sparsity=0.9,
          correction="batch_stats",
          bn_stats=bn_stats,
      ),
      str(tmp_path),
  )
  logged = records.read_metrics(str(tmp_path))
  assert all(np.isfinite(r["train_loss"]) for r in logged if "train_loss" in r)
  assert summary["step"] == 6 and 0 <= summary["final_test_accuracy"] <= 1
  # The factor SparseOpt applies to the BN-followed layer; the head, which
  # no BatchNorm follows, is not corrected.
  assert np.isfinite(logged[-1]["hidden/kernel/max_scale"])
  assert "head/kernel/max_scale" not in logged[-1]


def test_batch_stats_factor_is_batchnorms_not_fan_ins(fmnist_dir):
  config = _mlp(fmnist_dir, method="rigl", sparsity=0.9)
  spec = input_pipeline.DATASETS["fashion_mnist"]
  model = train.create_model(config, spec)
  state, _, _ = train.create_train_state(config, model, spec, 6, 6.0)
  # Train-time statistics of a generated batch.
  images = jax.random.uniform(jax.random.key(0), (16, 28, 28, 1))
  (_, _), variances = flax_utils.apply_with_batch_variances(
      model,
      {"params": state.params, "batch_stats": state.batch_stats},
      images,
      train=True,
      mutable=["batch_stats"],
  )
  assert set(train.bn_pairs(model, config, spec)) == {"hidden/kernel"}
  masks = sparseopt.get_masks(state.opt_state)
  scales = {
      correction: sparseopt.diagnostics.sparseopt_scales(
          masks,
          state.params,
          correction=correction,
          batch_stats=variances,
          epsilon=optimizers.BN_EPSILON,
      )["hidden"]["kernel"]
      for correction in ("fan_in", "batch_stats")
  }
  assert np.all(np.isfinite(scales["batch_stats"]))
  assert not np.allclose(scales["fan_in"], scales["batch_stats"], rtol=1e-2)
  # One train step under each: the updates differ.
  batch = {
      "image": np.asarray(images * 255, np.uint8),
      "label": np.arange(16, dtype=np.int32) % 10,
  }
  after = {}
  for correction in ("fan_in", "batch_stats"):
    run_config = _mlp(
        fmnist_dir, method="rigl", sparsity=0.9, correction=correction
    )
    state, tx, _ = train.create_train_state(run_config, model, spec, 6, 6.0)
    state, metrics = jax.jit(
        functools.partial(
            train.train_step, model=model, tx=tx, config=run_config, spec=spec
        )
    )(state, batch)
    assert bool(metrics["finite"])
    after[correction] = np.asarray(state.params["hidden"]["kernel"])
  assert not np.allclose(after["fan_in"], after["batch_stats"])


def test_models_batchnorm_epsilon_is_the_corrections():
  # correction="batch_stats" adds optimizers.BN_EPSILON; the models' own
  # BatchNorms must add the same, or sigma_i is not the std they divide by.
  spec = input_pipeline.DATASETS["fashion_mnist"]
  epsilons = set()

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.BatchNorm):
      epsilons.add(context.module.epsilon)
    return next_fun(*args, **kwargs)

  for name in ("fmnist_mlp", "fmnist_resnet"):
    config = sweep.make_config(name, {})
    model = train.create_model(config, spec)
    with nn.intercept_methods(record):
      jax.eval_shape(
          lambda: model.init(  # noqa: B023
              jax.random.key(0), jnp.zeros((1, 28, 28, 1)), train=True
          )
      )
    assert epsilons == {optimizers.BN_EPSILON}, name


def test_sigma_diagnostics_are_logged(tmp_path, fmnist_dir):
  config = _config(
      "fmnist_resnet",
      data_dir=fmnist_dir,
      batch_size=16,
      eval_batch_size=40,
      num_train_steps=4,
      log_every=2,
      update_every=2,
      sparsity=0.9,
      sigma_diagnostics=True,
  )
  train.train_and_evaluate(config, str(tmp_path / "on"))
  logged = records.read_metrics(str(tmp_path / "on"))
  pairs = train.bn_pairs(
      train.create_model(config, input_pipeline.DATASETS["fashion_mnist"]),
      config,
      input_pipeline.DATASETS["fashion_mnist"],
  )
  for record in (r for r in logged if "train_loss" in r):
    for kernel in pairs:
      layer = kernel.removesuffix("/kernel")
      for stat in ("corr_fan_in", "slope_fan_in", "corr_norm", "slope_norm"):
        key = f"sigma/{layer}/{stat}"
        # NaN only where the statistic is undefined: a layer whose neurons
        # all have the same fan-in (ERK may keep a small layer dense).
        assert key in record, key
        if not stat.endswith("fan_in"):
          assert np.isfinite(record[key]), key
    corrs = [v for k, v in record.items() if "/corr_" in k and v is not None]
    assert corrs and all(-1 - 1e-5 <= v <= 1 + 1e-5 for v in corrs)
  # The masked ResNet's layers have uneven fan-ins: the paper's estimate
  # has a defined slope somewhere.
  assert any(
      np.isfinite(v)
      for k, v in logged[-1].items()
      if k.endswith("/slope_fan_in") and v is not None
  )
  # A diagnostic only: training is bit-identical without it.
  config.sigma_diagnostics = False
  train.train_and_evaluate(config, str(tmp_path / "off"))
  off = records.read_metrics(str(tmp_path / "off"))
  loss = lambda rs: [r.get("train_loss") for r in rs]
  assert loss(off) == loss(logged)


def test_sigma_regression_on_known_numbers():
  # sigma_i exactly proportional to sqrt(1 - s_i): slope 0.5, correlation 1.
  mask = np.zeros((4, 3), bool)
  mask[:1, 0] = mask[:2, 1] = mask[:4, 2] = True
  kernel = np.where(mask, 1.0, 0.0).astype(np.float32)
  density = mask.mean(0)
  var = 3.0 * density - optimizers.BN_EPSILON
  out = train.sigma_diagnostics(
      {"d": {"kernel": kernel}},
      {"d": {"kernel": mask}},
      {"d": {"kernel": jnp.asarray(var, jnp.float32)}},
  )
  assert float(out["sigma/d/slope_fan_in"]) == pytest.approx(0.5, abs=1e-5)
  assert float(out["sigma/d/corr_fan_in"]) == pytest.approx(1.0, abs=1e-5)
  # ||w_i|| = sqrt(fan-in) here, so sigma_i is proportional to it too.
  assert float(out["sigma/d/slope_norm"]) == pytest.approx(1.0, abs=1e-4)


def test_recalibration_after_mask_updates(tmp_path, fmnist_dir):
  # One mask update, at step 3 (update_every 2, end 0.5 * 8); evaluations
  # at 5, which follows it, and 8, which does not.
  base = dict(
      method="rigl",
      num_train_steps=8,
      end_fraction=0.5,
      drop_fraction=0.5,
      eval_every=5,
      checkpoint_every=2,
  )
  off = str(tmp_path / "off")
  train.train_and_evaluate(_mlp(fmnist_dir, **base), off)
  config = _mlp(fmnist_dir, recalibrate_batches=2, **base)
  on = str(tmp_path / "on")
  train.train_and_evaluate(config, on)
  logged_off, logged_on = records.read_metrics(off), records.read_metrics(on)
  evals = {r["step"]: r for r in logged_on if "test_accuracy" in r}
  assert {s: r["recalibrated"] for s, r in evals.items()} == {5: 1.0, 8: 0.0}
  # Evaluation only: training is unchanged, the evaluations are not.
  loss = lambda rs: [r.get("train_loss") for r in rs]
  assert loss(logged_on) == loss(logged_off)
  jax.tree.map(
      np.testing.assert_array_equal,
      _checkpoint(off, 6)["batch_stats"],
      _checkpoint(on, 6)["batch_stats"],
  )
  test_loss = lambda rs: [r["test_loss"] for r in rs if "test_loss" in r]
  (at5, at8), (plain5, plain8) = test_loss(logged_on), test_loss(logged_off)
  assert at5 != plain5 and at8 == plain8

  # The recalibrated statistics are the equal average of the K batches'.
  spec = input_pipeline.DATASETS["fashion_mnist"]
  model = train.create_model(config, spec)
  state = _checkpoint(on, 4)
  dataset = input_pipeline.load_dataset("fashion_mnist", fmnist_dir)
  stream = input_pipeline.train_batches(
      dataset,
      global_batch_size=16,
      seed=train.recalibration_seed(config.seed, 5),
      num_threads=1,
  )
  batches = [next(stream) for _ in range(2)]
  own = []
  for batch in batches:
    images = input_pipeline.normalize(batch["image"], spec, jnp.float32)
    _, updates = model.apply(
        {"params": state["params"], "batch_stats": state["batch_stats"]},
        images,
        train=True,
        mutable=["batch_stats"],
    )
    own.append(updates["batch_stats"])
  momentum = train.bn_momentum(model, config, spec)
  expected = jax.tree.map(
      lambda old, a, b: ((a - momentum * old) + (b - momentum * old))
      / (2 * (1 - momentum)),
      state["batch_stats"],
      *own,
  )
  got = train.recalibration_step(
      state["params"],
      state["batch_stats"],
      batches[0],
      jnp.int32(0),
      jax.random.key(0),
      model=model,
      config=config,
      spec=spec,
      momentum=momentum,
  )
  got = train.recalibration_step(
      state["params"],
      got,
      batches[1],
      jnp.int32(1),
      jax.random.key(1),
      model=model,
      config=config,
      spec=spec,
      momentum=momentum,
  )
  jax.tree.map(
      functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6),
      got,
      expected,
  )

  # Resumed between the mask update at 3 and the evaluation at 5: the log
  # says an update is pending, and the run matches the uninterrupted one.
  part = str(tmp_path / "part")
  shutil.copytree(on, part)
  for step in ("6", "8"):
    shutil.rmtree(os.path.join(part, "checkpoints", step))
  os.remove(os.path.join(part, "summary.json"))
  assert train.train_and_evaluate(config, part)["resumed_from"] == 4
  assert _deterministic(records.read_metrics(part)) == _deterministic(logged_on)
  with pytest.raises(ValueError, match="recalibrate_batches=2 needs"):
    fields.validate(_mlp(fmnist_dir, recalibrate_batches=2, checkpoint_every=3))


def _final_masks(workdir, step):
  """The saved masks of a sparse run at ``step``: ``{path: bool array}``."""
  # Restored without a target, DynamicSparseState is a dict of its fields.
  masks = _checkpoint(workdir, step)["opt_state"]["masks"]
  return {
      sparseopt.path_str(p): np.asarray(m, bool)
      for p, m in jax.tree_util.tree_leaves_with_path(masks)
      if m is not None and np.ndim(m) >= 2
  }


def test_gmp_prunes_from_dense_to_the_final_sparsity(tmp_path, fmnist_dir):
  # 8 steps, pruning at steps 2, 4, 6 (start 0.25, end 0.75 of training).
  config = _mlp(
      fmnist_dir,
      method="gmp",
      sparsity=0.9,
      num_train_steps=8,
      gmp_start_fraction=0.25,
      gmp_end_fraction=0.75,
      checkpoint_every=2,
      eval_every=4,
  )
  assert optimizers.gmp_steps(config, 8) == (2, 6)
  flops = train.train_and_evaluate(config, str(tmp_path))["flops"]
  # Dense for a while, then sparser: between the final ratio and dense.
  assert flops["inference_ratio"] < flops["training_ratio"] < 1.0
  logged = {r["step"]: r for r in records.read_metrics(str(tmp_path))}
  # Dense until the first pruning step.
  assert logged[2]["sparsity"] == pytest.approx(0.0, abs=1e-6)
  assert 0.0 < logged[4]["sparsity"] < 0.9
  assert logged[8]["sparsity"] == pytest.approx(0.9, abs=2e-3)
  total = sum(m.size for m in _final_masks(str(tmp_path), 8).values())
  kept = sum(m.sum() for m in _final_masks(str(tmp_path), 8).values())
  assert 1 - kept / total == pytest.approx(0.9, abs=2e-3)


@pytest.mark.parametrize(
    "method, structure, sparsity",
    [("rigl", "constant_fan_in", 0.9), ("static", "2:4", 0.5)],
)
def test_structured_masks_keep_their_structure(
    tmp_path, fmnist_dir, method, structure, sparsity
):
  config = _mlp(
      fmnist_dir, method=method, structure=structure, sparsity=sparsity
  )
  train.train_and_evaluate(config, str(tmp_path))
  masks = _final_masks(str(tmp_path), 6)
  for name, m in masks.items():
    if structure == "constant_fan_in":
      fan_in = m.reshape(-1, m.shape[-1]).sum(axis=0)
      assert (fan_in == fan_in[0]).all(), name
    else:
      # Every neuron keeps exactly 2 of each 4 consecutive inputs.
      groups = m.reshape(-1, m.shape[-1]).T.reshape(m.shape[-1], -1, 4)
      assert (groups.sum(axis=-1) == 2).all(), name


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"structure": "2-4"}, "structure='2-4': expected one of"),
        ({"structure": "4:2"}, "0 < n < m"),
        ({"structure": "2:4"}, r"sparsity must be 1 - n/m = 0.5"),
        ({"structure": "2:4", "method": "dense"}, "needs a sparse method"),
        ({"method": "gmp", "init": "fan_in"}, "method='gmp'"),
        (
            {"gmp_start_fraction": 0.8, "gmp_end_fraction": 0.5},
            "gmp_start_fraction=0.8 must be <=",
        ),
    ],
)
def test_bad_structure_and_gmp_fields_are_named(fmnist_dir, overrides, message):
  with pytest.raises(fields.ConfigError, match=message):
    fields.validate(_mlp(fmnist_dir, **overrides))


def test_structure_parses_from_the_command_line(tmp_path, fmnist_dir):
  workdir = str(tmp_path / "w")
  out = _cli(
      workdir,
      f"--config.data_dir={fmnist_dir}",
      "--config.batch_size=16",
      "--config.eval_batch_size=16",
      "--config.num_train_steps=2",
      "--config.method=gmp",
      "--config.structure=2:4",
      "--config.sparsity=0.5",
      "--config.update_every=1",
  )
  assert out.returncode == 0, out.stderr
  config = _strict_json(os.path.join(workdir, "summary.json"))["config"]
  assert config["structure"] == "2:4" and config["method"] == "gmp"


def test_gmp_resumes_bit_identically(tmp_path, fmnist_dir):
  # gmp's state holds a typed PRNG key; a resume must restore it.
  config = _mlp(fmnist_dir, method="gmp", sparsity=0.9, gmp_start_fraction=0.0)
  full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
  train.train_and_evaluate(config, full)
  train.train_and_evaluate(config, cut)
  os.remove(os.path.join(cut, "summary.json"))
  shutil.rmtree(os.path.join(cut, "checkpoints", "6"))
  assert train.train_and_evaluate(config, cut)["resumed_from"] == 3
  a, b = _checkpoint(full, 6), _checkpoint(cut, 6)
  jax.tree.map(np.testing.assert_array_equal, a["params"], b["params"])
  assert _final_masks(full, 6).keys() == _final_masks(cut, 6).keys()
  for name, m in _final_masks(full, 6).items():
    np.testing.assert_array_equal(m, _final_masks(cut, 6)[name])
