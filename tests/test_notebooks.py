"""The notebooks read like a book, not a stack of copies: no cell is repeated across notebooks, none is empty."""
from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
IMPORT = re.compile(r"^(import \S+|from \S+ import .+)$")


def cells(path: Path) -> list[tuple[str, str]]:
    """Return (cell type, source) of every cell of the notebook at `path`."""
    return [(c["cell_type"], "".join(c["source"]).strip()) for c in json.loads(path.read_text())["cells"]]


def repeated_cells(notebooks: list[Path]) -> dict[str, list[str]]:
    """Return {cell source: notebooks holding it} for every cell in more than one notebook (one-line imports aside)."""
    where: dict[str, set[str]] = defaultdict(set)
    for path in notebooks:
        for _, source in cells(path):
            if source and not IMPORT.match(source):
                where[source].add(path.stem)
    return {source: sorted(names) for source, names in where.items() if len(names) > 1}


def test_the_notebooks_are_all_found():
    assert len(NOTEBOOKS) >= 9 and NOTEBOOKS[0].stem.startswith("00_")


def test_no_cell_is_repeated_across_notebooks():
    repeated = repeated_cells(NOTEBOOKS)
    report = "\n\n".join(f"{names}:\n{source[:200]}" for source, names in repeated.items())
    assert not repeated, (f"{len(repeated)} cells appear in more than one notebook; "
                          f"move the shared step into helpers:\n{report}")


def test_the_check_finds_a_repeated_cell(tmp_path):
    # The check itself can fail: two notebooks sharing a two-line cell are reported, a shared one-line import is not.
    for name in ("a", "b"):
        nb = {"cells": [{"cell_type": "code", "source": ["import helpers"]},
                        {"cell_type": "code", "source": ["x = 1\n", "print(x)"]},
                        {"cell_type": "markdown", "source": [f"# notebook {name}"]}]}
        (tmp_path / f"{name}.ipynb").write_text(json.dumps(nb))
    assert repeated_cells(sorted(tmp_path.glob("*.ipynb"))) == {"x = 1\nprint(x)": ["a", "b"]}


def test_no_cell_is_empty():
    empty = [(path.stem, i) for path in NOTEBOOKS for i, (_, source) in enumerate(cells(path)) if not source]
    assert not empty, f"empty cells: {empty}"


def test_notebooks_carry_the_metadata_jupyterlab_writes():
    """JupyterLab rewrites another kernelspec name or stored widget state on opening, so a read leaves git dirty.

    tests/browser checks the same in a real JupyterLab; this is the offline half, for machines without a browser.
    """
    import importlib.util

    from jupyter_client.kernelspec import get_kernel_spec

    root = NOTEBOOKS[0].parents[1]
    # Loaded from its file, as tests/test_student.py loads scripts/student_copies.py: scripts/ is no package.
    spec = importlib.util.spec_from_file_location("run_notebooks", root / "scripts" / "run_notebooks.py")
    run_notebooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_notebooks)
    kernelspec = run_notebooks.kernelspec
    assert kernelspec()["display_name"] == get_kernel_spec("python3").display_name
    paths = [p for folder in ("notebooks", "solutions", "student") for p in sorted((root / folder).glob("*.ipynb"))]
    assert len(paths) >= 3 * len(NOTEBOOKS) - 1
    wrong = [p.relative_to(root).as_posix() for p in paths
             if (meta := json.loads(p.read_text())["metadata"]).get("kernelspec") != kernelspec() or "widgets" in meta]
    assert not wrong, f"re-run scripts/run_notebooks.py (or make student) for {wrong}"


def test_every_chapter_before_the_last_ends_with_a_next_link():
    for path, following in zip(NOTEBOOKS, NOTEBOOKS[1:]):
        kind, source = cells(path)[-1]
        assert kind == "markdown" and source.startswith("**Next:**") and f"({following.name})" in source, (
            f"{path.name} should end with a markdown cell '**Next:** [..]({following.name}) ...'")


def test_every_figure_has_alt_text():
    """A figure shown by helpers.show_figure carries its description; one left to Jupyter's display does not."""
    for path in NOTEBOOKS + sorted(NOTEBOOKS[0].parents[1].glob("solutions/*.ipynb")):
        for i, cell in enumerate(json.loads(path.read_text())["cells"]):
            for output in cell.get("outputs", []):
                if "image/png" in output.get("data", {}):
                    alt = output.get("metadata", {}).get("image/png", {}).get("alt", "")
                    assert alt.strip(), f"{path.name} cell {i}: a figure without alt text (use helpers.show_figure)"


def test_the_readme_class_plans_add_up_to_their_stated_times():
    readme = (NOTEBOOKS[0].parents[1] / "README.md").read_text()
    minutes = {int(n): int(m) for n, m in re.findall(r"^\| (\d\d) \|.*\| (\d+) min \|$", readme, re.M)}
    assert sorted(minutes) == list(range(len(NOTEBOOKS))), "the syllabus table gives every notebook a class time"
    lab = re.search(r"\*\*A (\d+)-minute lab\*\*.*?\n\n", readme, re.S)
    assert sum(map(int, re.findall(r"\((\d+) min\)", lab.group(0)))) == int(lab.group(1))
    sessions = re.findall(r"^\d\. \*[^*]+\* \((\d+) min\): (\d\d)(?:, |–)(?:\d\d, )*(\d\d)", readme, re.M)
    assert len(sessions) == 3
    for stated, first, last in sessions:
        assert sum(minutes[n] for n in range(int(first), int(last) + 1)) == int(stated), (first, last, stated)
