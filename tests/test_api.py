"""The public surface: pinned names, each documented, each defined privately."""

import inspect

import sparseopt_jax as sparseopt

# Pinned on purpose: adding or removing a public name must be a deliberate
# change of these lists (and of the README's API overview).
EXPECTED = {
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
    "pruning_schedule",
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
    "reset_changed_moments",
    "scale_by_sparseopt",
    "sparse_init",
    "sparseopt",
    "sparsity",
    "validate_masks",
    "zero_masked_updates",
}

EXPECTED_DIAGNOSTICS = {
    "batch_stats_scale",
    "dst_diagnostics",
    "fan_in_histogram",
    "fan_in_scale",
    "mask_update_jump",
    "neuron_turning",
    "norm_scale",
    "skew_diagnostics",
    "sparseopt_scales",
    "turning_diagnostics",
}

SUBMODULES = {"diagnostics"}
# Public, but imported only explicitly (they need optional dependencies):
# an attribute of the package once some test has imported them. Their names
# are pinned in their own tests (tests/test_bn_pairing.py).
OPTIONAL_SUBMODULES = {"flax_utils"}

SURFACES = [
    (sparseopt, EXPECTED - SUBMODULES),
    (sparseopt.diagnostics, EXPECTED_DIAGNOSTICS),
]


def test_all_is_pinned():
  assert set(sparseopt.__all__) == EXPECTED
  assert len(sparseopt.__all__) == len(EXPECTED), "duplicates in __all__"
  names = sparseopt.diagnostics.__all__
  assert set(names) == EXPECTED_DIAGNOSTICS
  assert len(names) == len(EXPECTED_DIAGNOSTICS), "duplicates in __all__"


def test_surfaces_do_not_overlap():
  # One name, one place: a diagnostic is not also a top-level name.
  assert not EXPECTED & EXPECTED_DIAGNOSTICS


def test_diagnostics_is_reachable_as_an_attribute():
  # `import sparseopt_jax as sparseopt` alone must expose the namespace.
  assert inspect.ismodule(sparseopt.diagnostics)
  assert sparseopt.diagnostics.__name__ == "sparseopt_jax.diagnostics"
  assert inspect.getdoc(sparseopt.diagnostics)


def test_every_public_name_exists_and_has_a_docstring():
  for module, names in SURFACES:
    for name in names:
      obj = getattr(module, name)
      doc = inspect.getdoc(obj)
      assert doc and doc.strip(), f"{module.__name__}.{name} has no docstring"


def test_implementation_is_private():
  # Public objects are defined in private modules and only re-exported.
  for module, names in SURFACES:
    for name in names:
      defined_in = getattr(getattr(module, name), "__module__", "")
      assert defined_in.startswith("sparseopt_jax._src."), (name, defined_in)


def test_no_public_name_outside_all():
  for module, names in SURFACES:
    public = {
        n
        for n in dir(module)
        if not n.startswith("_") and not inspect.ismodule(getattr(module, n))
    }
    assert public == names, module.__name__
  modules = {
      n
      for n in dir(sparseopt)
      if not n.startswith("_") and inspect.ismodule(getattr(sparseopt, n))
  }
  # `_src` is private; every other submodule is public and listed.
  assert modules - OPTIONAL_SUBMODULES == SUBMODULES


def test_version_is_one_line():
  # The packaging helper reads the version from this single line.
  assert isinstance(sparseopt.__version__, str)
  with open(sparseopt.__file__, encoding="utf-8") as f:
    lines = [line for line in f if line.startswith("__version__")]
  assert lines == [f'__version__ = "{sparseopt.__version__}"\n']
