"""The README is a short user's guide whose Python blocks run as written."""

import importlib.util
import pathlib
import re

import pytest

import sparseopt_jax

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
TEXT = README.read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", TEXT, re.S)
MAX_LINES = 200


def test_readme_is_short():
  lines = len(TEXT.splitlines())
  assert lines <= MAX_LINES, (
      f"README.md has {lines} lines; keep it a user's guide of at most "
      f"{MAX_LINES} and move the rest to docs/"
  )


@pytest.mark.parametrize("marker", ["main-command", "test-command"])
def test_readme_has_the_commands(marker):
  """`.ci/run` reads the test command from the bash block after its marker."""
  found = re.search(rf"<!-- {marker} -->\n```bash\n(.+)\n```", TEXT)
  assert found, f"no bash block after <!-- {marker} -->"
  assert found.group(1).strip()


def test_readme_names_every_public_name():
  """The API overview lists the top level and the diagnostics namespace."""
  names = list(sparseopt_jax.__all__)
  names += list(
      getattr(getattr(sparseopt_jax, "diagnostics", None), "__all__", ())
  )
  missing = [n for n in names if not re.search(rf"`[^`]*\b{n}\b", TEXT)]
  assert not missing, f"README.md's API overview lacks {missing}"


def test_readme_has_python_blocks():
  assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index, capsys):
  block = BLOCKS[index]
  if re.search(r"^\s*(import|from) flax\b", block, re.M):
    if importlib.util.find_spec("flax") is None:
      pytest.skip(
          "the Flax examples need flax (pip install -e '.[experiments]')"
      )
  exec(compile(block, f"README.md block {index}", "exec"), {})
  assert capsys.readouterr().out.strip(), "each README example prints a result"
