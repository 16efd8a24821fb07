"""Device choice, the device report, matmul throughput, and the training-memory calculator."""
import os
import platform
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import helpers
from conftest import tiny_config, tiny_model


def test_device_falls_back_to_cpu_and_honours_a_choice():
    assert helpers.get_device("cpu") == torch.device("cpu")
    assert helpers.available_devices()[-1] == torch.device("cpu")
    if not torch.cuda.is_available():
        assert helpers.get_device().type in {"cpu", "mps"}


def test_device_report_names_versions():
    report = helpers.device_report()
    assert report["torch"] == torch.__version__
    assert {"transformers", "chosen device", "cuda available"} <= set(report)


def test_matmul_gflops_is_positive():
    assert helpers.matmul_gflops("cpu", n=128, seconds=0.05) > 0


def _memory_kept_in_new_process(**env) -> str:
    kept = "helpers.device_report()['freed CPU memory kept for reuse']"
    code = f"import helpers; print({kept}); helpers.setup(); print({kept})"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, **env})
    return " ".join(out.stdout.split())


@pytest.mark.slow
@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_setup_keeps_freed_memory_unless_told_not_to_and_importing_helpers_does_not():
    assert _memory_kept_in_new_process(TUTORIAL_MALLOC="") == "False True"
    assert _memory_kept_in_new_process(TUTORIAL_MALLOC="system") == "False False"


def test_training_memory_adds_up():
    n = 1_000_000
    mem = helpers.training_memory(n, precision="fp32")
    gib = 2**30
    assert mem["weights"] == pytest.approx(4 * n / gib)
    assert mem["gradients"] == pytest.approx(4 * n / gib)
    assert mem["AdamW states"] == pytest.approx(8 * n / gib)
    assert mem["total"] == pytest.approx(mem.drop("total").sum())


def test_qwen2_0_5b_at_the_reports_1_x_8_tokens_fits_8_gib_only_without_gpu_overheads():
    config = helpers.qwen2_0_5b_config()
    model = helpers.meta_model(config)
    n = sum(p.numel() for p in model.parameters())
    card = 8188 / 1024  # nvidia-smi's total for an RTX 4060 Ti 8 GB
    # Weights, gradients and two Adam moments alone are 16 bytes a parameter: about 7.36 GiB.
    assert helpers.training_memory(n, precision="fp32")["total"] == pytest.approx(16 * n / 2**30)
    four_rows = helpers.training_memory(n, config, batch=1, seq=8, precision="fp32")["total"]
    assert 7.3 < four_rows < card
    assert four_rows + max(helpers.CUDA_CONTEXT_GIB) < card
    largest = max(p.numel() for p in model.parameters())
    with_step = helpers.training_memory(n, config, batch=1, seq=8, cuda_context=min(helpers.CUDA_CONTEXT_GIB),
                                        step_temporaries=5 * largest)
    assert with_step["total"] > card + 2
    assert helpers.training_memory(n, config, seq=512, precision="fp32")["total"] > card


def test_checkpointing_keeps_one_input_per_block_and_one_blocks_activations():
    config = helpers.qwen2_0_5b_config()
    b, s, h, a, layers = 4, 1024, config.hidden_size, config.num_attention_heads, config.num_hidden_layers
    per_block = (34 * s * b * h + 5 * a * s * s * b) * 4 / 2  # fp32: twice Korthikanti's 16-bit bytes
    logits = 2 * b * s * config.vocab_size * 4
    assert helpers.memory.activation_bytes(config, batch=b, seq=s) == int(layers * per_block + logits)
    kept = helpers.memory.activation_bytes(config, batch=b, seq=s, checkpointing=True)
    assert kept == int(layers * s * b * h * 4 + per_block + logits)
    plain = helpers.training_memory(494_032_768, config, batch=b, seq=s)
    light = helpers.training_memory(494_032_768, config, batch=b, seq=s, checkpointing=True)
    # The blocks' share shrinks more than tenfold; the logits (large for a 151,936-token vocabulary) stay.
    blocks = lambda mem: mem["activations"] - logits / 2**30  # noqa: E731
    assert blocks(light) < blocks(plain) / 10 and light["weights"] == plain["weights"]


