r"""Trains one configuration: the command-line entry point.

  python -m experiments.main --config=experiments/configs/fmnist_resnet.py \
      --workdir=/tmp/fmnist --config.sparsity=0.9 --config.optimizer=sgd

Running it again with the same ``--workdir`` resumes from the last checkpoint.
Watch a run live with ``tensorboard --logdir=<workdir>/tensorboard``; the
same records are in ``<workdir>/metrics.jsonl``.
Multi-host (TPU pods, several GPU hosts): start the same command on every
host with ``--distributed``.
"""

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from experiments import train

FLAGS = flags.FLAGS

flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
flags.DEFINE_bool("distributed", False,
                  "Call jax.distributed.initialize() (multi-host runs).")
config_flags.DEFINE_config_file(
    "config", None, "Training configuration file.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
  if FLAGS.distributed:
    jax.distributed.initialize()
  logging.info("JAX process %d / %d, devices: %s", jax.process_index(),
               jax.process_count(), jax.devices())
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
