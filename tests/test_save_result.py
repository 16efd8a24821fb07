"""save_result leaves a committed result alone when a re-run changes only its timings, so make test keeps git clean,
and keeps one folder per model, so that no model's results overwrite another's."""
import pytest

import helpers.experiment
from helpers.experiment import recipe_config, results_dir, save_result


def result(test_ppl: float = 11.09, seconds: float = 143.0) -> dict:
    """A tiny result record shaped like results/lora.json: numbers, timings, and a history with per-step times."""
    return {
        "strategy": "lora", "model": "SmolLM2-135M-Instruct", "test_ppl": test_ppl, "train_seconds": seconds,
        "tokens_per_second": 25600 / seconds,
        "peak_memory_mb": 4015.2 + seconds, "torch_threads": 2,
        "history": [{"step": 0, "val_loss": 3.15, "seconds": 0.0}, {"step": 1, "train_loss": 3.0, "seconds": seconds}],
    }


def test_a_rerun_that_changes_only_timings_leaves_the_file_byte_for_byte(tmp_path):
    path = save_result(result(), tmp_path / "lora.json")
    before = path.read_bytes()
    assert save_result(result(seconds=169.8), path) == path
    assert path.read_bytes() == before


def test_a_rerun_with_another_number_rewrites_the_file(tmp_path):
    path = save_result(result(), tmp_path / "lora.json")
    save_result(result(test_ppl=11.5, seconds=169.8), path)
    assert '"test_ppl": 11.5' in path.read_text() and '"train_seconds": 169.8' in path.read_text()
    history = result(seconds=169.8)
    history["history"][1]["train_loss"] = 2.9  # a number inside the history counts too
    save_result(history, path)
    assert '"train_loss": 2.9' in path.read_text()


def test_a_missing_file_is_written_to_the_default_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(helpers.experiment, "RESULTS", tmp_path)
    assert save_result(result()) == tmp_path / "lora.json" and (tmp_path / "lora.json").is_file()


def test_another_models_results_go_to_their_own_folder_and_never_overwrite_the_defaults(tmp_path, monkeypatch):
    monkeypatch.setattr(helpers.experiment, "RESULTS", tmp_path)
    default = save_result(result())
    other = save_result(dict(result(test_ppl=30.2), model="/models/gpt2 tiny"))
    assert default == tmp_path / "lora.json" and '"test_ppl": 11.09' in default.read_text()
    assert other == tmp_path / "other-models" / "models-gpt2-tiny" / "lora.json"
    monkeypatch.setenv("TUTORIAL_MODEL", "/models/gpt2 tiny")
    assert results_dir() == other.parent
    with pytest.raises(ValueError, match="holds a run of SmolLM2-135M-Instruct, not of /models/gpt2 tiny"):
        save_result(dict(result(test_ppl=30.2), model="/models/gpt2 tiny"), default)
    assert '"test_ppl": 11.09' in default.read_text()


def test_another_model_is_never_handed_the_default_models_rates(monkeypatch):
    monkeypatch.setenv("TUTORIAL_MODEL", "gpt2-tiny")
    with pytest.raises(ValueError, match="chosen by the sweep for SmolLM2-135M-Instruct, not for gpt2-tiny: pass lr"):
        recipe_config("lora")
    assert recipe_config("lora", lr=1e-3).lr == 1e-3
    assert recipe_config("lora", model_name="SmolLM2-135M-Instruct").lr == helpers.experiment.LEARNING_RATES["lora"]


def test_last_digit_differences_between_machines_leave_the_file_alone(tmp_path):
    path = save_result(result(test_ppl=11.094254922607188), tmp_path / "lora.json")
    before = path.read_bytes()
    save_result(result(test_ppl=11.09450039923955, seconds=99.8), path)  # two fresh-clone runs, 2.2e-5 apart
    assert path.read_bytes() == before
    save_result(result(test_ppl=11.096), path)  # 1.6e-4 apart: another number
    assert '"test_ppl": 11.096' in path.read_text()
