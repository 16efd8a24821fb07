"""Re-execute notebooks in place, outputs included, as a reader's Restart & Run All would.

Usage: python scripts/run_notebooks.py notebooks/*.ipynb
Each notebook runs in a fresh kernel with its own folder as the working directory, the way
JupyterLab and nbval run it. A notebook that raises stops the run with its traceback.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient


def kernelspec() -> dict:
    """Return the notebook metadata's kernelspec as JupyterLab writes it for the installed python3 kernel."""
    from jupyter_client.kernelspec import get_kernel_spec

    spec = get_kernel_spec("python3")
    return {"display_name": spec.display_name, "language": spec.language, "name": "python3"}


def tidy_metadata(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Return `nb` with the metadata JupyterLab writes on opening it, so that opening a notebook leaves it unchanged.

    JupyterLab replaces the kernelspec's display name with the installed kernel's ("Python 3 (ipykernel)") and
    rewrites any stored widget state; either marks a freshly opened notebook as modified, and autosave then writes
    it back to disk. No saved output refers to a widget (see helpers.progress), so the state is dropped.
    """
    nb.metadata["kernelspec"] = kernelspec()
    nb.metadata.pop("widgets", None)
    return nb


def run(path: Path, timeout: int = 1800) -> float:
    """Execute the notebook at `path` in place and return the seconds it took."""
    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    NotebookClient(nb, timeout=timeout, kernel_name="python3", store_widget_state=False,
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    nbformat.write(tidy_metadata(nb), path)
    return time.perf_counter() - start


def main(argv: list[str]) -> int:
    paths = [Path(p) for p in argv] or sorted(Path("notebooks").glob("*.ipynb"))
    for path in paths:
        print(f"{path} ...", flush=True)
        print(f"{path}: {run(path):.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
