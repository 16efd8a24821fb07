"""The graded workbooks run (slow): each blank filled with the notebook's own code passes; left blank, the workbook
fails at exactly its blank and its graded cells; nbgrader's generate_assignment writes the same blank, and autograde
gives a filled submission full marks and a blank one zero. On a tiny saved Llama with a BOS, named by TUTORIAL_MODEL
(as in tests/test_other_models.py): on the real model these runs would take CI minutes a notebook."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from helpers.experiment import results_dir

from conftest import save_reader_model
from test_student import BLANKS, ROOT, read, student_copies

NBGRADER_VENV = ROOT / "build" / "nbgrader-venv"
GRADED_BY_NBGRADER = "07_lora"  # of the five, three graded cells, and quick on a tiny model


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    """Return the folder of a tiny saved Llama whose tokenizer adds a BOS, with the recipe's 256-token context."""
    folder = save_reader_model(tmp_path_factory.mktemp("workbook-llama"), "llama", bos=True)
    yield folder
    shutil.rmtree(results_dir(str(folder)), ignore_errors=True)  # results/other-models/<model>/: the runs' own


@pytest.fixture
def on_tiny_model(tiny_model, tmp_path, monkeypatch):
    """Point the notebooks (and nbgrader's kernels, which inherit the environment) at the tiny model, offline, with a
    cache of their own; fail if a run touched the default model's committed results."""
    monkeypatch.setenv("TUTORIAL_MODEL", tiny_model)
    monkeypatch.setenv("TUTORIAL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # results/*.json: what a notebook saves for the default model (a sweep run beside the tests writes results/sweep*/)
    committed = {p: p.read_bytes() for p in (ROOT / "results").glob("*.json")}
    yield tiny_model
    changed = [str(p.relative_to(ROOT)) for p, data in committed.items() if not p.exists() or p.read_bytes() != data]
    assert not changed, f"a workbook run touched the default model's results: {changed}"


def filled(blank: nbformat.NotebookNode, notebook: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Return the workbook `blank` with its solution cell's source put back from `notebook` (the same cells)."""
    copy = nbformat.from_dict(blank)
    assert len(copy.cells) == len(notebook.cells)
    solutions = [i for i, cell in enumerate(copy.cells) if cell.metadata.get("nbgrader", {}).get("solution")]
    assert len(solutions) == 1, solutions
    for i in solutions:
        copy.cells[i].source = notebook.cells[i].source
    return copy


def failing_cells(notebook: nbformat.NotebookNode, folder: Path) -> dict[int, str]:
    """Run `notebook` to the end in `folder`, errors allowed; return {index: error name} of the cells that raised."""
    NotebookClient(notebook, timeout=600, kernel_name="python3", allow_errors=True,
                   resources={"metadata": {"path": str(folder)}}).execute()
    return {i: error.ename for i, cell in enumerate(notebook.cells) if cell.cell_type == "code"
            for error in cell.outputs if error.output_type == "error"}


def workbook(stem: str) -> nbformat.NotebookNode:
    """Return the workbook that `make student` writes (tests/test_student.py checks that student/ holds it)."""
    return student_copies.workbook(read(stem), stem)


@pytest.mark.slow
@pytest.mark.parametrize("stem", sorted(BLANKS), ids=lambda stem: stem[:2])
def test_the_workbook_filled_with_the_notebooks_code_passes(stem, on_tiny_model, tmp_path):
    submission = filled(workbook(stem), read(stem))
    assert failing_cells(submission, tmp_path) == {}


@pytest.mark.slow
@pytest.mark.parametrize("stem", sorted(BLANKS), ids=lambda stem: stem[:2])
def test_the_blank_workbook_fails_at_the_blank_and_its_graded_cells_only(stem, on_tiny_model, tmp_path):
    where = student_copies.locate(read(stem), stem, BLANKS[stem])
    failed = failing_cells(workbook(stem), tmp_path)
    assert sorted(failed) == sorted([where.solution, *(index for index, _ in where.graded)]), failed
    assert failed[where.solution] == "NotImplementedError"


GRADES = """
import json, sys
from nbgrader.api import Gradebook
with Gradebook("sqlite:///gradebook.db") as gradebook:
    out = {}
    for student in sys.argv[2:]:
        submission = gradebook.find_submission(sys.argv[1], student)
        out[student] = {"score": submission.score, "max_score": submission.max_score,
                        "cells": {grade.name: [grade.score, grade.max_score]
                                  for notebook in submission.notebooks for grade in notebook.grades}}
print(json.dumps(out))
"""


@pytest.mark.slow
def test_nbgrader_generates_the_workbook_and_grades_it(on_tiny_model, tmp_path):
    nbgrader = NBGRADER_VENV / "bin" / "nbgrader"
    if not nbgrader.is_file():
        pytest.skip(f"nbgrader is not installed in {NBGRADER_VENV.relative_to(ROOT)}: `make nbgrader` builds it "
                    "(`make test` does, first)")
    stem = GRADED_BY_NBGRADER
    course = tmp_path / "course"  # a copy of teacher/: the gradebook and the submissions stay in tmp_path
    shutil.copytree(ROOT / "teacher", course, ignore=shutil.ignore_patterns(
        "gradebook.db", "release", "submitted", "autograded", "feedback", ".nbgrader.log"))
    # nbgrader's kernel is this Python (the project's, with torch and helpers), whatever kernels are installed.
    kernel = tmp_path / "jupyter" / "kernels" / "python3"
    kernel.mkdir(parents=True)
    (kernel / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (ipykernel)", "language": "python"}))
    # nbgrader runs its venv's `alembic` command from PATH to set up the gradebook.
    env = {**os.environ, "JUPYTER_PATH": str(tmp_path / "jupyter"),
           "PATH": f"{NBGRADER_VENV / 'bin'}{os.pathsep}{os.environ['PATH']}"}

    def run(*args: str) -> str:
        done = subprocess.run([str(nbgrader), *args], cwd=course, env=env, capture_output=True, text=True,
                              timeout=900)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout + done.stderr

    run("generate_assignment", stem)
    release = nbformat.read(course / "release" / stem / f"{stem}.ipynb", as_version=4)
    ours = workbook(stem)
    assert [c.source for c in release.cells] == [c.source for c in ours.cells], "nbgrader blanks as make student"
    for mine, theirs in zip(ours.cells, release.cells):
        assert {k: v for k, v in theirs.metadata.get("nbgrader", {}).items() if k not in ("checksum", "cell_type")} \
            == mine.metadata.get("nbgrader", {})

    for student, notebook in (("filled", filled(release, read(stem))), ("blank", release)):
        folder = course / "submitted" / student / stem
        folder.mkdir(parents=True)
        nbformat.write(notebook, folder / f"{stem}.ipynb")
    run("autograde", stem)
    grades = json.loads(subprocess.run(
        [str(NBGRADER_VENV / "bin" / "python"), "-c", GRADES, stem, "filled", "blank"], cwd=course, env=env,
        capture_output=True, text=True, check=True).stdout)
    points = {check.grade_id: float(check.points) for check in BLANKS[stem].graded}
    assert grades["filled"]["cells"] == {grade_id: [p, p] for grade_id, p in points.items()}, grades
    assert grades["filled"]["score"] == grades["filled"]["max_score"] == sum(points.values())
    assert grades["blank"]["cells"] == {grade_id: [0.0, p] for grade_id, p in points.items()}, grades
    assert grades["blank"]["score"] == 0
