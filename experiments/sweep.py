r"""Named, resumable sweeps: each run in its own workdir under ``--root``.

  python -m experiments.sweep --sweep=quickstart --root=experiments/results/quickstart
  python -m experiments.sweep --sweep=fmnist_convergence --root=... --shard=0/2

A run whose workdir holds ``summary.json`` is finished and skipped; an
unfinished one resumes from its latest checkpoint (see `train`), so the same
command can be re-run after an interruption until every run is done.
``--shard=i/n`` runs every n-th run starting at i, to split a sweep over
machines or processes. ``--set field=value`` overrides a field in every run
(for example ``--set num_data_threads=8``); the override becomes part of each
run's config, so use the same ``--set`` flags when resuming.
``--where field=value`` (repeatable) runs only the runs with that grid value,
for example ``--where num_epochs=3.0`` for a sweep's short budget.
"""

import dataclasses
import importlib
import itertools
import os
from typing import Any
from collections.abc import Iterator, Sequence

from absl import app
from absl import flags
from absl import logging
import ml_collections

from experiments import records
from experiments import train


@dataclasses.dataclass(frozen=True)
class Sweep:
  """A config module and the grid of overrides to run it with.

  Attributes:
    config: module name in ``experiments/configs`` (``"fmnist_resnet"``).
    description: what the sweep is for.
    base: overrides applied to every run.
    grids: each grid maps field -> values; its runs are the cartesian
      product, and the sweep is the union of its grids' runs. The order of
      the fields names the run directories.
  """

  config: str
  description: str
  base: dict[str, Any]
  grids: Sequence[dict[str, Sequence[Any]]]


_BOTH = ("sgd", "sparseopt")
# SparseOpt corrected by the current batch's BatchNorm std (the mechanism
# test), without a learning rate; key order names the runs.
_BN_STATS = {
    "optimizer": ["sparseopt"],
    "correction": ["batch_stats"],
    "bn_stats": ["batch"],
}


def _seed_by_seed(*arms: dict[str, Any], seeds=(0, 1, 2)) -> list[dict]:
  """One grid per (seed, arm), seed-major: every seed's arms run together,
  so each finished pair can be read as it lands."""
  return [{**arm, "seed": [seed]} for seed in seeds for arm in arms]


