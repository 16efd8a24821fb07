"""`make student`: the students' workbooks (student/) and the teachers' nbgrader source versions (teacher/source/),
kept in step with the notebooks; where the blanks fall and that nothing else in a workbook depends on them.
tests/test_workbooks.py runs the workbooks (slow)."""
from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("student_copies", ROOT / "scripts" / "student_copies.py")
student_copies = importlib.util.module_from_spec(_spec)
sys.modules["student_copies"] = student_copies  # its dataclasses look their module up there
_spec.loader.exec_module(student_copies)

BLANKS = student_copies.BLANKS
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def read(stem: str) -> nbformat.NotebookNode:
    return nbformat.read(ROOT / "notebooks" / f"{stem}.ipynb", as_version=4)


def test_a_copy_keeps_every_cell_and_drops_every_output():
    notebook = read("01_baseline_perplexity")
    assert any(c.cell_type == "code" and c.outputs for c in notebook.cells)  # the check below can fail
    copy = student_copies.student_copy(notebook)
    assert [c.source for c in copy.cells] == [c.source for c in notebook.cells]
    assert all(not c.outputs and c.execution_count is None for c in copy.cells if c.cell_type == "code")
    assert any(c.cell_type == "code" and c.outputs for c in notebook.cells), "the original is left as it was"


def test_the_committed_student_copies_match_the_notebooks(tmp_path):
    written = student_copies.write_copies(ROOT / "notebooks", tmp_path)
    committed = sorted((ROOT / "student").glob("*.ipynb"))
    assert [p.name for p in committed] == [p.name for p in written] == [p.name for p in NOTEBOOKS], \
        "run `make student` and commit student/"
    stale = [p.name for p in written if p.read_bytes() != (ROOT / "student" / p.name).read_bytes()]
    assert not stale, f"student/ is out of date for {stale}: run `make student` and commit student/"


def test_the_committed_nbgrader_sources_match_the_notebooks(tmp_path):
    written = student_copies.write_sources(ROOT / "notebooks", tmp_path)
    relative = sorted(str(p.relative_to(tmp_path)) for p in written)
    committed = sorted(str(p.relative_to(ROOT / "teacher")) for p in (ROOT / "teacher" / "source").glob("*/*.ipynb"))
    assert committed == relative == [f"source/{stem}/{stem}.ipynb" for stem in sorted(BLANKS)], \
        "run `make student` and commit teacher/"
    stale = [p for p in relative if (tmp_path / p).read_bytes() != (ROOT / "teacher" / p).read_bytes()]
    assert not stale, f"teacher/ is out of date for {stale}: run `make student` and commit teacher/"
    config = (ROOT / "teacher" / "nbgrader_config.py").read_text()
    assert "c.Execute.timeout = 1800" in config, "nbgrader's default of 30 s a cell would fail the training cells"


def test_a_folder_without_notebooks_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="holds no notebooks"):
        student_copies.write_copies(tmp_path, tmp_path / "out")


def test_a_renamed_notebook_is_refused(tmp_path):
    (tmp_path / "01_perplexity.ipynb").write_bytes((ROOT / "notebooks" / "01_baseline_perplexity.ipynb").read_bytes())
    with pytest.raises(SystemExit, match="01_baseline_perplexity"):
        student_copies.write_copies(tmp_path, tmp_path / "out")


@pytest.mark.parametrize("stem", sorted(BLANKS))
def test_each_selector_matches_exactly_one_cell(stem):
    notebook, blank = read(stem), BLANKS[stem]
    code = [i for i, c in enumerate(notebook.cells) if c.cell_type == "code"]
    solution = [i for i in code if blank.cell in notebook.cells[i].source]
    assert len(solution) == 1, (blank.cell, solution)
    later = [i for i in code if i > solution[0]]
    for check in blank.graded[1:]:
        assert len([i for i in later if check.cell in notebook.cells[i].source]) == 1, check
    where = student_copies.locate(notebook, stem, blank)
    assert where.solution == solution[0] and where.graded[0][0] == later[0], "graded: first the next code cell"
    # The check really is one: every graded cell asserts.
    assert all("assert " in notebook.cells[i].source for i, _ in where.graded)


@pytest.mark.parametrize("how", ["none", "two"])
def test_a_selector_that_matches_no_cell_or_two_stops_make_student(how):
    stem = "04_freeze_embeddings"
    notebook, blank = read(stem), BLANKS[stem]
    where = student_copies.locate(notebook, stem, blank)
    if how == "none":  # the cell was edited: its first line is gone
        notebook.cells[where.solution].source = notebook.cells[where.solution].source.replace(blank.cell, "by_hand = 0")
    else:  # the cell was copied further down
        notebook.cells.append(nbformat.from_dict(notebook.cells[where.solution]))
    with pytest.raises(SystemExit, match=f"matches {0 if how == 'none' else 2} code cells"):
        student_copies.workbook(notebook, stem)
    broken = student_copies.Blank(blank.grade_id, blank.cell, (student_copies.Graded(1, "x"),
                                                               student_copies.Graded(1, "y", "no such line")))
    with pytest.raises(SystemExit, match="graded-cell"):
        student_copies.locate(read(stem), stem, broken)


