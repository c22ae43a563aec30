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
* ``summary.json``: written once the run has finished (``status``
  ``"finished"``) or diverged (``"diverged"``, with ``diverged_at_step``),
  holding the config too;
* ``checkpoints/``: orbax checkpoints (never committed), each holding the
  state (item ``state``) and the config it was written under (``config``),
  against which a resume is checked;
* ``corrupt_checkpoints/``: checkpoints that failed to restore, moved aside
  (never deleted) when a resume fell back to an older one;
* ``tensorboard/``: TensorBoard event files of the same records, for
  watching a run live (never committed).
"""

import ast
from collections.abc import Iterable, Sequence
import gzip
import json
import math
import os
from typing import Any
import warnings

from experiments.configs import default as default_config

CONFIG = "config.json"
SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
METRICS_GZ = METRICS + ".gz"
CHECKPOINTS = "checkpoints"
CORRUPT_CHECKPOINTS = "corrupt_checkpoints"
# The items of an orbax checkpoint: the train state and the run's config.
STATE_ITEM = "state"
CONFIG_ITEM = "config"
# summary.json's ``status``.
FINISHED = "finished"
DIVERGED = "diverged"
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


def finite_json(value: Any) -> Any:
  """``value`` with every non-finite float replaced by None (JSON null).

  JSON has no NaN or infinity; Python's ``json`` would write them as bare
  ``NaN``/``Infinity``, which other readers reject.
  """
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, dict):
    return {k: finite_json(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [finite_json(v) for v in value]
  return value


def dumps(value: Any, **kwargs) -> str:
  """Valid JSON of ``value`` (non-finite floats as null, sorted keys)."""
  return json.dumps(
      finite_json(value), allow_nan=False, sort_keys=True, **kwargs
  )


def write_json(path: str, value: Any) -> None:
  """Writes ``dumps(value)`` to ``path`` atomically (temp file + rename).

  A reader, or a run killed mid-write, sees the old file or the new one,
  never half of one.
  """
  with open(path + ".tmp", "w") as f:
    f.write(dumps(value, indent=2) + "\n")
  os.replace(path + ".tmp", path)


def parse_metrics_lines(
    lines: Iterable[str], path: str = METRICS
) -> tuple[list[dict[str, Any]], bool]:
  """The records of a metrics log's lines, and whether its last was torn.

  A run killed while appending leaves a partial last line: it is dropped
  (the resumed run logs that step again). A bad line anywhere else is
  damage that dropping would hide, and raises.

  Raises:
    ValueError: a line other than the last is not a JSON object.
  """
  lines = [line for line in lines if line.strip()]
  out = []
  for i, line in enumerate(lines):
    try:
      record = json.loads(line)
      if not isinstance(record, dict) or "step" not in record:
        raise ValueError("not a record with a step")
    except ValueError as e:
      if i == len(lines) - 1:
        return out, True
      raise ValueError(
          f"{path}: line {i + 1} of {len(lines)} is not a metrics record "
          f"({e}): {line[:80]!r}."
      ) from e
    out.append(record)
  return out, False


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """The records of ``workdir``'s metrics log (plain or gzip), in step order.

  A torn last line (a run killed mid-write) is dropped with a warning.
  """
  path = metrics_path(workdir)
  if path is None:
    raise FileNotFoundError(f"{workdir} has no {METRICS} or {METRICS_GZ}.")
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt") as f:
    out, torn = parse_metrics_lines(f, path)
  if torn:
    warnings.warn(f"{path}: dropped a torn last line.", stacklevel=2)
  return out


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
  """Whether ``workdir`` holds a run that ended (finished or diverged)."""
  return os.path.exists(os.path.join(workdir, SUMMARY))


def has_diverged(workdir: str) -> bool:
  """Whether ``workdir``'s run ended by diverging (its summary says so)."""
  if not is_finished(workdir):
    return False
  return read_summary(workdir).get("status") == DIVERGED


def read_summary(workdir: str) -> dict[str, Any]:
  """``workdir/summary.json``."""
  with open(os.path.join(workdir, SUMMARY)) as f:
    return json.load(f)


def config_differences(
    saved: dict[str, Any], current: dict[str, Any]
) -> list[str]:
  """``"field: saved x, now y"`` for each field that changes the numbers.

  ``saved`` is completed by `config_from_json` first; fields in
  ``configs.default.RESUMABLE_FIELDS`` may differ.
  """
  saved = config_from_json(saved)
  return [
      f"{k}: saved {saved.get(k)!r}, now {current.get(k)!r}"
      for k in sorted(set(saved) | set(current))
      if k not in default_config.RESUMABLE_FIELDS
      and _json_differs(saved.get(k), current.get(k))
  ]


def _json_differs(a: Any, b: Any) -> bool:
  # Differ after a JSON round trip: a tuple and the list it was saved as
  # are one value.
  return json.loads(dumps(a)) != json.loads(dumps(b))


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
