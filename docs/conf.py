"""Sphinx configuration: the API reference and the guides.

Build (warnings are errors):

  sphinx-build -W --keep-going -b html docs docs/_build/html
"""

import os
import sys

# Document the working tree, installed or not.
sys.path.insert(0, os.path.abspath(".."))

project = "sparseopt-jax"
author = "The sparseopt-jax authors"
copyright = "2026, The sparseopt-jax authors"  # pylint: disable=redefined-builtin

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "sphinx.ext.napoleon",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build"]

# The guides link headings as `page.md#heading`.
myst_heading_anchors = 3
myst_enable_extensions = ["dollarmath"]

# Docstrings are Google style: Args, Returns, Raises, Examples, References.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": False}
# Cross-references in signatures (jax.Array, optax types, chex.PRNGKey) have
# no target without network access for intersphinx; keep them unresolved
# rather than failing the build on each one.
nitpicky = False

html_theme = "furo"
html_title = "sparseopt-jax"
