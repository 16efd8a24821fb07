"""LoRA on tiny GPT-2 (Conv1D, tied), Qwen2 (tied) and Llama (untied): flags, counts, training, merge equivalence."""
import pytest
import torch
from peft import PeftModel

import helpers
from helpers import TrainConfig, apply_strategy, count_parameters, find_layers, make_dataloader, train
from helpers.lora import lora_parameter_count, lora_target_modules, merge_lora

from conftest import tiny_model

EXPECTED_TARGETS = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_targets_are_the_block_projections(model, family):
    assert lora_target_modules(model) == EXPECTED_TARGETS[family]


def test_only_adapters_train_and_counts_add_up(model, family):
    _, total_before = count_parameters(model)
    expected = lora_parameter_count(model, r=4)
    wrapped = apply_strategy(model, "lora", r=4, alpha=8)
    assert isinstance(wrapped, PeftModel)
    trainable, total = count_parameters(wrapped)
    assert trainable == expected > 0
    assert total == total_before + expected
    names = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    layers = find_layers(wrapped)
    assert not any(p.requires_grad for m in layers.embeddings + [layers.head] for p in m.parameters())
    table = helpers.trainable_map(wrapped)
    assert table["trainable"].sum() == trainable
    assert table.loc["embeddings", "trainable"] == 0 and table.loc["head", "trainable"] == 0
    assert wrapped.strategy_info.name == "lora" and wrapped.strategy_info.options["r"] == 4


def test_adapters_start_as_identity(model):
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    before = _logits(model, ids).clone()
    wrapped = apply_strategy(model, "lora", r=4)
    torch.testing.assert_close(_logits(wrapped, ids), before)


def test_training_lowers_loss_and_merge_keeps_logits(family, tokenizer, text):
    model = tiny_model(family)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    total_before = count_parameters(model)[1]
    wrapped = apply_strategy(model, "lora", r=8, alpha=16, dropout=0.0)
    data = make_dataloader(tokenizer, text, block_size=32, batch_size=4, seed=0)
    history = train(wrapped, data, data, TrainConfig(steps=12, lr=1e-2, warmup_steps=1, eval_every=0, progress=False))
    assert history["val_loss"].iloc[-1] < history["val_loss"].iloc[0] - 0.05
    # The base weights never moved: everything learned lives in the adapters.
    base = {n.replace(".base_layer", ""): p for n, p in wrapped.get_base_model().named_parameters() if "lora_" not in n}
    assert base.keys() == frozen.keys()
    for name, value in frozen.items():
        torch.testing.assert_close(base[name], value)
    ids = torch.tensor([tokenizer(text[:48])["input_ids"]])
    adapted = _logits(wrapped, ids).clone()
    merged = merge_lora(wrapped)
    assert type(merged) is type(model) and not isinstance(merged, PeftModel)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    assert count_parameters(merged)[1] == total_before
    torch.testing.assert_close(_logits(merged, ids), adapted, atol=1e-5, rtol=1e-4)


def test_gpt2_conv1d_uses_fan_in_fan_out():
    wrapped = apply_strategy(tiny_model("gpt2"), "lora", r=2)
    assert wrapped.peft_config["default"].fan_in_fan_out is True
    wrapped = apply_strategy(tiny_model("llama"), "lora", r=2)
    assert wrapped.peft_config["default"].fan_in_fan_out is False


def test_target_subset(model):
    wrapped = apply_strategy(model, "lora", r=2, targets=[lora_target_modules(model)[0]])
    assert count_parameters(wrapped)[0] == lora_parameter_count(model, r=2, targets=[lora_target_modules(model)[0]])


@pytest.mark.parametrize(
    "options, message",
    [({"r": 0}, "rank r"), ({"alpha": -1}, "alpha"), ({"dropout": 1.5}, "dropout"), ({"targets": ["nope"]}, "nope"),
     ({"rank": 4}, "Unknown option")],
)
def test_bad_options_name_the_problem(options, message):
    with pytest.raises(ValueError, match=message):
        apply_strategy(tiny_model("llama"), "lora", **options)


def test_lora_twice_and_merge_of_plain_model_are_refused():
    wrapped = apply_strategy(tiny_model("qwen2"), "lora", r=2)
    with pytest.raises(ValueError, match="already wrapped"):
        apply_strategy(wrapped, "lora", r=2)
    with pytest.raises(ValueError, match="merge_lora needs"):
        merge_lora(tiny_model("qwen2"))


def test_parameter_table_adds_up(model, family):
    from helpers.lora import lora_parameter_table

    table = lora_parameter_table(model, r=4)
    assert list(table.index) == EXPECTED_TARGETS[family] + ["total"]
    assert table.loc["total", "lora params"] == lora_parameter_count(model, r=4) == table["lora params"].iloc[:-1].sum()
    # GPT-2 names both its attention output and its MLP output c_proj: two modules per block.
    per_block = {"c_proj": 2}
    n = len(find_layers(model).blocks)
    assert all(table.loc[k, "modules"] == per_block.get(k, 1) * n for k in EXPECTED_TARGETS[family])
