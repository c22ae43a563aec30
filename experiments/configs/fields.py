"""Every config field, its type and accepted values: checked before a run.

`FIELDS` is the one table of the fields of ``configs/default.py`` (every
config in this folder starts from it and adds none). `validate` checks a
config against it, and against what only the machine decides (devices,
processes), before a run loads data or touches its workdir, so that a bad
value fails at once with the field and its accepted values named, instead
of deep in training. The training loop, the command line (``--config.foo``
for an unknown ``foo``) and the tests all ask this table.
"""

import dataclasses
import math
import re
from typing import Any

import ml_collections

from experiments import input_pipeline
from experiments import models
from experiments import optimizers

METHODS = ("dense", "static", "set", "rigl", "gmp")
# Methods whose masks are drawn at init (gmp's start dense).
MASKED_AT_INIT = ("static", "set", "rigl")
GMP_SCHEDULES = ("cubic",)
INITS = ("masked_dense", "fan_in")
# Computation dtypes (parameters stay float32).
DTYPES = ("float32", "bfloat16", "float16")
# Layouts of params, masks and optimizer state over the devices' mesh.
SHARDINGS = ("replicated", "fsdp")


class ConfigError(ValueError):
  """A config value the harness cannot run, or a workdir it may not resume."""


@dataclasses.dataclass(frozen=True)
class Field:
  """A field's type and accepted values.

  Attributes:
    kind: ``int``, ``float`` (ints accepted), ``bool``, ``str`` or ``tuple``.
    choices: the accepted values of a choice field (empty: any).
    low: lower bound (numbers), inclusive unless ``low_open``.
    high: upper bound (numbers), inclusive unless ``high_open``.
    low_open: whether ``low`` itself is excluded.
    high_open: whether ``high`` itself is excluded.
    item: the type of a tuple's items.
    note: what the accepted values mean, when the bounds do not say it.
  """

  kind: type
  choices: tuple[Any, ...] = ()
  low: float | None = None
  high: float | None = None
  low_open: bool = False
  high_open: bool = False
  item: type | None = None
  note: str = ""

  def accepted(self) -> str:
    """The accepted values, in words."""
    if self.choices:
      return f"one of {self.choices}"
    words = {int: "an int", float: "a finite float", bool: "True or False"}
    text = words.get(self.kind, f"a {self.kind.__name__}")
    if self.kind is tuple and self.item is not None:
      text = f"a tuple of {self.item.__name__}"
    bounds = []
    if self.low is not None:
      bounds.append(f"{'>' if self.low_open else '>='} {self.low}")
    if self.high is not None:
      bounds.append(f"{'<' if self.high_open else '<='} {self.high}")
    if bounds:
      text += " " + " and ".join(bounds)
    return f"{text} ({self.note})" if self.note else text

  def ok(self, value: Any) -> bool:
    """Whether ``value`` is accepted."""
    if self.choices:
      return isinstance(value, str) and value in self.choices
    if self.kind is bool:
      return isinstance(value, bool)
    if self.kind is str:
      return isinstance(value, str)
    if self.kind is tuple:
      return isinstance(value, (tuple, list)) and all(
          self._number_ok(v) if self.item is float else isinstance(v, str)
          for v in value
      )
    return self._number_ok(value)

  def _number_ok(self, value: Any) -> bool:
    kind = self.item if self.kind is tuple else self.kind
    types = (int,) if kind is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, types):
      return False
    if not math.isfinite(value):
      return False
    if self.low is not None and (
        value < self.low or (self.low_open and value == self.low)
    ):
      return False
    return self.high is None or not (
        value > self.high or (self.high_open and value == self.high)
    )


def _fraction(open_high=False, note=""):
  return Field(float, low=0.0, high=1.0, high_open=open_high, note=note)


_POSITIVE_INT = Field(int, low=1)

