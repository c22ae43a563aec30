"""The package as users get it: the wheel, its metadata, the import, the lint.

The build and lint tests are the CI's packaging check; they run in the normal
suite (deselect with ``-m "not packaging and not lint"``).
"""

import email.parser
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest

import sparseopt_jax

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CANONICAL_URL = "https://github.com/sparseopt-jax/sparseopt-jax"

# Only experiments/ may load these; `import sparseopt_jax` must not.
_EXPERIMENT_ONLY = (
    "flax",
    "tensorflow",
    "tensorflow_datasets",
    "orbax",
    "grain",
    "ml_collections",
    "matplotlib",
    "tensorboardX",
    "experiments",
)
# What the core imports, and so all it may ask for.
_CORE_REQUIREMENTS = {"jax", "jaxlib", "optax", "chex", "numpy"}
# Not part of a source tree: virtualenvs, results, build outputs, caches.
_NOT_SOURCE = shutil.ignore_patterns(
    ".git",
    ".venv",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    ".hypothesis",
    "results",
    "workdirs",
    "tmp",
)


def _run(args, **kwargs):
  """Runs a command; on failure the assertion shows its output."""
  result = subprocess.run(args, capture_output=True, text=True, **kwargs)
  assert result.returncode == 0, (
      f"{' '.join(map(str, args))} failed:\n{result.stdout[-4000:]}\n"
      f"{result.stderr[-4000:]}"
  )
  return result


def _name(requirement):
  return re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower()


def test_import_loads_no_flax_or_tensorflow():
  code = (
      "import json, sys, sparseopt_jax, sparseopt_jax.diagnostics; "
      "print(json.dumps(sorted(sys.modules)))"
  )
  out = _run([sys.executable, "-c", code], cwd=_REPO).stdout
  loaded = {m.split(".")[0] for m in json.loads(out.splitlines()[-1])}
  assert "sparseopt_jax" in loaded
  assert not loaded & set(_EXPERIMENT_ONLY)


def test_import_starts_no_jax_backend():
  # Multi-host training calls jax.distributed.initialize() after importing
  # the library, which JAX refuses once a backend exists: no module-level
  # jnp array anywhere in the package.
  code = (
      "import sparseopt_jax, sparseopt_jax.diagnostics; "
      "from jax._src import xla_bridge; print(bool(xla_bridge._backends))"
  )
  out = _run([sys.executable, "-c", code], cwd=_REPO).stdout
  assert out.split()[-1] == "False"


@pytest.mark.packaging
def test_wheel_ships_the_library_only_and_passes_twine(tmp_path):
  for module in ("build", "twine"):  # The `dev` extra.
    pytest.importorskip(module)
  # A copy, so that the build's egg-info and build/ stay out of the clone and
  # nothing stale in them reaches the wheel; experiments/, benchmarks/ and
  # tests/ are there, for the wheel to leave out.
  src = tmp_path / "src"
  shutil.copytree(_REPO, src, ignore=_NOT_SOURCE)
  assert (src / "experiments" / "main.py").exists()
  # The version is read from the file, not by importing the package: a jax
  # that fails to import must not stop the build.
  blocker = tmp_path / "blocker"
  (blocker / "jax").mkdir(parents=True)
  (blocker / "jax" / "__init__.py").write_text(
      "raise ImportError('building sparseopt-jax must not import jax')\n"
  )
  env = dict(
      os.environ,
      PYTHONPATH=os.pathsep.join(
          [str(blocker)] + os.environ.get("PYTHONPATH", "").split(os.pathsep)
      ),
  )
  dist = tmp_path / "dist"
  build = "build --no-isolation --sdist --wheel --outdir".split()
  _run([sys.executable, "-m", *build, str(dist), str(src)], env=env)
  (wheel,) = dist.glob("*.whl")
  (sdist,) = dist.glob("*.tar.gz")

  version = sparseopt_jax.__version__
  dist_info = f"sparseopt_jax-{version}.dist-info"
  with zipfile.ZipFile(wheel) as z:
    names = z.namelist()
    metadata = email.parser.Parser().parsestr(
        z.read(f"{dist_info}/METADATA").decode()
    )
  assert {n.split("/")[0] for n in names} == {"sparseopt_jax", dist_info}
  library = {
      os.path.relpath(os.path.join(d, f), src).replace(os.sep, "/")
      for d, _, files in os.walk(src / "sparseopt_jax")
      for f in files
      if f.endswith(".py")
  }
  assert library <= set(names)

  assert metadata["Name"] == "sparseopt-jax"
  assert metadata["Version"] == version
  requires = metadata.get_all("Requires-Dist")
  core = {_name(r) for r in requires if "extra ==" not in r}
  assert core == _CORE_REQUIREMENTS
  experiments = {
      _name(r)
      for r in requires
      if re.search(r"extra == ['\"]experiments['\"]", r)
  }
  assert {"flax", "tensorboardx"} <= experiments

  with tarfile.open(sdist) as tar:
    members = {m.split("/", 1)[-1] for m in tar.getnames()}
  assert {"pyproject.toml", "README.md", "sparseopt_jax/__init__.py"} <= members
  assert not any(m.startswith(("experiments/", "benchmarks/")) for m in members)

  twine = [sys.executable, "-m", "twine", "check", "--strict"]
  _run([*twine, str(wheel), str(sdist)])


@pytest.mark.lint
def test_code_is_formatted_and_lint_clean():
  for module in ("ruff", "pyink"):  # The `dev` extra.
    pytest.importorskip(module)
  # The configuration, and what they skip, is in pyproject.toml.
  ruff = [sys.executable, "-m", "ruff", "check", "--no-cache"]
  _run([*ruff, "--output-format=concise", "."], cwd=_REPO)
  _run([sys.executable, "-m", "pyink", "--check", "."], cwd=_REPO)


def test_urls_and_colab_clone_the_canonical_repository():
  tomllib = pytest.importorskip("tomllib")
  with open(os.path.join(_REPO, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)["project"]
  assert project["urls"]["Repository"] == CANONICAL_URL
  assert all(url.startswith(CANONICAL_URL) for url in project["urls"].values())
  with open(os.path.join(_REPO, "experiments", "colab.ipynb")) as f:
    cells = json.load(f)["cells"]
  setup = [c for c in cells if "setup" in c["metadata"].get("tags", [])]
  assert len(setup) == 1
  assert f'REPO_URL = "{CANONICAL_URL}"' in "".join(setup[0]["source"])
