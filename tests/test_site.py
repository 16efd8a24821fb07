"""The course website's build (make site) fails on a broken internal link, and renders what it should.

A tiny project with the site's own configuration (docs/site/conf.py, used as is) is built once in a temporary
folder, with good links on most pages and one broken link of each kind on one page. No notebook is executed and
nothing touches the network.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
# The flags of the Makefile's SITE_FLAGS (less -d, which points into the repository's build/).
FLAGS = ["-b", "html", "-c", str(ROOT / "docs" / "site"), "-W", "--keep-going", "-n", "-E", "-q"]
BROKEN = {
    "a missing page": "[gone](02_missing_chapter.ipynb)",
    "a missing file": "[gone](../src/helpers/missing.py)",
    "a missing heading anchor": "[gone](../docs/references.md#no-such-heading)",
    "a missing anchor in this page": "[gone](#no-such-section)",
}

# It launches sphinx-build (about 5 s here beside the sweep): `make unit-all` runs it, `make unit` does not.
pytestmark = pytest.mark.slow

pytest.importorskip("myst_nb", reason="the site's packages are missing: run `make setup` (they are in the dev extras)")


def _notebook(path: Path, title: str, text: str, outputs=()) -> None:
    cell = nbformat.v4.new_code_cell("x = 1", outputs=list(outputs), execution_count=1)
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell(f"# {title}\n\n{text}"), cell])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)


def _project(root: Path) -> Path:
    """Write a miniature of the repository: README, two chapters, a solution, the docs and a non-page file."""
    (root / "docs").mkdir(parents=True)
    (root / "README.md").write_text("# Course\n\nStart with [the glossary](docs/glossary.md); the data: "
                                    "[data/README.md](data/README.md).\n")
    (root / "docs" / "glossary.md").write_text("# Glossary\n\nSee [Hu et al.](references.md#hu-et-al-2021).\n")
    (root / "docs" / "references.md").write_text("# References\n\n### Hu et al. 2021\n\nLoRA.\n")
    (root / "docs" / "families.md").write_text("# Families\n")
    (root / "data").mkdir()
    (root / "data" / "README.md").write_text("# The corpus (not a page)\n")
    (root / "src" / "helpers").mkdir(parents=True)
    (root / "src" / "helpers" / "data.py").write_text("# not a page\n")
    _notebook(root / "notebooks" / "00_first.ipynb", "00 · First",
              "Next: [01](01_second.ipynb), its [solution](../solutions/00_first_solutions.ipynb#answers), "
              "[the code](../src/helpers/data.py), [Hu et al.](../docs/references.md#hu-et-al-2021).")
    widget = nbformat.v4.new_output("display_data", data={
        "application/vnd.jupyter.widget-view+json": {"model_id": "abc", "version_major": 2, "version_minor": 0},
        "text/plain": "Dropdown(options=('a', 'b'))"})
    _notebook(root / "notebooks" / "01_second.ipynb", "01 · Second", "Back to [00](00_first.ipynb).", [widget])
    _notebook(root / "solutions" / "00_first_solutions.ipynb", "Solutions · 00", "## Answers\n\nYes.")
    return root


def _build(source: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sphinx", *FLAGS, "-d", str(source / ".doctrees"), str(source),
                           str(source / "site")], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """Build, once, the tiny project with one broken link of each kind on a page of its own (02_broken)."""
    root = _project(tmp_path_factory.mktemp("site"))
    _notebook(root / "notebooks" / "02_broken.ipynb", "02 · Broken", " ".join(BROKEN.values()))
    return _build(root), root / "site"


def test_every_kind_of_broken_internal_link_fails_the_build(built):
    result, _ = built
    assert result.returncode != 0, "a build with broken links succeeded"
    warnings = [line for line in result.stderr.splitlines() if "WARNING" in line or "ERROR" in line]
    # One warning per broken link, each naming what is missing, and none for the good links of the other pages.
    assert all("02_broken.ipynb" in line and "[myst.xref_missing]" in line for line in warnings), warnings
    for kind, name in [("a missing page", "02_missing_chapter"), ("a missing file", "missing.py"),
                       ("a missing heading anchor", "no-such-heading"),
                       ("a missing anchor in this page", "no-such-section")]:
        assert any(name in line for line in warnings), f"no warning for {kind}: {warnings}"
    assert len(warnings) == len(BROKEN), warnings


def test_good_links_resolve_files_become_downloads_and_widget_pages_say_so(built):
    _, site = built
    first = (site / "notebooks" / "00_first.html").read_text()
    assert 'href="../docs/references.html#hu-et-al-2021"' in first
    assert 'href="../solutions/00_first_solutions.html#answers"' in first
    assert re.search(r'class="[^"]*download[^"]*"[^>]*href="../_downloads/\w+/data.py"', first), \
        "a link to an existing file that is not a page should become a download link"
    assert re.search(r'href="_downloads/\w+/README.md"', (site / "README.html").read_text()), \
        "a link to a Markdown file that is not a page should become a download link"
    widget_page = (site / "notebooks" / "01_second.html").read_text()
    assert "widget-note" in widget_page and "run the notebook in JupyterLab" in widget_page, "no widget note"
    assert "widget-note" not in first, "a widget note on a page without widgets"
    assert "Dropdown(options=" in widget_page, "the widget's static form is not shown"
    assert (site / "index.html").is_file() and (site / "_static" / "mathjax" / "tex-chtml.js").is_file()
    assert not (site / "data").exists() and not (site / "src").exists(), "a non-page folder became pages"