@pytest.mark.parametrize("stem", sorted(BLANKS))
def test_the_workbook_blanks_the_region_and_the_source_delimits_it(stem):
    notebook = read(stem)
    where = student_copies.locate(notebook, stem, BLANKS[stem])
    workbook = student_copies.workbook(notebook, stem)
    source = student_copies.source_version(notebook, stem)
    original = notebook.cells[where.solution].source.split("\n")
    kept = original[: where.start_line]
    assert workbook.cells[where.solution].source.split("\n") == kept + student_copies.STUB.split("\n")
    assert source.cells[where.solution].source.split("\n") == \
        kept + [student_copies.BEGIN] + original[where.start_line:] + [student_copies.END]
    assert "raise NotImplementedError()" in workbook.cells[where.solution].source
    graded = {index for index, _ in where.graded}
    for index, (cell, plain) in enumerate(zip(workbook.cells, student_copies.student_copy(notebook).cells)):
        if index != where.solution:
            assert cell.source == plain.source, index  # every other cell as in the notebook, the checks included
        assert ("nbgrader" in cell.metadata) == (index == where.solution or index in graded), index
        assert ("nbgrader" in source.cells[index].metadata) == ("nbgrader" in cell.metadata)
    assert not any(c.get("outputs") for c in source.cells), "the source versions carry no outputs"


@pytest.mark.parametrize("stem", sorted(BLANKS))
def test_the_cells_carry_nbgrader_metadata_of_schema_3(stem):
    workbook = student_copies.workbook(read(stem), stem)
    marked = [c for c in workbook.cells if "nbgrader" in c.metadata]
    allowed = {"schema_version", "grade", "locked", "solution", "task", "grade_id", "points"}  # nbgrader's v3.json
    ids = [c.metadata.nbgrader.grade_id for c in marked]
    assert len(set(ids)) == len(ids) == len(BLANKS[stem].graded) + 1
    for cell in marked:
        meta = cell.metadata.nbgrader
        assert set(meta) <= allowed and meta.schema_version == 3 and meta.task is False
        assert all(ch.isalnum() or ch in "_-" for ch in meta.grade_id)
        if meta.solution:  # the blank: editable, not deletable (nbgrader's LockCells)
            assert not meta.grade and not meta.locked and cell.metadata.deletable is False
            assert "editable" not in cell.metadata
        else:  # a graded check: locked, points, neither editable nor deletable
            assert meta.grade and meta.locked and meta.points > 0
            assert cell.metadata.editable is False and cell.metadata.deletable is False


@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if p.stem not in BLANKS], ids=lambda p: p.stem[:2])
def test_a_notebook_without_a_blank_is_a_plain_copy(path):
    notebook = nbformat.read(path, as_version=4)
    copy = student_copies.workbook(notebook, path.stem)
    assert [c.source for c in copy.cells] == [c.source for c in notebook.cells]
    assert not any("nbgrader" in c.metadata or "NotImplementedError()" in c.source for c in copy.cells)


def _bound(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
    return names


def _read(tree: ast.AST) -> set[str]:
    return {node.id for node in ast.walk(tree)
            if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Load, ast.Del))}


def dependent_cells(notebook: nbformat.NotebookNode, where) -> list[int]:
    """Return the code cells after the blank that read a name only its solution region binds (statement by statement,
    so that a cell which binds the name again first does not count)."""
    code = [i for i, c in enumerate(notebook.cells) if c.cell_type == "code"]
    lines = notebook.cells[where.solution].source.split("\n")
    before = set().union(*(_bound(ast.parse(notebook.cells[i].source)) for i in code if i < where.solution))
    before |= _bound(ast.parse("\n".join(lines[: where.start_line])))
    only = _bound(ast.parse("\n".join(lines[where.start_line:]))) - before
    dependents = []
    for i in (i for i in code if i > where.solution):
        for statement in ast.parse(notebook.cells[i].source).body:
            if _read(statement) & only and i not in dependents:
                dependents.append(i)
            only -= _bound(statement)
    return dependents


@pytest.mark.parametrize("stem", sorted(BLANKS))
def test_only_the_graded_cells_read_what_the_blank_defines(stem):
    """So that a blank workbook fails at the blank and its graded cells only: any later cell that reads a name the
    blank alone defines must be one of its graded cells (BLANKS lists it), or the blank is in the wrong cell."""
    notebook = read(stem)
    where = student_copies.locate(notebook, stem, BLANKS[stem])
    assert dependent_cells(notebook, where) == [index for index, _ in where.graded]
