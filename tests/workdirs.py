"""Run folders as training leaves them, for the tests of the study tools."""

import gzip
import json
import os

from experiments import records


def write_workdir(
    root, name, config, logged, *, finished=True, compressed=False
):
  """A workdir as training leaves it (``compressed``: as committed)."""
  workdir = os.path.join(root, name)
  os.makedirs(workdir)
  with open(os.path.join(workdir, records.CONFIG), "w") as f:
    json.dump(config, f)
  text = "".join(json.dumps(r) + "\n" for r in logged)
  if compressed:
    with open(os.path.join(workdir, records.METRICS_GZ), "wb") as f:
      f.write(gzip.compress(text.encode(), mtime=0))
  else:
    with open(os.path.join(workdir, records.METRICS), "w") as f:
      f.write(text)
  if finished:
    with open(os.path.join(workdir, records.SUMMARY), "w") as f:
      json.dump({"status": records.FINISHED, "step": logged[-1]["step"]}, f)
  return workdir


def curve_log(curve):
  """Train and eval records every 100 steps, ``curve`` the test accuracy."""
  logged = []
  for i, acc in enumerate(curve):
    logged.append({"step": 100 * (i + 1), "train_loss": 1.0})
    logged.append({"step": 100 * (i + 1), "test_accuracy": acc})
  return logged


def fake_workdir(
    root,
    name,
    optimizer,
    seed,
    curve,
    sparsity=0.95,
    finished=True,
    learning_rate=0.05,
    compressed=False,
):
  """A finished RigL run of ``optimizer`` whose test accuracy is ``curve``."""
  config = {
      "method": "rigl",
      "sparsity": sparsity,
      "optimizer": optimizer,
      "seed": seed,
      "learning_rate": learning_rate,
      "log_every": 10,
  }
  return write_workdir(
      root,
      name,
      config,
      curve_log(curve),
      finished=finished,
      compressed=compressed,
  )