def _saved_bytes(config, attention: str, batch: int, seq: int) -> int:
    """Return the bytes autograd saves for backward in one forward of a fresh model of `config` (weights excluded)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attention).train()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    ids = torch.randint(0, config.vocab_size, (batch, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=ids)
    return sum(storages.values())


@pytest.mark.parametrize("family", ["qwen2", "llama"])
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_block_activations_are_the_tensors_a_block_saves_for_backward(family, attention):
    # One block more changes the saved bytes by exactly one block's activations: compare that with the calculator's.
    config, b, s = tiny_config(family), 2, 64
    config.head_dim = 16  # as wide as the tiny default, and set, to check the calculator reads it
    saved, counted = {}, {}
    for layers in (1, 2):
        config.num_hidden_layers = layers
        saved[layers] = _saved_bytes(config, attention, b, s)
        counted[layers] = helpers.memory.activation_bytes(config, batch=b, seq=s, attention=attention)
    assert saved[2] - saved[1] == pytest.approx(counted[2] - counted[1], rel=0.02)


def test_fused_attention_keeps_no_seq_squared_tensor_and_eager_does():
    config = helpers.qwen2_0_5b_config()
    bill = {(attention, s): helpers.memory.activation_bytes(config, batch=1, seq=s, attention=attention) -
            helpers.memory.activation_bytes(config, batch=1, seq=s, attention=attention, checkpointing=True)
            for attention in ("eager", "sdpa") for s in (512, 1024)}
    assert bill["sdpa", 1024] / bill["sdpa", 512] == pytest.approx(2, rel=0.01)  # linear in s
    assert bill["eager", 1024] / bill["eager", 512] > 2.2  # the a*s*s probabilities grow with s squared
    assert helpers.memory.activation_bytes(config, batch=1, seq=512) > bill["eager", 512]  # Korthikanti's 5*a*s^2


def test_autocast_keeps_fp32_weights_and_adds_their_bf16_copies():
    config = helpers.qwen2_0_5b_config()
    n, trainable = 494_032_768, 1_000_000
    fp32 = helpers.training_memory(n, config, trainable=trainable, batch=2, seq=256)
    mixed = helpers.training_memory(n, config, trainable=trainable, batch=2, seq=256, precision="bf16-autocast")
    pure = helpers.training_memory(n, config, trainable=trainable, batch=2, seq=256, precision="bf16")
    assert mixed["weights"] == fp32["weights"] and mixed["gradients"] == fp32["gradients"]
    assert mixed["bf16 weight copies"] == pytest.approx(2 * trainable / 2**30) and "bf16 weight copies" not in fp32
    assert mixed["activations"] == pytest.approx(fp32["activations"] / 2) == pytest.approx(pure["activations"])
    assert pure["weights"] == pytest.approx(fp32["weights"] / 2)


def test_unknown_precision_is_named():
    with pytest.raises(ValueError, match="Unknown precision 'int3'"):
        helpers.training_memory(10, precision="int3")


def test_gpu_rows_appear_only_when_asked_and_add_up():
    plain = helpers.training_memory(1_000_000)
    assert "CUDA context" not in plain and "optimizer-step temporaries" not in plain
    low, high = helpers.CUDA_CONTEXT_GIB
    assert 0 < low < high < 2
    mem = helpers.training_memory(1_000_000, cuda_context=high, step_temporaries=5 * 1000)
    assert mem["CUDA context"] == pytest.approx(high)
    assert mem["optimizer-step temporaries"] == pytest.approx(5 * 1000 * 4 / 2**30)
    assert mem["total"] == pytest.approx(plain["total"] + mem["CUDA context"] + mem["optimizer-step temporaries"])
    with pytest.raises(ValueError, match="pass 0 or more"):
        helpers.training_memory(10, cuda_context=-1)


def test_training_matmuls_groups_linear_shapes_and_counts_their_flops():
    model = tiny_model("llama")
    table = helpers.training_matmuls(model, tokens=16, repeats=1, min_seconds=0)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert table["count"].sum() == len(linears)
    # Three products of 2 * tokens * in * out FLOPs per layer: 6 x (weights of the linear layers) x tokens.
    weights = sum(m.weight.numel() for m in linears)
    assert table["GFLOP per step"].sum() * 1e9 == pytest.approx(6 * weights * 16)
    assert (table["seconds per step"] > 0).all()
    assert table.loc["32 x 256", "layers"] == "lm_head"
    assert set(table.loc["32 x 32", "layers"].split(", ")) == {"q_proj", "o_proj"}


def test_training_matmuls_reads_shapes_from_a_meta_model_and_refuses_nonsense():
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(tiny_config("qwen2"))
    table = helpers.training_matmuls(meta, tokens=8, repeats=1, min_seconds=0)
    assert table.loc["32 x 256", "layers"] == "lm_head"  # the tied head is a Linear too, timed once
    with pytest.raises(ValueError, match="at least 1"):
        helpers.training_matmuls(meta, tokens=0)
    with pytest.raises(ValueError, match="no nn.Linear"):
        helpers.training_matmuls(torch.nn.Embedding(4, 4), tokens=4)
