"""sparseopt-jax: sparsity-aware optimization for sparse training in JAX.

SparseOpt (Adnan et al., ICML 2026, arXiv:2605.27541) as composable optax
gradient transformations, sparsity masks, and dynamic sparse training
(RigL, SET) that runs inside one ``jax.jit``-compiled step.

Use as ``import sparseopt_jax as sparseopt``.
"""

from sparseopt_jax._src.alias import sparseopt
from sparseopt_jax._src.diagnostics import dst_diagnostics
from sparseopt_jax._src.diagnostics import fan_in_histogram
from sparseopt_jax._src.diagnostics import mask_update_jump
from sparseopt_jax._src.diagnostics import neuron_turning
from sparseopt_jax._src.diagnostics import skew_diagnostics
from sparseopt_jax._src.diagnostics import turning_diagnostics
from sparseopt_jax._src.dst import drop_fraction_schedule
from sparseopt_jax._src.dst import dynamic_sparse
from sparseopt_jax._src.dst import DynamicSparseState
from sparseopt_jax._src.dst import get_masks
from sparseopt_jax._src.dst import itop_rate
from sparseopt_jax._src.dst import reset_changed_moments
from sparseopt_jax._src.masks import apply_masks
from sparseopt_jax._src.masks import init_masks
from sparseopt_jax._src.masks import layer_densities
from sparseopt_jax._src.masks import layer_sparsity
from sparseopt_jax._src.masks import magnitude_masks
from sparseopt_jax._src.masks import neuron_sparsity
from sparseopt_jax._src.masks import sparse_init
from sparseopt_jax._src.masks import sparsity
from sparseopt_jax._src.transform import count_neurons
from sparseopt_jax._src.transform import fan_in_scale
from sparseopt_jax._src.transform import NeuronCounts
from sparseopt_jax._src.transform import norm_scale
from sparseopt_jax._src.transform import scale_by_sparseopt
from sparseopt_jax._src.transform import ScaleBySparseOptState
from sparseopt_jax._src.transform import sparseopt_scales
from sparseopt_jax._src.transform import zero_masked_updates
from sparseopt_jax._src.transform import ZeroMaskedUpdatesState
from sparseopt_jax._src.tree import exclude_paths
from sparseopt_jax._src.tree import is_kernel
from sparseopt_jax._src.tree import path_str
from sparseopt_jax._src.tree import validate_masks

__version__ = "0.1.0"

__all__ = (
    "DynamicSparseState",
    "NeuronCounts",
    "ScaleBySparseOptState",
    "ZeroMaskedUpdatesState",
    "apply_masks",
    "count_neurons",
    "drop_fraction_schedule",
    "dst_diagnostics",
    "dynamic_sparse",
    "exclude_paths",
    "fan_in_histogram",
    "fan_in_scale",
    "get_masks",
    "init_masks",
    "is_kernel",
    "itop_rate",
    "layer_densities",
    "layer_sparsity",
    "magnitude_masks",
    "mask_update_jump",
    "neuron_turning",
    "neuron_sparsity",
    "norm_scale",
    "path_str",
    "reset_changed_moments",
    "scale_by_sparseopt",
    "skew_diagnostics",
    "sparseopt",
    "sparse_init",
    "sparseopt_scales",
    "sparsity",
    "turning_diagnostics",
    "validate_masks",
    "zero_masked_updates",
)
