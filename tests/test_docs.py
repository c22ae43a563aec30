"""The Sphinx docs build without warnings and document every public name."""

import html
import importlib.util
import pathlib
import re
import subprocess
import sys

import pytest

import sparseopt_jax

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))


def _public(module):
  return list(getattr(module, "__all__", ()))


def _diagnostics_names():
  diagnostics = getattr(sparseopt_jax, "diagnostics", None)
  return _public(diagnostics) if diagnostics is not None else []


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  for module in ("sphinx", "myst_parser", "furo"):
    if importlib.util.find_spec(module) is None:
      pytest.skip(f"{module} is not installed (pip install -e '.[docs]')")
  out = tmp_path_factory.mktemp("html")
  result = subprocess.run(
      [
          sys.executable,
          "-m",
          "sphinx",
          "-W",
          "--keep-going",
          "-E",
          "-q",
          "-b",
          "html",
          str(DOCS),
          str(out),
      ],
      capture_output=True,
      text=True,
      timeout=300,
      check=False,
  )
  assert result.returncode == 0, result.stdout + result.stderr
  return out


def test_build_has_every_page(built):
  for page in PAGES:
    assert (built / page.with_suffix(".html").name).exists(), page.name


@pytest.mark.parametrize("name", _public(sparseopt_jax))
def test_api_page_documents_top_level_name(built, name):
  page = (built / "api.html").read_text()
  target = (
      "module-sparseopt_jax.diagnostics"
      if name == "diagnostics"
      else f"sparseopt_jax.{name}"
  )
  assert f'id="{target}"' in page, f"{name} is missing from docs/api.md"


@pytest.mark.parametrize("name", _diagnostics_names())
def test_api_page_documents_diagnostics_name(built, name):
  page = (built / "api.html").read_text()
  assert (
      f'id="sparseopt_jax.diagnostics.{name}"' in page
  ), f"diagnostics.{name} is missing from docs/api.md"


def test_docstring_references_render_as_links(built):
  page = html.unescape((built / "api.html").read_text())
  cited = set(re.findall(r"https://arxiv\.org/abs/[0-9.]+[0-9]", page))
  linked = set(
      re.findall(r'href="(https://arxiv\.org/abs/[0-9.]+[0-9])"', page)
  )
  assert cited, "no arXiv reference in the API page"
  assert cited == linked, f"not links: {sorted(cited - linked)}"


def test_figures_are_copied_into_the_build(built):
  for page in PAGES:
    for src in re.findall(
        r'<img [^>]*src="([^"]+)"',
        (built / page.with_suffix(".html").name).read_text(),
    ):
      assert (built / src).exists(), f"{page.name}: {src}"


# Links to repository files outside docs/ use these URLs, which work on
# GitHub and in Sphinx alike (MyST would read a relative `.md` link as a page).
REPO_URLS = (
    "https://github.com/sparseopt-jax/sparseopt-jax/blob/main/",
    "https://github.com/sparseopt-jax/sparseopt-jax/tree/main/",
    "https://colab.research.google.com/github/sparseopt-jax/sparseopt-jax/blob/main/",
)


@pytest.mark.parametrize(
    "page",
    PAGES + [ROOT / "README.md", ROOT / "CONTRIBUTING.md"],
    ids=lambda p: p.name,
)
def test_links_to_repository_files_resolve(page):
  """Relative links and images, and links into this repository, must exist."""
  if not page.exists():
    pytest.skip(f"{page.name} does not exist")
  text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
  for target in re.findall(r"\]\(([^)\s]+)\)", text):
    target = target.split("#")[0]
    repo_url = next((u for u in REPO_URLS if target.startswith(u)), None)
    if repo_url is not None:
      path = ROOT / target[len(repo_url) :]
    elif not target or re.match(r"[a-z]+:", target):
      continue
    else:
      path = (page.parent / target).resolve()
    assert path.exists(), f"{page.name}: broken link {target}"
