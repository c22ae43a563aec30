"""Multi-process training: two local CPU processes against one process.

Two processes on one machine, each with one CPU device, talk over gloo
through ``jax.distributed`` exactly as hosts of a cluster would (a
coordinator, a process id each, each loading its own slice of the global
batch). A single process with two simulated devices has the same global
device count and batch sharding, so the two runs must agree.
"""

import glob
import json
import os
import re
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments import fake_data
from experiments import main as main_lib
from experiments import records

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TIMEOUT_S = 150
_TIMING = ("step_time", "steps_per_sec", "compile_time")


def _gloo_available():
  try:
    from jax._src.lib import _jax  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  return hasattr(_jax, "make_gloo_tcp_collectives")


pytestmark = pytest.mark.skipif(
    not _gloo_available(),
    reason="this jaxlib has no gloo CPU collectives",
)


@pytest.fixture(scope="module")
def fmnist_dir(tmp_path_factory):
  return fake_data.write_fashion_mnist(
      str(tmp_path_factory.mktemp("fmnist")), num_train=96, num_test=40
  )


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _command(workdir, fmnist_dir, *flags):
  return [
      sys.executable,
      "-m",
      "experiments.main",
      "--config=experiments/configs/fmnist_mlp.py",
      f"--workdir={workdir}",
      f"--config.data_dir={fmnist_dir}",
      "--config.progress_bar=False",
      "--config.batch_size=16",
      "--config.eval_batch_size=16",
      "--config.num_train_steps=4",
      "--config.log_every=1",
      "--config.eval_every=4",
      "--config.checkpoint_every=4",
      "--config.update_every=2",  # The masks change within the run.
      "--config.end_fraction=1.0",
      *flags,
  ]


def _env(devices, **extra):
  env = {
      k: v
      for k, v in os.environ.items()
      if k not in main_lib._PROCESS_FLAGS.values()  # pylint: disable=protected-access
  }
  return {
      **env,
      "JAX_PLATFORMS": "cpu",
      "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
      "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
      **extra,
  }


def _wait(processes):
  """Waits for every process; returns their (returncode, output) pairs."""
  results = []
  try:
    for p in processes:
      out, _ = p.communicate(timeout=_TIMEOUT_S)
      results.append((p.returncode, out))
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()
        p.communicate()
  return results


def _final_state(workdir, step):
  """The checkpointed train state at ``step`` as numpy arrays.

  Restored as numpy so that the single-device test process can read a
  checkpoint saved by two processes.
  """
  path = os.path.join(workdir, "checkpoints", str(step), records.STATE_ITEM)
  checkpointer = ocp.PyTreeCheckpointer()
  metadata = checkpointer.metadata(path)
  tree = getattr(getattr(metadata, "item_metadata", metadata), "tree", None)
  tree = metadata if tree is None else tree
  restore_args = jax.tree.map(
      lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree
  )
  return checkpointer.restore(path, restore_args=restore_args)


def test_two_processes_match_one_process_on_two_devices(tmp_path, fmnist_dir):
  multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
  address = f"127.0.0.1:{_free_port()}"
  # Process 0 is told by flags, process 1 by the environment variables the
  # docs name: both ways must work.
  processes = [
      subprocess.Popen(
          _command(
              multi,
              fmnist_dir,
              "--distributed",
              f"--coordinator_address={address}",
              "--num_processes=2",
              "--process_id=0",
          ),
          env=_env(1),
          cwd=_ROOT,
          stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT,
          text=True,
      ),
      subprocess.Popen(
          _command(multi, fmnist_dir, "--distributed"),
          env=_env(
              1,
              JAX_COORDINATOR_ADDRESS=address,
              JAX_NUM_PROCESSES="2",
              JAX_PROCESS_ID="1",
          ),
          cwd=_ROOT,
          stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT,
          text=True,
      ),
  ]
  for index, (code, out) in enumerate(_wait(processes)):
    assert code == 0, f"process {index} failed:\n{out[-3000:]}"
  single_run = subprocess.run(
      _command(single, fmnist_dir),
      env=_env(2),
      cwd=_ROOT,
      capture_output=True,
      text=True,
      timeout=_TIMEOUT_S,
  )
  assert single_run.returncode == 0, single_run.stderr[-3000:]

  # Only process 0 writes the records: one line per logged step.
  logged = {w: records.read_metrics(w) for w in (multi, single)}
  assert [r["step"] for r in logged[multi]] == [1, 2, 3, 4]
  assert [r["step"] for r in logged[multi]] == [
      r["step"] for r in logged[single]
  ]
  assert len(glob.glob(os.path.join(multi, "tensorboard", "events.*"))) == 1
  with open(os.path.join(multi, "summary.json")) as f:
    summary = json.load(f)
  assert summary["step"] == 4
  for two, one in zip(logged[multi], logged[single]):
    assert two.keys() == one.keys()
    assert two["train_loss"] == pytest.approx(one["train_loss"], rel=1e-5)
    assert two["itop"] == one["itop"]  # The same mask updates.
    for key, value in one.items():
      # The diagnostics (ratios of small differences, some of them) hold to
      # a few float32 ulps less than the loss.
      if key not in _TIMING and isinstance(value, (int, float)):
        assert two[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
  assert any(r["changed"] > 0 for r in logged[single])  # Masks did move.

  two, one = _final_state(multi, 4), _final_state(single, 4)
  masks = jax.tree.map(
      np.array_equal, two["opt_state"]["masks"], one["opt_state"]["masks"]
  )
  assert all(jax.tree.leaves(masks))
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
      two["params"],
      one["params"],
  )


@pytest.mark.parametrize(
    "distributed, values, environ, result",
    [
        (False, {}, {"JAX_NUM_PROCESSES": "x"}, None),
        (True, {}, {}, {}),  # JAX's cluster detection.
        (
            True,
            {"num_processes": 2, "process_id": 1},
            {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_PROCESS_ID": "0"},
            {"coordinator_address": "h:1", "num_processes": 2, "process_id": 1},
        ),
    ],
)
def test_distributed_options(distributed, values, environ, result):
  assert main_lib.distributed_options(distributed, values, environ) == result


@pytest.mark.parametrize(
    "distributed, values, environ, message",
    [
        (
            True,
            {"num_processes": 2},
            {},
            "--coordinator_address (or $JAX_COORDINATOR_ADDRESS) and "
            "--process_id (or $JAX_PROCESS_ID)",
        ),
        (
            True,
            {},
            {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"},
            "needs --process_id (or $JAX_PROCESS_ID)",
        ),
        (
            True,
            {"coordinator_address": "h:1", "num_processes": 2},
            {"JAX_PROCESS_ID": "one"},
            "$JAX_PROCESS_ID='one'",
        ),
        (
            True,
            {"coordinator_address": "h:1", "num_processes": 2},
            {"JAX_PROCESS_ID": "2"},
            "--process_id=2",
        ),
        (False, {"process_id": 0}, {}, "add --distributed"),
    ],
)
def test_distributed_options_name_the_flag(
    distributed, values, environ, message
):
  with pytest.raises(ValueError, match=re.escape(message)):
    main_lib.distributed_options(distributed, values, environ)
