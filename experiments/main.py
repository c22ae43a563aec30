r"""Trains one configuration: the command-line entry point.

  python -m experiments.main --config=experiments/configs/fmnist_resnet.py \
      --workdir=/tmp/fmnist --config.sparsity=0.9 --config.optimizer=sgd

Running it again with the same ``--workdir`` resumes from the last checkpoint.
Watch a run live with ``tensorboard --logdir=<workdir>/tensorboard``; the
same records are in ``<workdir>/metrics.jsonl``.
Multi-host: start the same command on every host with ``--distributed``.
On TPU pods and SLURM that is enough (JAX finds the processes itself);
elsewhere also pass ``--coordinator_address=HOST:PORT``,
``--num_processes=N`` and ``--process_id=I`` (or set ``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``; a flag wins over its variable).

Exit status: 0 when the run finished (or had finished before), 1 when it
diverged (the message names the step) or the config is invalid or does
not match the workdir's run (the message names the field).
"""

from collections.abc import Mapping
import os
import sys
from typing import Any

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from experiments import train
from experiments.configs import fields

FLAGS = flags.FLAGS

flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() (multi-host runs)."
)
flags.DEFINE_string(
    "coordinator_address",
    None,
    "With --distributed: HOST:PORT of process 0's coordinator, the same on "
    "every process. Default: $JAX_COORDINATOR_ADDRESS.",
)
flags.DEFINE_integer(
    "num_processes",
    None,
    "With --distributed: how many processes take part. Default: "
    "$JAX_NUM_PROCESSES.",
)
flags.DEFINE_integer(
    "process_id",
    None,
    "With --distributed: this process, 0 to num_processes - 1. Default: "
    "$JAX_PROCESS_ID.",
)
config_flags.DEFINE_config_file(
    "config", None, "Training configuration file.", lock_config=True
)
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a clear error for an unknown config field.

  ``config_flags`` looks an override's field up while parsing, and for
  ``--config.foo=1`` fails with a chain of KeyErrors naming no flag; the
  table of fields says it first.
  """
  for arg in argv[1:]:
    if arg == "--":
      break
    if arg.startswith("--config."):
      name = arg[len("--config.") :].split("=", 1)[0].split(".", 1)[0]
      if name not in fields.FIELDS:
        sys.exit(
            f"FATAL: --config.{name}: {fields.unknown_field_message(name)}"
        )
  return app.parse_flags_with_usage(argv)


# Each flag of an explicitly started multi-process run, and the environment
# variable that stands in for it when the flag is not given.
_PROCESS_FLAGS = {
    "coordinator_address": "JAX_COORDINATOR_ADDRESS",
    "num_processes": "JAX_NUM_PROCESSES",
    "process_id": "JAX_PROCESS_ID",
}


def distributed_options(
    distributed: bool,
    values: Mapping[str, Any],
    environ: Mapping[str, str],
) -> dict[str, Any] | None:
  """The keyword arguments for ``jax.distributed.initialize``.

  ``jax.distributed.initialize()`` reads only ``JAX_COORDINATOR_ADDRESS`` from
  the environment; the process count and id it takes from a detected cluster
  (TPU, SLURM, MPI, ...) or not at all. Here all three come from the flags or
  their environment variables, so that a run started by hand works too.

  Args:
    distributed: the ``--distributed`` flag.
    values: the flags ``coordinator_address``, ``num_processes`` and
      ``process_id``, None where not given.
    environ: the environment (``os.environ``).

  Returns:
    None for a single-process run; ``{}`` to let JAX detect the cluster
    when none of the three is given; else all three, checked.

  Raises:
    ValueError: naming the flag that is missing or wrong.
  """
  if not distributed:
    flagged = [name for name in _PROCESS_FLAGS if values.get(name) is not None]
    if flagged:
      raise ValueError(
          f"--{flagged[0]} is for multi-host runs: add --distributed."
      )
    return None
  given, sources = {}, []
  for name, variable in _PROCESS_FLAGS.items():
    if values.get(name) is not None:
      given[name] = values[name]
      sources.append(f"--{name}")
    elif environ.get(variable, "").strip():
      value = environ[variable].strip()
      if name != "coordinator_address":
        try:
          value = int(value)
        except ValueError:
          raise ValueError(
              f"${variable}={environ[variable]!r} (the default of "
              f"--{name}) is not an integer."
          ) from None
      given[name] = value
      sources.append(f"${variable}")
  if not given:
    return {}  # JAX's cluster detection (TPU, SLURM, MPI, ...).
  missing = [
      f"--{name} (or ${variable})"
      for name, variable in _PROCESS_FLAGS.items()
      if name not in given
  ]
  if missing:
    raise ValueError(
        f"--distributed with {' and '.join(sources)} also needs "
        f"{' and '.join(missing)}: give all three, or none of them to let "
        "JAX detect the cluster (TPU, SLURM)."
    )
  num, index = given["num_processes"], given["process_id"]
  if num < 1:
    raise ValueError(f"--num_processes={num}: must be at least 1.")
  if not 0 <= index < num:
    raise ValueError(
        f"--process_id={index}: must be in 0 .. {num - 1} "
        f"(--num_processes={num})."
    )
  return given


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
  try:
    options = distributed_options(
        FLAGS.distributed,
        {name: FLAGS[name].value for name in _PROCESS_FLAGS},
        os.environ,
    )
  except ValueError as e:
    sys.exit(f"FATAL: {e}")
  if options is not None:
    jax.distributed.initialize(**options)
  logging.info(
      "JAX process %d / %d, devices: %s",
      jax.process_index(),
      jax.process_count(),
      jax.devices(),
  )
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (fields.ConfigError, train.DivergedError) as e:
    sys.exit(f"FATAL: {e}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
