"""Re-execute notebooks in place, outputs included, as a reader's Restart & Run All would (`make notebooks`).

Usage: python scripts/run_notebooks.py notebooks/*.ipynb  (each in a fresh kernel in its own folder, as nbval runs it)
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import nbformat
from jupyter_client.kernelspec import get_kernel_spec
from nbclient import NotebookClient


def kernelspec() -> dict:
    """Return the notebook metadata's kernelspec as JupyterLab writes it for the installed python3 kernel."""
    spec = get_kernel_spec("python3")
    return {"display_name": spec.display_name, "language": spec.language, "name": "python3"}


def run(path: Path) -> float:
    """Execute the notebook at `path` in place and return the seconds it took."""
    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    NotebookClient(nb, timeout=1800, kernel_name="python3", store_widget_state=False,
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    # JupyterLab, opening a notebook, rewrites another kernelspec and any stored widget state, which marks it modified
    # (and autosave writes it back). No saved output refers to a widget (see helpers.progress): the state goes.
    nb.metadata["kernelspec"] = kernelspec()
    nb.metadata.pop("widgets", None)
    nbformat.write(nb, path)
    return time.perf_counter() - start


def main(argv: list[str]) -> None:
    for path in [Path(p) for p in argv] or sorted(Path("notebooks").glob("*.ipynb")):
        print(f"{path} ...", flush=True)
        print(f"{path}: {run(path):.0f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