FIELDS: dict[str, Field] = {
    # Model and data.
    "model": Field(str, choices=tuple(sorted(models.MODELS))),
    "width": Field(int, low=0, note="0 = the preset's width"),
    "dataset": Field(str, choices=tuple(sorted(input_pipeline.DATASETS))),
    "data_dir": Field(str),
    "image_size": Field(int, low=0, note="0 = the dataset's size"),
    "augment": Field(str, choices=("none", "crop_flip")),
    "dtype": Field(str, choices=DTYPES),
    "num_data_threads": _POSITIVE_INT,
    # Sparsity.
    "method": Field(str, choices=METHODS),
    "sparsity": _fraction(open_high=True),
    "distribution": Field(str, choices=("erk", "uniform")),
    "dense_paths": Field(tuple, item=str, note="regexes of kernel paths"),
    "update_every": _POSITIVE_INT,
    "drop_fraction": _fraction(),
    "drop_schedule": Field(str, choices=("cosine", "constant")),
    "end_fraction": _fraction(),
    "grow_with": Field(str, choices=("raw", "corrected")),
    "init": Field(str, choices=INITS),
    "structure": Field(
        str, note="'unstructured', 'constant_fan_in' or 'n:m' such as '2:4'"
    ),
    "gmp_start_fraction": _fraction(),
    "gmp_end_fraction": _fraction(),
    "gmp_schedule": Field(str, choices=GMP_SCHEDULES),
    # Optimizer.
    "optimizer": Field(str, choices=optimizers.OPTIMIZERS),
    "correct_filter": Field(str, choices=optimizers.CORRECT_FILTERS),
    "correction": Field(str, choices=optimizers.CORRECTIONS),
    "correction_unit": Field(str, choices=optimizers.CORRECTION_UNITS),
    "bn_stats": Field(str, choices=optimizers.BN_STATS),
    "learning_rate": Field(float, low=0.0, low_open=True),
    "momentum": _fraction(),
    "nesterov": Field(bool),
    "adam_b1": _fraction(open_high=True),
    "adam_b2": _fraction(open_high=True),
    "adam_eps": Field(float, low=0.0, low_open=True),
    "weight_decay": Field(float, low=0.0),
    "renormalize": Field(str, choices=optimizers.RENORMALIZE),
    "ham": Field(bool),
    "ham_alpha": Field(float, low=0.0),
    "ham_beta": Field(float, low=0.0),
    "grad_scale": Field(float, low=0.0, low_open=True),
    "grad_scale_fraction": _fraction(),
    "label_smoothing": _fraction(open_high=True),
    "schedule": Field(str, choices=optimizers.SCHEDULES),
    "warmup_epochs": Field(float, low=0.0),
    "step_boundaries": Field(
        tuple, item=float, low=0.0, high=1.0, note="fractions of training"
    ),
    "step_decay": Field(float, low=0.0, low_open=True),
    # Budget.
    "batch_size": Field(
        int, low=2, note="global; a multiple of the device count"
    ),
    "eval_batch_size": Field(
        int, low=1, note="global; a multiple of the device count"
    ),
    "num_epochs": Field(float, low=0.0),
    "num_train_steps": Field(int, low=-1, note="<= 0: use num_epochs"),
    "seed": Field(int, low=0),
    "sharding": Field(
        str,
        choices=SHARDINGS,
        note=(
            "fsdp: kernels split on their largest axis divisible by the "
            "device count"
        ),
    ),
    # Bookkeeping.
    "log_every": _POSITIVE_INT,
    "turning_diagnostics": Field(bool),
    "fan_in_histogram": Field(bool),
    "sigma_diagnostics": Field(bool),
    "eval_every": _POSITIVE_INT,
    "recalibrate_batches": Field(int, low=0, note="0 = off"),
    "checkpoint_every": _POSITIVE_INT,
    "keep_checkpoints": _POSITIVE_INT,
    "progress_bar": Field(bool),
    "tensorboard": Field(bool),
}


def unknown_field_message(name: str) -> str:
  """The error for a field the table does not have (a typo, most likely)."""
  return (
      f"Invalid config: unknown field {name!r}; the fields are "
      f"{', '.join(sorted(FIELDS))} (see experiments/configs/default.py)."
  )