SWEEPS = {
    "quickstart": Sweep(
        "fmnist_resnet",
        "RigL at 95% on Fashion-MNIST, baseline SGD vs SparseOpt, one seed, "
        "900 steps (1.9 epochs); about 6 minutes on 2 CPU cores.",
        base={
            "num_train_steps": 900,
            "eval_every": 150,
            "checkpoint_every": 300,
        },
        grids=[
            {
                "method": ["rigl"],
                "sparsity": [0.95],
                "optimizer": _BOTH,
                "seed": [0],
            }
        ],
    ),
    "fmnist_convergence": Sweep(
        "fmnist_resnet",
        "Reproduction B: RigL and SET at 90/95/97% (+ RigL 99%), SGD vs "
        "SparseOpt, 3 seeds, a short and a 4x longer budget.",
        base={},
        # Short budget first, then the long one; RigL 99% last in each. The
        # 12-epoch RigL 97% cell is fmnist_when's 12-epoch default arm (the
        # same recipe), linked into this sweep's root rather than rerun.
        grids=[
            {
                "num_epochs": [3.0],
                "method": ["rigl", "set"],
                "sparsity": [0.9, 0.95, 0.97],
                "optimizer": _BOTH,
                "seed": [0, 1, 2],
            },
            {
                "num_epochs": [3.0],
                "method": ["rigl"],
                "sparsity": [0.99],
                "optimizer": _BOTH,
                "seed": [0, 1, 2],
            },
            {
                "num_epochs": [12.0],
                "method": ["rigl", "set"],
                "sparsity": [0.9, 0.95, 0.97],
                "optimizer": _BOTH,
                "seed": [0, 1, 2],
            },
            {
                "num_epochs": [12.0],
                "method": ["rigl"],
                "sparsity": [0.99],
                "optimizer": _BOTH,
                "seed": [0, 1, 2],
            },
        ],
    ),
    "fmnist_lr_grid": Sweep(
        "fmnist_resnet",
        "Fair tuning at RigL 95%, 3 epochs: fmnist_why_097's learning-rate "
        "grid for SGD and SparseOpt, 3 seeds. The grid's lr 0.05 arm is "
        "fmnist_convergence's 3-epoch RigL 95% cell: plot with both roots.",
        base={"method": "rigl", "sparsity": 0.95},
        grids=[
            {
                "learning_rate": [0.025, 0.1, 0.2],
                "optimizer": _BOTH,
                "seed": [0, 1, 2],
            },
            # Both optimizers' best of {0.025, ..., 0.2} was the edge, 0.2.
            {"learning_rate": [0.4], "optimizer": _BOTH, "seed": [0, 1, 2]},
        ],
    ),
    "fmnist_why_097": Sweep(
        "fmnist_resnet",
        "Why SparseOpt trails SGD at 97% (RigL, 3 epochs): correct only the "
        "layers a BatchNorm follows (not the classifier), and give both "
        "optimizers the same learning-rate grid around the default 0.05.",
        base={"method": "rigl", "sparsity": 0.97},
        grids=[
            {
                "correct_filter": ["bn_only"],
                "optimizer": ["sparseopt"],
                "seed": [0, 1, 2],
            },
            {
                "learning_rate": [0.1, 0.025],
                "optimizer": _BOTH,
                "seed": [0, 1, 2],
            },
            # SparseOpt's best of {0.025, 0.05, 0.1} was the edge, 0.1.
            {"learning_rate": [0.2], "optimizer": _BOTH, "seed": [0, 1, 2]},
        ],
    ),
    "fmnist_bn_stats_base": Sweep(
        "fmnist_resnet",
        "The baselines of fmnist_bn_stats, run in one environment with the "
        "same sigma diagnostics: SGD and the paper's factor at RigL 97%, 3 "
        "epochs, on the learning-rate grid of the batch_stats arm, and at "
        "0.025 (both were best at 0.05, the grid's lower edge).",
        base={"method": "rigl", "sparsity": 0.97, "sigma_diagnostics": True},
        grids=[
            {
                "learning_rate": [0.2, 0.1, 0.05, 0.025],
                "optimizer": _BOTH,
                "seed": [0, 1, 2],
            }
        ],
    ),
    "fmnist_churn": Sweep(
        "fmnist_resnet",
        "Do dead neurons come back? RigL vs SET at 97%, 3 epochs, SGD vs "
        "SparseOpt, logging per mask update how many neurons die and how "
        "many revive (jump/L/died, jump/L/revived). One seed at a time, "
        "seed 0 first.",
        base={"sparsity": 0.97},
        grids=[
            {"method": ["rigl", "set"], "optimizer": _BOTH, "seed": [seed]}
            for seed in (0, 1, 2)
        ],
    ),
    "fmnist_when": Sweep(
        "fmnist_resnet",
        "When and why SparseOpt helps (issue 7): from the default recipe "
        "(RigL 97% ERK, SGD lr 0.05 momentum 0.9, wd 5e-4, 3 epochs), vary "
        "one factor at a time, 3 seeds, with turning-rate logs. Grids run "
        "in priority order; report with `python -m experiments.study`.",
        base={"method": "rigl", "sparsity": 0.97},
        grids=[
            # Correction: none vs the paper's fan-in factor vs measured norms.
            {"optimizer": ["sgd"], "seed": [0, 1, 2]},
            {
                "optimizer": ["sparseopt"],
                "correction": ["fan_in", "norm"],
                "seed": [0, 1, 2],
            },
            # Optimizer: AdamW (decoupled decay) with and without it.
            {
                "optimizer": ["adam", "sparseopt+adam"],
                "learning_rate": [2e-3],
                "weight_decay": [0.05],
                "seed": [0, 1, 2],
            },
            # Weight decay: budget / tau from 0 to about 7 (extremes first).
            {
                "weight_decay": [0.0, 5e-3],
                "optimizer": _BOTH,
                "seed": [0, 1, 2],
            },
            # Initialization: fan-in-aware (equal neuron norms at step 0).
            {"init": ["fan_in"], "optimizer": _BOTH, "seed": [0, 1, 2]},
            # Dense control: turning imbalance without sparsity.
            {
                "method": ["dense"],
                "optimizer": ["sgd"],
                "grad_scale": [1.0, 1 / 3, 3.0],
                "seed": [0, 1, 2],
            },
            {"weight_decay": [5e-5], "optimizer": _BOTH, "seed": [0, 1, 2]},
            {
                "method": ["dense"],
                "optimizer": ["sgd"],
                "grad_scale": [0.5, 2.0],
                "seed": [0, 1, 2],
            },
            # The headline comparison repeated at 95%.
            {"sparsity": [0.95], "optimizer": ["sgd"], "seed": [0, 1, 2]},
            {
                "sparsity": [0.95],
                "optimizer": ["sparseopt"],
                "correction": ["norm", "fan_in"],
                "seed": [0, 1, 2],
            },
            # A 4x longer budget (12 epochs, 5625 steps) for the default and
            # the best setting (wd 5e-3), with fan-in histograms, dead
            # neurons and ITOP logged. (The default's 12-epoch arm is the
            # same recipe as fmnist_convergence's RigL 97% 12-epoch cell.)
            {"num_epochs": [12.0], "optimizer": _BOTH, "seed": [0, 1, 2]},
            {
                "num_epochs": [12.0],
                "weight_decay": [5e-3],
                "optimizer": _BOTH,
                "seed": [0, 1, 2],
            },
        ],
    ),
    "fmnist_bn_stats": Sweep(
        "fmnist_resnet",
        "SparseOpt with BatchNorm's measured std (correction=batch_stats, "
        "this batch's variances) at RigL 97%, 3 epochs, 3 seeds, logging "
        "how well sqrt(1 - s_i) and ||w_i|| predict it (sigma/L/...). Every "
        "other field as fmnist_why_097's runs, whose sgd and fan-in arms at "
        "lr 0.025/0.1/0.2 it pairs with by seed: plot with both roots.",
        base={
            "method": "rigl",
            "sparsity": 0.97,
            "correction": "batch_stats",
            "bn_stats": "batch",
            "sigma_diagnostics": True,
        },
        grids=[
            {
                "learning_rate": [0.05, 0.1, 0.2],
                "optimizer": ["sparseopt"],
                "seed": [0, 1, 2],
            }
        ],
    ),
    "fmnist_bn_stats_095": Sweep(
        "fmnist_resnet",
        "The mechanism test at RigL 95%, 3 epochs, 3 seeds: SGD, the paper's "
        "factor and BatchNorm's measured std (this batch's variances), each "
        "on lr 0.05/0.1/0.2/0.4, all logging the sigma diagnostics. Run "
        "--where learning_rate=0.1 first: it pairs all three arms. (lr 0.4 "
        "was added after every arm was best at 0.2, the grid's edge.)",
        base={"method": "rigl", "sparsity": 0.95, "sigma_diagnostics": True},
        grids=[
            {
                "learning_rate": [0.1, 0.05, 0.2, 0.4],
                "optimizer": _BOTH,
                "seed": [0, 1, 2],
            },
            {
                "learning_rate": [0.1, 0.05, 0.2, 0.4],
                "optimizer": ["sparseopt"],
                "correction": ["batch_stats"],
                "bn_stats": ["batch"],
                "seed": [0, 1, 2],
            },
        ],
    ),
    "fmnist_bn_stats_long": Sweep(
        "fmnist_resnet",
        "The mechanism test at a 4x longer budget: RigL 97%, 12 epochs, 3 "
        "seeds, SGD, the paper's factor and BatchNorm's measured std, each "
        "at its best lr on fmnist_bn_stats's 3-epoch grid (0.05, 0.05 and "
        "0.1), then SGD at 0.1 and BatchNorm's std at 0.05. Seed by seed, so "
        "every finished pair can be read as it lands.",
        base={
            "method": "rigl",
            "sparsity": 0.97,
            "num_epochs": 12.0,
            "sigma_diagnostics": True,
        },
        grids=_seed_by_seed(
            {"optimizer": ["sgd"], "learning_rate": [0.05]},
            {**_BN_STATS, "learning_rate": [0.1]},
        )
        + _seed_by_seed({"optimizer": ["sparseopt"], "learning_rate": [0.05]})
        # SGD at the corrected arm's rate and the corrected arm at SGD's: a
        # 2 x 2 learning-rate grid at 12 epochs for the two arms.
        + _seed_by_seed({"optimizer": ["sgd"], "learning_rate": [0.1]})
        + _seed_by_seed({**_BN_STATS, "learning_rate": [0.05]}),
    ),
    "fmnist_bn_stats_long_095": Sweep(
        "fmnist_resnet",
        "The mechanism test at 95% and a 4x longer budget: RigL 95%, 12 "
        "epochs, 3 seeds, SGD, the paper's factor and BatchNorm's measured "
        "std, each at its best lr on fmnist_bn_stats_095's 3-epoch grid "
        "(0.2 for all three). Seed by seed.",
        base={
            "method": "rigl",
            "sparsity": 0.95,
            "num_epochs": 12.0,
            "sigma_diagnostics": True,
        },
        grids=_seed_by_seed(
            {"optimizer": ["sgd"], "learning_rate": [0.2]},
            {"optimizer": ["sparseopt"], "learning_rate": [0.2]},
            {**_BN_STATS, "learning_rate": [0.2]},
        ),
    ),
    "fmnist_recalibrate": Sweep(
        "fmnist_resnet",
        "The quickstart (RigL 95%, 900 steps) with and without BatchNorm "
        "recalibration (20 training batches) before the evaluations that "
        "follow a mask update, SGD vs SparseOpt, 3 seeds. Recalibration "
        "changes evaluation only: both arms train identically.",
        base={
            "num_train_steps": 900,
            "eval_every": 150,
            "checkpoint_every": 300,
            "method": "rigl",
            "sparsity": 0.95,
        },
        grids=[
            {
                "recalibrate_batches": [0, 20],
                "optimizer": _BOTH,
                "seed": [0, 1, 2],
            }
        ],
    ),
    "fmnist_ham": Sweep(
        "fmnist_resnet",
        "HAM (hyperbolic aware minimization) at RigL 95%, 3 epochs, 3 seeds: "
        "SGD, SparseOpt, HAM and SparseOpt + HAM (the paper's CIFAR-100 "
        "pattern is SparseOpt + HAM > SparseOpt > HAM > SGD), at HAM's "
        "default alpha 200, beta 1e-3; all four arms at the config's lr "
        "0.05, the HAM arms also at 0.1 and 0.2 (the arms without HAM at "
        "those rates are fmnist_bn_stats_095's, the same config), then at "
        "0.025 (HAM was best at 0.05, the grid's lower edge).",
        base={"method": "rigl", "sparsity": 0.95, "num_epochs": 3.0},
        grids=[
            {"ham": [False, True], "optimizer": _BOTH, "seed": [0, 1, 2]},
            {
                "learning_rate": [0.1, 0.2, 0.025],
                "ham": [True],
                "optimizer": _BOTH,
                "seed": [0, 1, 2],
            },
        ],
    ),
    "fmnist_renorm": Sweep(
        "fmnist_resnet",
        "The renormalization ablation at RigL 95%, 3 epochs, 3 seeds: the "
        "loss gradient rescaled to unit global norm before weight decay and "
        "momentum SGD, baseline vs SparseOpt (which renormalizes the "
        "corrected gradient), each on its own lr grid (0.4 added after both "
        "arms were best at 0.2, the grid's edge).",
        base={
            "method": "rigl",
            "sparsity": 0.95,
            "num_epochs": 3.0,
            "renormalize": "global",
        },
        grids=[
            {
                "learning_rate": [0.1, 0.05, 0.2, 0.4],
                "optimizer": _BOTH,
                "seed": [0, 1, 2],
            }
        ],
    ),
    "fmnist_gmp": Sweep(
        "fmnist_resnet",
        "Gradual magnitude pruning (Zhu & Gupta's cubic schedule, dense to "
        "the final sparsity from 10% to 75% of training, every update_every "
        "steps) to 90/95/97%, SGD vs SparseOpt, 3 seeds, 3 epochs: a "
        "dense-to-sparse baseline beside fmnist_convergence's RigL and SET. "
        "Then 97%, where 3 epochs left the pair unclear, at 12 epochs, seed "
        "by seed.",
        base={"method": "gmp", "num_epochs": 3.0},
        grids=[
            {
                "sparsity": [0.9, 0.95, 0.97],
                "optimizer": _BOTH,
                "seed": [0, 1, 2],
            },
            *_seed_by_seed(
                {
                    "num_epochs": [12.0],
                    "sparsity": [0.97],
                    "optimizer": ["sgd"],
                },
                {
                    "num_epochs": [12.0],
                    "sparsity": [0.97],
                    "optimizer": ["sparseopt"],
                },
            ),
        ],
    ),
    "fmnist_structure": Sweep(
        "fmnist_resnet",
        "Structured masks under RigL, 3 epochs, 3 seeds: at 95% and 97%, "
        "unstructured (SGD and SparseOpt) and constant fan-in (SRigL's, SGD: "
        "every neuron of a layer equally sparse, so SparseOpt's factor is "
        "1); 2:4 at 50% (SGD); and the dense model (SGD). The stem stays "
        "dense in every arm: its fan-in, 9, is not a multiple of 4, which "
        "N:M needs, and all arms keep the same layers dense.",
        base={
            "method": "rigl",
            "num_epochs": 3.0,
            "dense_paths": ("conv_init",),
        },
        grids=[
            {
                "structure": ["unstructured"],
                "sparsity": [0.95, 0.97],
                "optimizer": _BOTH,
                "seed": [0, 1, 2],
            },
            {
                "structure": ["constant_fan_in"],
                "sparsity": [0.95, 0.97],
                "optimizer": ["sgd"],
                "seed": [0, 1, 2],
            },
            {
                "structure": ["2:4"],
                "sparsity": [0.5],
                "optimizer": ["sgd"],
                "seed": [0, 1, 2],
            },
            {
                "method": ["dense"],
                "optimizer": ["sgd"],
                "seed": [0, 1, 2],
            },
        ],
    ),
    "fmnist_vit_qk": Sweep(
        "fmnist_vit",
        "The small ViT with QK-norm at RigL 95%, SGD with momentum (lr 0.05, "
        "half an epoch of warmup), 3 epochs, 3 seeds: no correction, the "
        "paper's per-neuron factor (correction_unit=neuron), and the factor "
        "that follows the normalizer's group (correction_unit=group: per "
        "head on query and key, which QK-norm normalizes; none on the "
        "pre-LN block's other kernels).",
        base={
            "model": "fmnist_vit_qk",
            "method": "rigl",
            "sparsity": 0.95,
            "learning_rate": 0.05,
            "weight_decay": 5e-4,
            "num_epochs": 3.0,
        },
        grids=[
            {"optimizer": ["sgd"], "seed": [0, 1, 2]},
            {
                "optimizer": ["sparseopt"],
                "correction_unit": ["neuron", "group"],
                "seed": [0, 1, 2],
            },
        ],
    ),
    "fmnist_vit_qk_set": Sweep(
        "fmnist_vit",
        "fmnist_vit_qk's three arms under SET instead of RigL (random "
        "growth: no gradient ranking, so only the step's scaling differs), "
        "SET 95%, SGD with momentum, 3 epochs, 3 seeds, seed by seed.",
        base={
            "model": "fmnist_vit_qk",
            "method": "set",
            "sparsity": 0.95,
            "learning_rate": 0.05,
            "weight_decay": 5e-4,
            "num_epochs": 3.0,
        },
        grids=_seed_by_seed(
            {"optimizer": ["sgd"]},
            {"optimizer": ["sparseopt"], "correction_unit": ["neuron"]},
            {"optimizer": ["sparseopt"], "correction_unit": ["group"]},
        ),
    ),
    "fmnist_vit_qk_adamw": Sweep(
        "fmnist_vit",
        "fmnist_vit_qk's comparison under AdamW (the config's recipe: lr "
        "1e-3, decoupled weight decay 0.05, half an epoch of warmup), RigL "
        "95%, 3 epochs, 3 seeds: no correction against the better "
        "correction under SGD, the per-neuron factor (fmnist_vit_qk). AdamW "
        "normalizes each coordinate, which should cancel a per-neuron "
        "factor (THEORY prediction 3). Then the pair at 12 epochs.",
        base={
            "model": "fmnist_vit_qk",
            "method": "rigl",
            "sparsity": 0.95,
            "num_epochs": 3.0,
        },
        grids=[
            {"optimizer": ["adam"], "seed": [0, 1, 2]},
            {
                "optimizer": ["sparseopt+adam"],
                "correction_unit": ["neuron"],
                "seed": [0, 1, 2],
            },
            # The same pair at a 4x longer budget, seed by seed.
            *_seed_by_seed(
                {"num_epochs": [12.0], "optimizer": ["adam"]},
                {
                    "num_epochs": [12.0],
                    "optimizer": ["sparseopt+adam"],
                    "correction_unit": ["neuron"],
                },
            ),
        ],
    ),
    "cifar100_resnet20": Sweep(
        "resnet20_cifar100",
        "The paper's CIFAR-100 ResNet-20 grid at 100 epochs (needs a GPU/TPU "
        "and the tfds cifar100 array_record build).",
        base={},
        grids=[
            {
                "method": ["rigl", "set"],
                "sparsity": [0.9, 0.95, 0.97],
                "optimizer": _BOTH,
                "seed": [0, 1, 2],
            }
        ],
    ),
}


