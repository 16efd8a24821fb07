"""`make student`: output-free copies of the notebooks, kept in step with them (the committed student/ folder)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("student_copies", ROOT / "scripts" / "student_copies.py")
student_copies = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(student_copies)


def test_a_copy_keeps_every_cell_and_drops_every_output():
    notebook = nbformat.read(ROOT / "notebooks" / "01_baseline_perplexity.ipynb", as_version=4)
    assert any(c.cell_type == "code" and c.outputs for c in notebook.cells)  # the check below can fail
    copy = student_copies.student_copy(notebook)
    assert [c.source for c in copy.cells] == [c.source for c in notebook.cells]
    assert all(not c.outputs and c.execution_count is None for c in copy.cells if c.cell_type == "code")
    assert any(c.cell_type == "code" and c.outputs for c in notebook.cells), "the original is left as it was"


def test_the_committed_student_copies_match_the_notebooks(tmp_path):
    written = student_copies.write_copies(ROOT / "notebooks", tmp_path)
    committed = sorted((ROOT / "student").glob("*.ipynb"))
    assert [p.name for p in committed] == [p.name for p in written], "run `make student` and commit student/"
    stale = [p.name for p in written if p.read_bytes() != (ROOT / "student" / p.name).read_bytes()]
    assert not stale, f"student/ is out of date for {stale}: run `make student` and commit student/"


def test_a_folder_without_notebooks_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="holds no notebooks"):
        student_copies.write_copies(tmp_path, tmp_path / "out")
