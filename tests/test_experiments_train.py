"""End-to-end tests of the training CLI pieces on generated or mock data."""

import glob
import json
import os
import shutil
import struct
import subprocess
import sys

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds
from tensorboardX.proto import event_pb2

from experiments import fake_data
from experiments import records
from experiments import sweep
from experiments import train
import sparseopt_jax as sparseopt

_TIMING = ("step_time",)


@pytest.fixture(scope="module")
def fmnist_dir(tmp_path_factory):
  return fake_data.write_fashion_mnist(
      str(tmp_path_factory.mktemp("fmnist")), num_train=96, num_test=40)


def _config(name, **overrides):
  config = sweep.make_config(name, {"progress_bar": False, **overrides})
  return config


def _mlp(fmnist_dir, **overrides):
  base = dict(data_dir=fmnist_dir, batch_size=16, eval_batch_size=16,
              num_train_steps=6, log_every=2, eval_every=3,
              checkpoint_every=3, update_every=2)
  return _config("fmnist_mlp", **{**base, **overrides})


def _deterministic(logged):
  return [{k: v for k, v in r.items() if k not in _TIMING} for r in logged]


def _checkpoint(workdir, step):
  path = os.path.join(workdir, "checkpoints", str(step), "default")
  return ocp.PyTreeCheckpointer().restore(path)


def _event_files(workdir):
  """The events of each TensorBoard event file of ``workdir``, oldest first.

  Parsed with tensorboardX's protobuf classes, so the test needs neither
  TensorFlow nor TensorBoard.
  """
  files = []
  for path in sorted(glob.glob(os.path.join(workdir, "tensorboard",
                                            "events.out.tfevents.*")),
                     key=os.path.getmtime):
    events = []
    with open(path, "rb") as f:
      data = f.read()
    # TFRecord framing: u64 length, u32 length CRC, payload, u32 payload CRC.
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      payload = data[offset + 12:offset + 12 + length]
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


# Every method and every optimizer at least once (rigl + sparseopt is in the
# resume test); the full product would only repeat the same code paths.
@pytest.mark.parametrize("method, optimizer", [
    ("dense", "sparseopt"), ("static", "sgd"), ("set", "sparseopt+adam"),
    ("rigl", "adam")])
def test_every_method_and_optimizer_trains(tmp_path, fmnist_dir, method,
                                           optimizer):
  summary = train.train_and_evaluate(
      _mlp(fmnist_dir, method=method, optimizer=optimizer, sparsity=0.9),
      str(tmp_path))
  logged = records.read_metrics(str(tmp_path))
  assert [r["step"] for r in logged] == [2, 3, 4, 6]
  assert all(np.isfinite(r["train_loss"]) for r in logged if "train_loss" in r)
  assert summary["step"] == 6 and 0 <= summary["final_test_accuracy"] <= 1
  if method == "dense":
    assert "itop" not in logged[-1]
  else:
    # Sparsity is kept exactly through mask updates (ERK over two layers).
    assert logged[-1]["sparsity"] == pytest.approx(0.9, abs=2e-3)
    assert logged[-1]["itop"] >= 1 - logged[-1]["sparsity"] - 1e-6
    # The fan-in histogram of every sparse layer covers all its neurons.
    hist = {}
    for key, value in logged[-1].items():
      if "/fan_in/" in key:
        layer = key.split("/fan_in/")[0]
        hist[layer] = hist.get(layer, 0.0) + value
    neurons = {sparseopt.path_str(path): float(x.shape[-1])
               for path, x in jax.tree_util.tree_leaves_with_path(
                   _checkpoint(str(tmp_path), 6)["params"]) if x.ndim >= 2}
    assert hist and all(hist[layer] == neurons[layer] for layer in hist)
  assert os.path.exists(tmp_path / "summary.json")


def test_summary_records_environment(tmp_path, fmnist_dir):
  summary = train.train_and_evaluate(_mlp(fmnist_dir, num_train_steps=2),
                                     str(tmp_path))
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
      _mlp(fmnist_dir, method="rigl", end_fraction=1.0), str(tmp_path))
  logged = records.read_metrics(str(tmp_path))
  updates = {r["step"]: r["mask_update_steps"] for r in logged
             if "mask_update_steps" in r}
  assert updates == {4: [3], 6: [5]}
  # The windows with an update are the ones that logged its jump.
  assert set(updates) == {r["step"] for r in logged
                          if any(k.startswith("jump/") for k in r)}


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
      str(tmp_path))
  assert summary["final_test_accuracy"] > 0.5  # Chance is 0.1.


def test_resume_is_bit_identical(tmp_path, fmnist_dir):
  # Mask updates at steps 2 and 4 (end 0.75 * 8 = 6); the resumed part
  # (steps 5-8 from the checkpoint at 4) contains one.
  config = _mlp(fmnist_dir, method="rigl", num_train_steps=8,
                checkpoint_every=4, eval_every=4, drop_fraction=0.5)
  full, part = str(tmp_path / "full"), str(tmp_path / "part")
  train.train_and_evaluate(config, full)
  shutil.copytree(full, part)
  shutil.rmtree(os.path.join(part, "checkpoints", "8"))
  os.remove(os.path.join(part, "summary.json"))
  with open(os.path.join(part, "metrics.jsonl"), "a") as f:
    f.write(json.dumps({"step": 6, "train_loss": -1.0}) + "\n")  # A killed run's tail.
  summary = train.train_and_evaluate(config, part)
  assert summary["resumed_from"] == 4
  # TensorBoard: the resumed session writes a new event file that purges
  # the first session's steps after 4 and logs only steps after 4.
  first, resumed = _event_files(part)
  assert sorted(_scalars(first)["train_loss"]) == [2, 4, 6, 8]
  assert [e.step for e in resumed if e.HasField("session_log")] == [5]
  assert sorted(_scalars(resumed)["train_loss"]) == [6, 8]
  jax.tree.map(np.testing.assert_array_equal, _checkpoint(full, 8),
               _checkpoint(part, 8))
  assert (_deterministic(records.read_metrics(full))
          == _deterministic(records.read_metrics(part)))
  assert any(r.get("changed", 0) > 0 for r in records.read_metrics(full))