def _run_name(overrides: dict[str, Any]) -> str:
  return "__".join(f"{k}-{v}" for k, v in overrides.items())


def expand(sweep: Sweep) -> list[tuple[str, dict[str, Any]]]:
  """The sweep's runs as (name, overrides), in a fixed order."""
  runs = []
  for grid in sweep.grids:
    for values in itertools.product(*grid.values()):
      overrides = dict(zip(grid.keys(), values))
      runs.append((_run_name(overrides), {**sweep.base, **overrides}))
  return runs


def make_config(
    module: str, overrides: dict[str, Any]
) -> ml_collections.ConfigDict:
  """``configs/<module>.py``'s config with ``overrides`` applied."""
  config = importlib.import_module(f"experiments.configs.{module}").get_config()
  for key, value in overrides.items():
    if key not in config:
      raise ValueError(f"Config {module} has no field {key!r}.")
    config[key] = value  # ConfigDict type-checks (and widens int to float).
  return config


def select(
    sweep: Sweep,
    *,
    shard: tuple[int, int] = (0, 1),
    where: dict[str, Any] | None = None,
) -> list[tuple[str, dict[str, Any]]]:
  """The runs of ``sweep`` in this shard whose overrides match ``where``.

  Sharding applies to the whole sweep, before ``where``: a run belongs to the
  same shard whichever filter selects it.
  """
  index, count = shard
  where = where or {}
  return [
      (run, overrides)
      for i, (run, overrides) in enumerate(expand(sweep))
      if i % count == index
      and all(overrides.get(k) == v for k, v in where.items())
  ]


