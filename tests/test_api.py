"""The public surface: pinned names, each documented."""

import inspect

import sparseopt_jax as sparseopt

# Pinned on purpose: adding or removing a public name must be a deliberate
# change of this list (and of the README's API overview).
EXPECTED = {
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
    "sparse_init",
    "sparseopt",
    "sparseopt_scales",
    "sparsity",
    "turning_diagnostics",
    "validate_masks",
    "zero_masked_updates",
}


def test_all_is_pinned():
  assert set(sparseopt.__all__) == EXPECTED
  assert len(sparseopt.__all__) == len(EXPECTED), "duplicates in __all__"


def test_every_public_name_exists_and_has_a_docstring():
  for name in sparseopt.__all__:
    obj = getattr(sparseopt, name)
    doc = inspect.getdoc(obj)
    assert doc and doc.strip(), f"{name} has no docstring"


def test_implementation_is_private():
  # Public objects are defined in private modules and only re-exported.
  for name in sparseopt.__all__:
    module = getattr(getattr(sparseopt, name), "__module__", "")
    assert module.startswith("sparseopt_jax._src."), (name, module)


def test_no_public_name_outside_all():
  public = {n for n in dir(sparseopt)
            if not n.startswith("_") and not inspect.ismodule(
                getattr(sparseopt, n))}
  assert public == EXPECTED


def test_version():
  assert isinstance(sparseopt.__version__, str)
