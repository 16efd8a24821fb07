"""Write output-free copies of the notebooks for students: the same cells, no outputs, no execution counts.

Usage: python scripts/student_copies.py [SOURCE_FOLDER] [TARGET_FOLDER]   (default: notebooks student)
A copy keeps the exercises (markdown cells); tests/test_student.py checks that student/ is what this writes.
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
    # Only the kernelspec and language_info that JupyterLab writes on opening it (scripts/run_notebooks.py):
    # anything else would mark a just-opened copy as modified.
    copy.metadata = nbformat.from_dict({key: notebook.metadata[key] for key in ("kernelspec", "language_info")
                                        if key in notebook.metadata})
    return copy


def write_copies(source: Path, target: Path) -> list[Path]:
    """Return paths written: one output-free copy in `target` of every notebook in `source` (stale copies removed)."""
    notebooks = sorted(source.glob("*.ipynb"))
    if not notebooks:
        raise SystemExit(f"{source} holds no notebooks (*.ipynb); pass the folder of the tutorial's notebooks.")
    target.mkdir(parents=True, exist_ok=True)
    for stale in target.glob("*.ipynb"):
        if not (source / stale.name).is_file():
            stale.unlink()
    for path in notebooks:
        nbformat.write(student_copy(nbformat.read(path, as_version=4)), target / path.name)
    return [target / path.name for path in notebooks]


def main(argv: list[str]) -> None:
    target = Path(argv[1]) if len(argv) > 1 else Path("student")
    written = write_copies(Path(argv[0]) if argv else Path("notebooks"), target)
    print(f"wrote {len(written)} output-free notebooks to {target}/")


if __name__ == "__main__":
    main(sys.argv[1:])
