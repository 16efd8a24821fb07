"""Write output-free copies of the notebooks for students: the same cells, no outputs, no execution counts.

Usage: python scripts/student_copies.py [SOURCE_FOLDER] [TARGET_FOLDER]   (default: notebooks student)
The exercises are markdown cells at the end of each notebook, so a copy keeps them for the student to work; worked
answers live in solutions/. tests/test_student.py checks that the committed student/ folder is what this writes.
"""
from __future__ import annotations

import sys
from pathlib import Path

import nbformat


def student_copy(notebook: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Return a copy of `notebook` with every output, execution count and widget state removed."""
    copy = nbformat.from_dict(notebook)
    for cell in copy.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
        cell.metadata.pop("execution", None)
    # The kernelspec and language_info that JupyterLab writes when it opens the copy (the notebook's own, see
    # scripts/run_notebooks.py): anything else would mark a just-opened copy as modified. No widget state.
    copy.metadata = nbformat.from_dict({key: notebook.metadata[key] for key in ("kernelspec", "language_info")
                                        if key in notebook.metadata})
    return copy


def write_copies(source: Path, target: Path) -> list[Path]:
    """Return paths written: one output-free copy in `target` of every notebook in `source` (stale copies removed)."""
    notebooks = sorted(source.glob("*.ipynb"))
    if not notebooks:
        raise SystemExit(f"{source} holds no notebooks (*.ipynb); pass the folder of the tutorial's notebooks.")
    target.mkdir(parents=True, exist_ok=True)
    names = {p.name for p in notebooks}
    for stale in target.glob("*.ipynb"):
        if stale.name not in names:
            stale.unlink()
    written = []
    for path in notebooks:
        out = target / path.name
        nbformat.write(student_copy(nbformat.read(path, as_version=4)), out)
        written.append(out)
    return written


def main(argv: list[str]) -> int:
    source = Path(argv[0]) if argv else Path("notebooks")
    target = Path(argv[1]) if len(argv) > 1 else Path("student")
    written = write_copies(source, target)
    print(f"wrote {len(written)} output-free notebooks to {target}/")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