def validate(
    config: ml_collections.ConfigDict,
    num_devices: int = 1,
    num_processes: int = 1,
) -> None:
  """Checks every field of ``config`` against `FIELDS` and the machine.

  Args:
    config: the run's config.
    num_devices: devices over which the batches are sharded.
    num_processes: processes that each load a share of every batch.

  Raises:
    ConfigError: naming the first invalid field and its accepted values.
  """
  for name in config.keys():
    if name not in FIELDS:
      raise ConfigError(unknown_field_message(name))
  missing = sorted(set(FIELDS) - set(config.keys()))
  if missing:
    raise ConfigError(
        f"Invalid config: missing fields {missing}; start configs from "
        "configs/default.get_config()."
    )
  for name, field in FIELDS.items():
    value = config[name]
    if not field.ok(value):
      raise ConfigError(
          f"Invalid config: {name}={value!r}: expected {field.accepted()}."
      )

  def check(ok, message):
    if not ok:
      raise ConfigError(f"Invalid config: {message}")

  check(
      config.num_train_steps > 0 or config.num_epochs > 0,
      f"num_train_steps={config.num_train_steps} and "
      f"num_epochs={config.num_epochs}: set num_epochs > 0 or "
      "num_train_steps > 0.",
  )
  check(
      config.init == "masked_dense" or config.method in MASKED_AT_INIT,
      "init='fan_in' re-draws sparse kernels; it needs a sparse method "
      f"with masks at init (one of {MASKED_AT_INIT}), not "
      f"method={config.method!r}.",
  )
  try:
    structure = optimizers.parse_structure(config.structure)
  except ValueError as e:
    raise ConfigError(f"Invalid config: {e}") from None
  check(
      structure == "unstructured" or config.method != "dense",
      f"structure={config.structure!r} needs a sparse method (one of "
      f"{METHODS[1:]}), not method='dense'.",
  )
  if isinstance(structure, tuple):
    n, m = structure
    check(
        config.method == "dense" or math.isclose(config.sparsity, 1 - n / m),
        f"structure={config.structure!r} keeps exactly {n} of every {m} "
        f"inputs: sparsity must be 1 - n/m = {1 - n / m:g}, got "
        f"sparsity={config.sparsity}.",
    )
  check(
      config.correction_unit == "neuron"
      or (config.correction != "batch_stats" and structure == "unstructured"),
      "correction_unit='group' works with the fan_in and norm corrections "
      "and unstructured masks, not "
      f"correction={config.correction!r}, structure={config.structure!r}.",
  )
  if config.model in models.TRANSFORMERS:
    # No BatchNorm: nothing gives batch statistics.
    for name, ok in (
        ("correction", config.correction != "batch_stats"),
        ("sigma_diagnostics", not config.sigma_diagnostics),
        ("recalibrate_batches", config.recalibrate_batches == 0),
        ("grad_scale", config.grad_scale == 1.0),
        ("correct_filter", config.correct_filter == "all"),
    ):
      check(
          ok,
          f"{name}={config[name]!r} needs BatchNorm, which "
          f"model={config.model!r} does not have.",
      )
  check(
      config.gmp_start_fraction <= config.gmp_end_fraction,
      f"gmp_start_fraction={config.gmp_start_fraction} must be <= "
      f"gmp_end_fraction={config.gmp_end_fraction}.",
  )
  for pattern in config.dense_paths:
    try:
      re.compile(pattern)
    except re.error as e:
      check(False, f"dense_paths: {pattern!r} is not a regex ({e}).")
  # Whether a mask update happened since the last evaluation survives a
  # resume only through the logged mask_update_steps, so every checkpoint
  # must be a log step (see train.train_and_evaluate).
  check(
      config.recalibrate_batches == 0
      or config.checkpoint_every % config.log_every == 0,
      f"recalibrate_batches={config.recalibrate_batches} needs "
      f"checkpoint_every ({config.checkpoint_every}) to be a multiple of "
      f"log_every ({config.log_every}), so that a resumed run knows the "
      "mask updates since its last evaluation.",
  )
  for name in ("batch_size", "eval_batch_size"):
    check(
        config[name] % num_devices == 0,
        f"{name}={config[name]}: expected a multiple of the {num_devices} "
        "devices it is sharded over.",
    )
  # The data loader (grain) cannot batch an endless stream one by one.
  check(
      config.batch_size // num_processes >= 2,
      f"batch_size={config.batch_size}: expected at least 2 examples per "
      f"process ({num_processes} processes).",
  )
