r"""Trains one configuration: the command-line entry point.

  python -m experiments.main --config=experiments/configs/fmnist_resnet.py \
      --workdir=/tmp/fmnist --config.sparsity=0.9 --config.optimizer=sgd

Running it again with the same ``--workdir`` resumes from the last checkpoint.
Watch a run live with ``tensorboard --logdir=<workdir>/tensorboard``; the
same records are in ``<workdir>/metrics.jsonl``.
Multi-host (TPU pods, several GPU hosts): start the same command on every
host with ``--distributed``.

Exit status: 0 when the run finished (or had finished before), 1 when it
diverged (the message names the step) or the config is invalid or does
not match the workdir's run (the message names the field).
"""

import sys

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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
  if FLAGS.distributed:
    jax.distributed.initialize()
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
