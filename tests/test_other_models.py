"""Every notebook runs to the end on another model: a tiny GPT-2 and a tiny Llama whose tokenizer adds a BOS and has
no chat template, saved as a reader's own model would be and named by TUTORIAL_MODEL (executed, not compared)."""
from __future__ import annotations

import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from helpers.experiment import results_dir

from conftest import save_reader_model

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
OTHER_MODELS = {"gpt2": False, "llama": True}
"""Family -> whether its tokenizer adds a BOS."""


@pytest.fixture(scope="module", params=sorted(OTHER_MODELS))
def other_model(request, tmp_path_factory) -> str:
    """Return the folder of a tiny saved model of the family, with the recipe's 256-token context; its results go."""
    family = request.param
    folder = save_reader_model(tmp_path_factory.mktemp(f"other-{family}"), family, bos=OTHER_MODELS[family])
    yield folder
    shutil.rmtree(results_dir(str(folder)), ignore_errors=True)  # results/other-models/<model>/: the run's own


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem[:2] for p in NOTEBOOKS])
def test_the_notebook_runs_to_the_end_on_another_model(path, other_model, tmp_path, monkeypatch):
    monkeypatch.setenv("TUTORIAL_MODEL", other_model)
    monkeypatch.setenv("TUTORIAL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    committed = {p: p.read_bytes() for p in (ROOT / "results").rglob("*.json") if "other-models" not in p.parts}
    notebook = nbformat.read(path, as_version=4)
    # A failing cell raises CellExecutionError naming the cell and its traceback.
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
                   ).execute()
    changed = [str(p.relative_to(ROOT)) for p, data in committed.items() if not p.exists() or p.read_bytes() != data]
    assert not changed, f"a run on another model touched the default model's results: {changed}"
