"""What a run leaves in its workdir, and how to read it back.

Defined once here: the training loop (`experiments.workdir`) writes these
files and the studies (`experiments.studies`) read them, without importing
the training code. Nothing here imports jax, flax or orbax.

A workdir holds:

* ``config.json``: the config the run was started with;
* ``metrics.jsonl``: one JSON object per logged step (``step`` plus metrics);
  committed results store it gzip-compressed as ``metrics.jsonl.gz``, which
  every reader here accepts in its place (`compress_metrics` writes it). The
  record of a log window that held mask updates lists their steps under
  ``mask_update_steps`` (`MASK_UPDATE_STEPS`);
* ``summary.json``: written once the run has finished;
* ``checkpoints/``: orbax checkpoints (never committed);
* ``tensorboard/``: TensorBoard event files of the same records, for
  watching a run live (never committed).
"""

import ast
from collections.abc import Sequence
import gzip
import json
import os
from typing import Any

from experiments.configs import default as default_config

CONFIG = "config.json"
SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
METRICS_GZ = METRICS + ".gz"
CHECKPOINTS = "checkpoints"
# Key of a metrics record: the steps of the mask updates in its log window.
MASK_UPDATE_STEPS = "mask_update_steps"
TENSORBOARD = "tensorboard"


def metrics_path(workdir: str) -> str | None:
  """The metrics log of ``workdir``: plain if present, else compressed."""
  for name in (METRICS, METRICS_GZ):
    path = os.path.join(workdir, name)
    if os.path.exists(path):
      return path
  return None


def has_metrics(workdir: str) -> bool:
  return metrics_path(workdir) is not None


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """The records of ``workdir``'s metrics log (plain or gzip), in step order."""
  path = metrics_path(workdir)
  if path is None:
    raise FileNotFoundError(f"{workdir} has no {METRICS} or {METRICS_GZ}.")
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt") as f:
    return [json.loads(line) for line in f if line.strip()]


def config_from_json(saved: dict[str, Any]) -> dict[str, Any]:
  """A saved config with fields added since it was written filled in.

  A field missing from an older run's config takes its value from
  ``configs/default.py``: new fields are added with defaults that reproduce
  the behaviour of the code before them.
  """
  defaults = json.loads(default_config.get_config().to_json_best_effort())
  return {**defaults, **saved}


def load_saved_config(workdir: str) -> dict[str, Any]:
  """``workdir/config.json``, completed by `config_from_json`."""
  with open(os.path.join(workdir, CONFIG)) as f:
    return config_from_json(json.load(f))


def is_finished(workdir: str) -> bool:
  return os.path.exists(os.path.join(workdir, SUMMARY))


def compress_metrics(workdir: str) -> bool:
  """Replaces ``workdir``'s ``metrics.jsonl`` by ``metrics.jsonl.gz``.

  The output depends on the log's bytes alone (no file name, mtime 0), so
  compressing the same log again writes the same bytes. The plain log is
  removed only once the compressed one reads back to the same bytes.

  Returns:
    Whether there was a plain log to compress.
  """
  plain = os.path.join(workdir, METRICS)
  if not os.path.exists(plain):
    return False
  with open(plain, "rb") as f:
    data = f.read()
  packed = gzip.compress(data, compresslevel=9, mtime=0)
  if gzip.decompress(packed) != data:
    raise OSError(f"{plain} did not survive compression.")
  target = os.path.join(workdir, METRICS_GZ)
  with open(target + ".tmp", "wb") as f:
    f.write(packed)
  os.replace(target + ".tmp", target)
  os.remove(plain)
  return True


def parse_sets(sets: Sequence[str]) -> dict[str, Any]:
  """``["a=1", "b=x"]`` -> ``{"a": 1, "b": "x"}`` (Python literals or strings).

  The syntax of config fields on the command line (``--set``, ``--where``),
  shared by the sweep runner and the studies.
  """
  out = {}
  for item in sets:
    key, sep, value = item.partition("=")
    if not sep:
      raise ValueError(f"Expected field=value, got {item!r}.")
    try:
      out[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[key] = value
  return out