def test_finished_run_is_not_retrained(tmp_path, fmnist_dir):
  config = _mlp(fmnist_dir)
  first = train.train_and_evaluate(config, str(tmp_path))
  again = train.train_and_evaluate(config, str(tmp_path))
  assert again["resumed_from"] == 6
  assert again["final_test_accuracy"] == first["final_test_accuracy"]


def test_refuses_incompatible_workdir(tmp_path, fmnist_dir):
  train.train_and_evaluate(_mlp(fmnist_dir), str(tmp_path))
  with pytest.raises(ValueError, match=r"different config \(sparsity"):
    train.train_and_evaluate(_mlp(fmnist_dir, sparsity=0.8), str(tmp_path))
  # Bookkeeping fields may change.
  train.train_and_evaluate(_mlp(fmnist_dir, log_every=1), str(tmp_path))


@pytest.mark.parametrize("field, value, message", [
    ("method", "lottery", "method='lottery'"),
    ("optimizer", "lion", "optimizer='lion'"),
    ("sparsity", 1.0, "sparsity=1.0"),
    ("correct_filter", "head", "correct_filter='head'"),
    ("batch_size", 0, "batch_size=0"),
])
def test_bad_config_values_are_named(tmp_path, fmnist_dir, field, value,
                                     message):
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(_mlp(fmnist_dir, **{field: value}), str(tmp_path))


def test_missing_dataset_says_how_to_get_it(tmp_path):
  with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion"):
    train.train_and_evaluate(_mlp(str(tmp_path / "empty")), str(tmp_path / "w"))


def test_fmnist_resnet_preset_runs(tmp_path, fmnist_dir):
  config = _config("fmnist_resnet", data_dir=fmnist_dir, batch_size=16,
                   eval_batch_size=40, num_train_steps=2, log_every=1,
                   update_every=1, end_fraction=1.0)
  summary = train.train_and_evaluate(config, str(tmp_path))
  logged = records.read_metrics(str(tmp_path))
  assert np.isfinite(logged[-1]["train_loss"]) and summary["step"] == 2
  assert logged[-1]["changed"] > 0  # The mask update at step 1 regrew weights.


def test_resnet20_cifar100_preset_runs_on_mock_data(tmp_path):
  config = _config("resnet20_cifar100", batch_size=8, eval_batch_size=8,
                   num_train_steps=2, log_every=1, eval_every=2,
                   update_every=1, end_fraction=1.0)
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
  config = _config("resnet50_imagenet", batch_size=2, eval_batch_size=4,
                   image_size=32, width=8, dtype="float32", num_train_steps=1,
                   num_data_threads=1)
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


def test_eight_devices_match_one(tmp_path, fmnist_dir):
  overrides = dict(data_dir=fmnist_dir, batch_size=16, eval_batch_size=16,
                   num_train_steps=6, log_every=1, eval_every=6,
                   update_every=2, progress_bar=False)
  results = {}
  for devices in (1, 8):
    workdir = str(tmp_path / str(devices))
    env = {**os.environ, "XLA_FLAGS":
           f"--xla_force_host_platform_device_count={devices}",
           "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", _MULTI_DEVICE, json.dumps(overrides), workdir],
        env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith(str(devices))
    results[devices] = records.read_metrics(workdir)
  for one, eight in zip(results[1], results[8]):
    assert one["train_loss"] == pytest.approx(eight["train_loss"], rel=1e-4)
    assert one["itop"] == eight["itop"]  # Same mask updates.


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
  overrides = dict(data_dir=fmnist_dir, batch_size=16, eval_batch_size=16,
                   num_train_steps=600, log_every=50, eval_every=200,
                   checkpoint_every=100, update_every=20, method="rigl",
                   progress_bar=False)
  killed = str(tmp_path / "killed")
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  args = [sys.executable, "-c", _TRAIN, json.dumps(overrides), killed]
  proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE)
  first = os.path.join(killed, "checkpoints", "100")
  deadline = time.monotonic() + 240
  while not os.path.isdir(first) and proc.poll() is None:
    assert time.monotonic() < deadline, "no checkpoint within 240 s"
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
  assert not os.path.exists(os.path.join(killed, "summary.json")), (
      "the run finished before it was killed; make it longer")
  subprocess.run(args, env=env, check=True, capture_output=True)
  with open(os.path.join(killed, "summary.json")) as f:
    assert json.load(f)["resumed_from"] >= 100  # Resumed, not restarted.

  full = str(tmp_path / "full")
  train.train_and_evaluate(sweep.make_config("fmnist_mlp", overrides), full)
  jax.tree.map(np.testing.assert_array_equal, _checkpoint(full, 600),
               _checkpoint(killed, 600))
  assert (_deterministic(records.read_metrics(full))
          == _deterministic(records.read_metrics(killed)))
  assert sum(r.get("changed", 0) > 0 for r in records.read_metrics(full)) >= 1
