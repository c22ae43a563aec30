"""sparseopt-jax: sparsity-aware optimization for sparse training in JAX.

SparseOpt (Adnan et al., ICML 2026, arXiv:2605.27541) as composable optax
gradient transformations, sparsity masks (unstructured, constant fan-in,
N:M), dynamic sparse training (RigL, SET) and gradual magnitude pruning that
run inside one ``jax.jit``-compiled step.

Use as ``import sparseopt_jax as sparseopt``. Research measurements (gradient
skew, neuron turning, mask-update jumps, fan-in histograms, the per-neuron
factors) are in :mod:`sparseopt_jax.diagnostics`, reachable as
``sparseopt.diagnostics``.
"""

from sparseopt_jax import diagnostics
from sparseopt_jax._src.alias import sparseopt
from sparseopt_jax._src.dst import drop_fraction_schedule
from sparseopt_jax._src.dst import dynamic_sparse
from sparseopt_jax._src.dst import DynamicSparseState
from sparseopt_jax._src.dst import get_masks
from sparseopt_jax._src.dst import itop_rate
from sparseopt_jax._src.dst import masks_updated
from sparseopt_jax._src.dst import reset_changed_moments
from sparseopt_jax._src.ham import ham
from sparseopt_jax._src.ham import HamState
from sparseopt_jax._src.ham import normalize_updates
from sparseopt_jax._src.masks import apply_masks
from sparseopt_jax._src.masks import init_masks
from sparseopt_jax._src.masks import layer_densities
from sparseopt_jax._src.masks import layer_sparsity
from sparseopt_jax._src.masks import magnitude_masks
from sparseopt_jax._src.masks import neuron_sparsity
from sparseopt_jax._src.masks import sparse_init
from sparseopt_jax._src.masks import sparsity
from sparseopt_jax._src.pruning import gradual_pruning
from sparseopt_jax._src.pruning import pruning_schedule
from sparseopt_jax._src.transform import scale_by_sparseopt
from sparseopt_jax._src.transform import ScaleBySparseOptState
from sparseopt_jax._src.transform import zero_masked_updates
from sparseopt_jax._src.tree import exclude_paths
from sparseopt_jax._src.tree import is_kernel
from sparseopt_jax._src.tree import path_str
from sparseopt_jax._src.tree import validate_masks

__version__ = "0.2.0.dev0"

# Research measurements (skew, turning, jumps, histograms, the factor
# functions) live in the ``diagnostics`` submodule, not here.
__all__ = (
    "DynamicSparseState",
    "HamState",
    "ScaleBySparseOptState",
    "apply_masks",
    "diagnostics",
    "drop_fraction_schedule",
    "dynamic_sparse",
    "exclude_paths",
    "get_masks",
    "gradual_pruning",
    "ham",
    "init_masks",
    "is_kernel",
    "itop_rate",
    "layer_densities",
    "layer_sparsity",
    "magnitude_masks",
    "masks_updated",
    "neuron_sparsity",
    "normalize_updates",
    "path_str",
    "pruning_schedule",
    "reset_changed_moments",
    "scale_by_sparseopt",
    "sparse_init",
    "sparseopt",
    "sparsity",
    "validate_masks",
    "zero_masked_updates",
)
