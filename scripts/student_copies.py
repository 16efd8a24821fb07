"""Write the students' workbooks and the teachers' nbgrader source versions of the notebooks.

Usage: python scripts/student_copies.py [SOURCE_FOLDER] [TARGET_FOLDER] [TEACHER_FOLDER]
(default: notebooks student teacher; `make student`).

TARGET_FOLDER gets every notebook without outputs or execution counts. In the notebooks named in BLANKS, the cell that
writes a mechanic out by hand (perplexity, the training loop, freezing, ...) is blanked as nbgrader blanks it: from
its solution region on it reads `# YOUR CODE HERE` / `raise NotImplementedError()`. The cell after it, which asserts
that the hand-written result equals the helper's, is kept as the graded check (with any later cell that reads what
only the blank defines). Both carry nbgrader's cell metadata, so the workbooks can be graded with or without nbgrader.

TEACHER_FOLDER/source/<notebook>/<notebook>.ipynb gets, for each blanked notebook, nbgrader's *source* version: the
whole notebook without outputs, the solution region between `### BEGIN SOLUTION` and `### END SOLUTION`, so that
`nbgrader generate_assignment` writes the same blank and `nbgrader autograde` grades submissions (see the README,
"For teachers"). tests/test_student.py checks that student/ and teacher/source/ are what this writes.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import nbformat

STUB = "# YOUR CODE HERE\nraise NotImplementedError()"  # nbgrader's ClearSolutions.code_stub for Python
BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
SCHEMA_VERSION = 3  # nbgrader's cell-metadata schema (nbgrader/nbgraderformat/v3.json, nbgrader 0.9)


@dataclass(frozen=True)
class Graded:
    """A graded (locked, asserting) cell: its points, its nbgrader grade_id and, for any cell but the next code cell
    after the blank, a substring of its source that no other code cell after the blank holds."""

    points: int
    grade_id: str
    cell: str | None = None


@dataclass(frozen=True)
class Blank:
    """One solution cell: `cell`, a substring of its source that no other code cell holds; `start`, a substring of the
    one unindented line where the solution region begins (None: after the cell's leading comment lines), the lines
    above it stay in the workbook; the graded cells, the first of them the next code cell."""

    grade_id: str
    cell: str
    graded: tuple[Graded, ...]
    start: str | None = None


BLANKS = {
    # Perplexity by hand from the logits; the lines that choose the text and build x stay (later cells read them).
    "01_baseline_perplexity": Blank(
        "perplexity_by_hand", "ppl_by_hand = mean_nll.exp().item()", start="with torch.no_grad():",
        graded=(Graded(2, "perplexity_by_hand_equals_helper"),)),
    # The KV-cache check: logits token by token through the cache against one full-sequence pass.
    "02_kv_cache_fix": Blank(
        "token_by_token_logits", "steps = helpers.logits_token_by_token(model, sequence)",
        start="with torch.no_grad():", graded=(Graded(2, "token_by_token_equals_full"),)),
    # The training loop written out. The helper's run later compares its first losses with hand_losses.
    "03_full_fine_tuning": Blank(
        "training_loop_by_hand", "def next_token_loss(model, ids):",
        graded=(Graded(1, "schedule_equals_helper"),
                Graded(2, "losses_equal_helper", "helper_losses = history[\"train_loss\"]"))),
    # Freezing by hand with requires_grad_, against apply_strategy.
    "04_freeze_embeddings": Blank(
        "freezing_by_hand", "by_hand = copy.deepcopy(model)",
        graded=(Graded(2, "frozen_flags_equal_helper"),)),
    # LoRA's parameter arithmetic. peft's count after wrapping and the merged model's count check it again.
    "07_lora": Blank(
        "lora_parameter_arithmetic", "lora_total = int(table.loc",
        graded=(Graded(2, "lora_count_equals_helper"),
                Graded(1, "lora_count_equals_peft", "assert run.counts[\"trainable\"] == lora_total"),
                Graded(1, "merged_count_equals_base", "helpers.count_parameters(merged)[1] == base_total"))),
}
"""Notebook stem -> its blank. A selector that matches no cell or several stops `make student` with a message."""


@dataclass(frozen=True)
class Located:
    """Where a Blank falls in a notebook: the solution cell's index, the region's first line, the graded cells."""

    solution: int
    start_line: int
    graded: tuple[tuple[int, Graded], ...]


def _code_cells(notebook: nbformat.NotebookNode, after: int = -1) -> list[int]:
    return [i for i, cell in enumerate(notebook.cells) if cell.cell_type == "code" and i > after]


def _only_one(notebook_name: str, what: str, selector: str, matches: list[int]) -> int:
    if len(matches) != 1:
        raise SystemExit(
            f"{notebook_name}: the {what} selector {selector!r} (scripts/student_copies.py, BLANKS) matches "
            f"{len(matches)} code cells {matches if matches else ''}, not exactly one: the notebook changed; "
            "update the selector so that it names the intended cell again (or the workbook would lose its blank).")
    return matches[0]


def locate(notebook: nbformat.NotebookNode, name: str, blank: Blank) -> Located:
    """Return where `blank` falls in `notebook` (called `name` in messages); SystemExit if a selector is not unique."""
    solution = _only_one(name, "solution-cell", blank.cell,
                         [i for i in _code_cells(notebook) if blank.cell in notebook.cells[i].source])
    lines = notebook.cells[solution].source.split("\n")
    if blank.start is None:
        leading = [i for i, line in enumerate(lines) if line.strip() and not line.lstrip().startswith("#")]
        start_line = leading[0] if leading else len(lines)
    else:
        start_line = [i for i, line in enumerate(lines) if blank.start in line]
        if len(start_line) != 1:
            raise SystemExit(f"{name}: the region-start selector {blank.start!r} matches {len(start_line)} lines of "
                             "the solution cell, not exactly one; update BLANKS in scripts/student_copies.py.")
        start_line = start_line[0]
    if start_line >= len(lines) or lines[start_line] != lines[start_line].lstrip():
        raise SystemExit(f"{name}: the solution region of cell {solution} must start at an unindented line of code.")
    later = _code_cells(notebook, after=solution)
    if not later or blank.graded[0].cell is not None:
        raise SystemExit(f"{name}: the first graded cell of {blank.grade_id!r} is the next code cell after it "
                         "(its selector must be None), and there must be one.")
    graded = [(later[0], blank.graded[0])]
    for check in blank.graded[1:]:
        graded.append((_only_one(name, f"graded-cell ({check.grade_id})", check.cell,
                                 [i for i in later if check.cell in notebook.cells[i].source]), check))
    if len({index for index, _ in graded}) != len(graded):
        raise SystemExit(f"{name}: two graded cells of {blank.grade_id!r} are the same cell.")
    return Located(solution, start_line, tuple(graded))


def solution_metadata(grade_id: str) -> dict:
    return {"grade": False, "grade_id": grade_id, "locked": False, "schema_version": SCHEMA_VERSION,
            "solution": True, "task": False}


def graded_metadata(check: Graded) -> dict:
    return {"grade": True, "grade_id": check.grade_id, "locked": True, "points": check.points,
            "schema_version": SCHEMA_VERSION, "solution": False, "task": False}


def student_copy(notebook: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Return a copy of `notebook` with every output, execution count and widget state removed."""
    copy = nbformat.from_dict(notebook)
    for cell in copy.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
        cell.metadata.pop("execution", None)
    # Only the kernelspec and language_info that JupyterLab writes on opening it (scripts/run_notebooks.py):
    # anything else would mark a just-opened copy as modified.
    copy.metadata = nbformat.from_dict({key: notebook.metadata[key] for key in ("kernelspec", "language_info")
                                        if key in notebook.metadata})
    return copy


def _marked(notebook: nbformat.NotebookNode, name: str, blank: Blank, *, region: str) -> nbformat.NotebookNode:
    """Return the output-free copy with the solution cell's region replaced by `region` ('stub' or 'delimited')."""
    where = locate(notebook, name, blank)
    copy = student_copy(notebook)
    cell = copy.cells[where.solution]
    lines = cell.source.split("\n")
    kept, solution = lines[: where.start_line], lines[where.start_line:]
    body = STUB.split("\n") if region == "stub" else [BEGIN, *solution, END]
    cell.source = "\n".join(kept + body)
    cell.metadata["nbgrader"] = solution_metadata(blank.grade_id)
    for index, check in where.graded:
        copy.cells[index].metadata["nbgrader"] = graded_metadata(check)
    if region == "stub":  # what nbgrader's LockCells writes into a release version
        cell.metadata["deletable"] = False
        for index, _ in where.graded:
            copy.cells[index].metadata.update(deletable=False, editable=False)
    return copy


def workbook(notebook: nbformat.NotebookNode, name: str) -> nbformat.NotebookNode:
    """Return the student's copy of the notebook `name` (a stem): output-free, and blanked where BLANKS says."""
    return _marked(notebook, name, BLANKS[name], region="stub") if name in BLANKS else student_copy(notebook)


def source_version(notebook: nbformat.NotebookNode, name: str) -> nbformat.NotebookNode:
    """Return nbgrader's source version of the notebook `name` (in BLANKS): output-free, the solution delimited."""
    return _marked(notebook, name, BLANKS[name], region="delimited")


def _notebooks(source: Path) -> list[Path]:
    notebooks = sorted(source.glob("*.ipynb"))
    if not notebooks:
        raise SystemExit(f"{source} holds no notebooks (*.ipynb); pass the folder of the tutorial's notebooks.")
    missing = sorted(set(BLANKS) - {path.stem for path in notebooks})
    if missing:
        raise SystemExit(f"{source} has no notebook {missing} that BLANKS (scripts/student_copies.py) blanks: "
                         "a notebook was renamed; update BLANKS.")
    return notebooks


def write_copies(source: Path, target: Path) -> list[Path]:
    """Return paths written: a workbook in `target` for every notebook in `source` (stale copies removed)."""
    notebooks = _notebooks(source)
    target.mkdir(parents=True, exist_ok=True)
    for stale in target.glob("*.ipynb"):
        if not (source / stale.name).is_file():
            stale.unlink()
    for path in notebooks:
        nbformat.write(workbook(nbformat.read(path, as_version=4), path.stem), target / path.name)
    return [target / path.name for path in notebooks]


def write_sources(source: Path, teacher: Path) -> list[Path]:
    """Return paths written: nbgrader's source version of every notebook in BLANKS, in nbgrader's course layout
    `teacher`/source/<assignment>/<notebook>.ipynb with one assignment per notebook (stale ones removed)."""
    notebooks = _notebooks(source)
    written = []
    for path in notebooks:
        folder = teacher / "source" / path.stem
        if path.stem not in BLANKS:  # no longer blanked: its source version goes
            (folder / path.name).unlink(missing_ok=True)
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
            continue
        folder.mkdir(parents=True, exist_ok=True)
        nbformat.write(source_version(nbformat.read(path, as_version=4), path.stem), folder / path.name)
        written.append(folder / path.name)
    return written


def main(argv: list[str]) -> None:
    source = Path(argv[0]) if argv else Path("notebooks")
    target = Path(argv[1]) if len(argv) > 1 else Path("student")
    teacher = Path(argv[2]) if len(argv) > 2 else Path("teacher")
    written = write_copies(source, target)
    print(f"wrote {len(written)} output-free notebooks to {target}/, {len(BLANKS)} of them with a blank to fill")
    sources = write_sources(source, teacher)
    print(f"wrote {len(sources)} nbgrader source versions to {teacher}/source/")


if __name__ == "__main__":
    main(sys.argv[1:])
