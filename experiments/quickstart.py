r"""The main job: RigL at 95% on Fashion-MNIST, baseline SGD vs SparseOpt.

  python -m experiments.quickstart [--root=experiments/results/quickstart]

Trains the small BN ResNet twice (same seed, data order, masks and
hyperparameters; only the optimizer differs), about 7 minutes on 2 CPU
cores, then prints the comparison table and writes the accuracy and skew
plots.
Interrupted? Run the same command again: finished runs are skipped and
unfinished ones resume from their last checkpoint.
"""

import os

from absl import app
from absl import flags
from absl import logging

from experiments import records
from experiments import sweep
from experiments.studies import plot

FLAGS = flags.FLAGS


def main(argv):
  del argv
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
  for _ in sweep.run_sweep(
      "quickstart", FLAGS.root, extra=records.parse_sets(FLAGS.set)
  ):
    pass
  out = os.path.join(FLAGS.root, "accuracy.png")
  table = plot.report(
      FLAGS.root, out, title="Fashion-MNIST, small BN ResNet, RigL 95% (ERK)"
  )
  with open(os.path.join(FLAGS.root, "table.md"), "w") as f:
    f.write(table + "\n")
  print("\n" + table)
  print(
      f"\nPlots written to {os.path.abspath(out)} and "
      f"{os.path.abspath(plot.skew_path(out))}"
  )


if __name__ == "__main__":
  flags.DEFINE_string(
      "root",
      "experiments/results/quickstart",
      "Parent folder of the two runs' workdirs.",
  )
  flags.DEFINE_multi_string("set", [], "field=value override for both runs.")
  app.run(main)