def run_sweep(
    name: str,
    root: str,
    *,
    shard: tuple[int, int] = (0, 1),
    extra: dict[str, Any] | None = None,
    where: dict[str, Any] | None = None,
) -> Iterator[str]:
  """Runs (or resumes) every unfinished run of sweep ``name`` in this shard.

  Only the runs whose grid values match ``where`` (for example
  ``{"num_epochs": 3.0}``), if given.

  Yields:
    Each run's workdir once it has ended (skipped runs included); a run
    that diverged is logged and ends like a finished one.
  """
  sweep = SWEEPS[name]
  for run, overrides in select(sweep, shard=shard, where=where):
    workdir = os.path.join(root, run)
    if not records.is_finished(workdir):
      config = make_config(sweep.config, {**overrides, **(extra or {})})
      try:
        train.train_and_evaluate(config, workdir)
      except train.DivergedError as e:
        # An outcome of this grid point, recorded in its summary.json; the
        # other runs of the sweep still run.
        logging.warning("%s", e)
    yield workdir


FLAGS = flags.FLAGS


def main(argv):
  del argv
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
  index, count = (int(x) for x in FLAGS.shard.split("/"))
  where = records.parse_sets(FLAGS.where)
  if FLAGS.dry_run:
    for run, _ in select(
        SWEEPS[FLAGS.sweep], shard=(index, count), where=where
    ):
      done = records.is_finished(os.path.join(FLAGS.root, run))
      print(f"{'done' if done else 'todo'}  {run}")
    return
  for _ in run_sweep(
      FLAGS.sweep,
      FLAGS.root,
      shard=(index, count),
      extra=records.parse_sets(FLAGS.set),
      where=where,
  ):
    pass
  print(
      f"Sweep {FLAGS.sweep} shard {FLAGS.shard} finished in {FLAGS.root}; "
      f"plot with: python -m experiments.studies.plot --root={FLAGS.root}"
  )


if __name__ == "__main__":
  flags.DEFINE_enum("sweep", None, sorted(SWEEPS), "Which sweep to run.")
  flags.DEFINE_string("root", None, "Parent folder of the runs' workdirs.")
  flags.DEFINE_string("shard", "0/1", "i/n: run every n-th run starting at i.")
  flags.DEFINE_multi_string("set", [], "field=value override for every run.")
  flags.DEFINE_multi_string(
      "where", [], "field=value: run only the runs with this value."
  )
  flags.DEFINE_bool("dry_run", False, "List the runs and their status only.")
  flags.mark_flags_as_required(["sweep", "root"])
  app.run(main)
