"""Freezing strategies on tiny GPT-2, Qwen2 and Llama: flags tensor by tensor, hand counts, tied heads, clear errors."""
from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import helpers
from helpers.registry import STRATEGIES, register_strategy
from helpers.strategies import StrategyInfo

from conftest import VOCAB, tiny_config, tiny_model

# Parameter-name patterns per family: an oracle written by hand, independent of find_layers' structural search.
EMBEDDING = {"gpt2": r"transformer\.(wte|wpe)\.", "qwen2": r"model\.embed_tokens\.", "llama": r"model\.embed_tokens\."}
BLOCK = {"gpt2": r"transformer\.h\.(\d+)\.", "qwen2": r"model\.layers\.(\d+)\.", "llama": r"model\.layers\.(\d+)\."}
NORM = {"gpt2": r"transformer\.ln_f\.", "qwen2": r"model\.norm\.", "llama": r"model\.norm\."}
HEAD = r"lm_head\."


def part_of(family: str, name: str) -> tuple[str, int | None]:
    """Return ('embeddings' | 'block' | 'norm' | 'head', block index) for a parameter name of `family`."""
    if re.match(EMBEDDING[family], name):
        return "embeddings", None
    if m := re.match(BLOCK[family], name):
        return "block", int(m.group(1))
    if re.match(NORM[family], name):
        return "norm", None
    if re.match(HEAD, name):
        return "head", None
    raise AssertionError(f"unexpected parameter {name}")


def n_blocks(family: str) -> int:
    return tiny_config(family).num_hidden_layers


def expected_trainable(family: str, strategy: str, part: str, block: int | None) -> bool:
    """Return whether a parameter of `part` should train under `strategy` with default options (the issue's rules)."""
    n = n_blocks(family)
    if strategy == "full_fine_tuning":
        return True
    if strategy == "freeze_embeddings":
        return part != "embeddings"
    if strategy == "freeze_lower_layers":
        k = round(n * 2 / 3)
        return part in ("norm", "head") or (part == "block" and block >= k)
    if strategy == "adapter_layers":
        return part in ("norm", "head") or (part == "block" and block >= n - 2)
    raise AssertionError(strategy)


BASE_STRATEGIES = ["full_fine_tuning", "freeze_embeddings", "freeze_lower_layers", "adapter_layers"]


@pytest.mark.parametrize("strategy", BASE_STRATEGIES)
def test_requires_grad_tensor_by_tensor(model, family, strategy):
    helpers.apply_strategy(model, strategy)
    # named_parameters() lists a tied head once, under the embedding's name: freezing one freezes the other.
    for name, p in model.named_parameters():
        part, block = part_of(family, name)
        assert p.requires_grad == expected_trainable(family, strategy, part, block), (family, strategy, name)
    if helpers.heads_are_tied(model):
        assert model.get_output_embeddings().weight.requires_grad == (strategy == "full_fine_tuning")
    assert model.strategy_info.name == strategy


def hand_counts(family: str) -> dict[str, int]:
    """Return parameter counts of the tiny model's parts from the architecture formulas, by hand."""
    c = tiny_config(family)
    d, V = c.hidden_size, VOCAB
    if family == "gpt2":
        block = 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + 2 * d + (d * 4 * d + 4 * d) + (4 * d * d + d)
        return {"embeddings": V * d + c.n_positions * d, "block": block, "norm": 2 * d, "head": 0}
    kv = c.num_key_value_heads * (d // c.num_attention_heads)
    inter = c.intermediate_size
    bias = family == "qwen2"  # Qwen2 has q/k/v biases, Llama none
    attn = d * d + d * kv * 2 + d * d + ((d + 2 * kv) if bias else 0)
    block = attn + 3 * d * inter + 2 * d
    return {"embeddings": V * d, "block": block, "norm": d, "head": 0 if c.tie_word_embeddings else V * d}


@pytest.mark.parametrize("strategy", BASE_STRATEGIES)
def test_counts_equal_hand_count(model, family, strategy):
    h, n = hand_counts(family), n_blocks(family)
    total = h["embeddings"] + n * h["block"] + h["norm"] + h["head"]
    trainable_blocks = {"full_fine_tuning": n, "freeze_embeddings": n,
                        "freeze_lower_layers": n - round(n * 2 / 3), "adapter_layers": 2}[strategy]
    embeddings = h["embeddings"] if strategy == "full_fine_tuning" else 0
    trainable = trainable_blocks * h["block"] + h["norm"] + h["head"] + embeddings
    helpers.apply_strategy(model, strategy)
    assert helpers.count_parameters(model) == (trainable, total)


def test_tensor_counts_and_qwen2_0_5b_291():
    # GPT-2 blocks hold 12 tensors, Qwen2 12 (q/k/v biases), Llama 9; plus embeddings, final norm, untied head.
    assert helpers.count_tensors(tiny_model("gpt2")) == (40, 40)
    assert helpers.count_tensors(tiny_model("qwen2")) == (38, 38)
    assert helpers.count_tensors(tiny_model("llama")) == (39, 39)
    big = helpers.meta_model(helpers.qwen2_0_5b_config())
    # The report's 291 = 24 blocks x 12 + embedding + final norm + lm_head listed separately although tied.
    assert len(list(big.named_parameters(remove_duplicate=False))) == 291
    assert helpers.count_tensors(big) == (290, 290)
    assert helpers.count_parameters(big) == (494_032_768, 494_032_768)


def test_count_parameters_counts_a_tied_tensor_once():
    model = tiny_model("gpt2")
    assert helpers.heads_are_tied(model)
    naive = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
    assert helpers.count_parameters(model)[1] == naive - model.get_output_embeddings().weight.numel()


def test_find_layers_is_structural(model, family):
    layers = helpers.find_layers(model)
    assert layers.embeddings[0] is model.get_input_embeddings()
    assert layers.head is model.get_output_embeddings()
    assert len(layers.blocks) == n_blocks(family)
    base = model.transformer if family == "gpt2" else model.model
    assert layers.blocks is (base.h if family == "gpt2" else base.layers)
    assert layers.final_norm is (base.ln_f if family == "gpt2" else base.norm)
    assert layers.tied == (family != "llama")
    # GPT-2 learns its position embedding; Qwen2 and Llama rotate (no weights).
    assert [id(e) for e in layers.embeddings[1:]] == ([id(base.wpe)] if family == "gpt2" else [])


def test_find_layers_unwraps_peft():
    peft = pytest.importorskip("peft")
    model = tiny_model("llama")
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    assert helpers.find_layers(wrapped).blocks is model.model.layers


def test_trainable_map_rows_and_sums(model, family):
    helpers.apply_strategy(model, "freeze_lower_layers")
    table = helpers.trainable_map(model)
    n = n_blocks(family)
    assert list(table.index) == ["embeddings", *[f"block {i}" for i in range(n)], "final norm", "head"]
    assert (int(table["trainable"].sum()), int(table["parameters"].sum())) == helpers.count_parameters(model)
    h = hand_counts(family)
    assert table.loc["block 0", "parameters"] == h["block"]
    assert table.loc["block 0", "trainable"] == 0 and table.loc[f"block {n - 1}", "trainable"] == h["block"]
    assert ("tied" in table.loc["head", "note"]) == helpers.heads_are_tied(model)


def test_summary_names_the_tied_head():
    model = helpers.apply_strategy(tiny_model("qwen2"), "freeze_embeddings")
    assert "tied" in model.strategy_info.summary and "freez" in model.strategy_info.summary
    untied = helpers.apply_strategy(tiny_model("llama"), "freeze_embeddings")
    assert "not tied" in untied.strategy_info.summary


def test_options_int_and_fraction():
    model = tiny_model("llama")
    helpers.apply_strategy(model, "freeze_lower_layers", n_frozen=1)
    assert [b.self_attn.q_proj.weight.requires_grad for b in model.model.layers] == [False, True, True, True]
    helpers.apply_strategy(model, "freeze_lower_layers", n_frozen=0.5)
    assert [b.self_attn.q_proj.weight.requires_grad for b in model.model.layers] == [False, False, True, True]
    helpers.apply_strategy(model, "adapter_layers", n_top=1)
    assert [b.self_attn.q_proj.weight.requires_grad for b in model.model.layers] == [False, False, False, True]
    assert model.strategy_info.options == {"n_top": 1}


def test_strategies_can_be_reapplied_in_any_order(model):
    # Each strategy sets every flag, so the previous strategy leaves no trace.
    helpers.apply_strategy(model, "adapter_layers")
    helpers.apply_strategy(model, "full_fine_tuning")
    assert all(p.requires_grad for p in model.parameters())


def test_unknown_strategy_lists_valid_ones(model):
    with pytest.raises(ValueError, match=r"Unknown strategy 'freeze_all'.*adapter_layers.*full_fine_tuning"):
        helpers.apply_strategy(model, "freeze_all")


def test_unknown_option_lists_valid_ones(model):
    with pytest.raises(ValueError, match=r"Unknown option\(s\) \['n_layers'\].*Valid options: n_frozen"):
        helpers.apply_strategy(model, "freeze_lower_layers", n_layers=2)
    with pytest.raises(ValueError, match="Valid options: none"):
        helpers.apply_strategy(model, "full_fine_tuning", n_top=2)


@pytest.mark.parametrize("value", [-1, 99, 1.5, "2"])
def test_bad_option_values(model, value):
    with pytest.raises(ValueError, match="n_frozen"):
        helpers.apply_strategy(model, "freeze_lower_layers", n_frozen=value)


def test_zero_trainable_parameters_is_an_error():
    @register_strategy("test_freeze_everything")
    def freeze_everything(model):
        for p in model.parameters():
            p.requires_grad_(False)
        return model, StrategyInfo("test_freeze_everything")

    try:
        model = tiny_model("gpt2")
        with pytest.raises(ValueError, match=r"leaves 0 of [\d,]+ parameters trainable in GPT2LMHeadModel"):
            helpers.apply_strategy(model, "test_freeze_everything")
        assert not hasattr(model, "strategy_info")
    finally:
        STRATEGIES.pop("test_freeze_everything")


def test_adapter_without_blocks_on_tied_model_still_trains_the_final_norm():
    model = helpers.apply_strategy(tiny_model("qwen2"), "adapter_layers", n_top=0)
    assert helpers.count_parameters(model)[0] == tiny_config("qwen2").hidden_size


def test_layers_outside_one_modulelist_name_the_class():
    model = tiny_model("llama")
    model.model.layers = nn.Sequential(*model.model.layers)
    with pytest.raises(ValueError, match="Cannot find the layers of LlamaForCausalLM: no nn.ModuleList"):
        helpers.find_layers(model)
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        helpers.apply_strategy(model, "adapter_layers")


def test_non_language_model_names_the_class():
    with pytest.raises(ValueError, match="Cannot find the layers of Linear"):
        helpers.find_layers(nn.Linear(3, 3))


def test_encoder_decoder_is_rejected():
    import transformers

    config = transformers.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=2)
    model = transformers.T5ForConditionalGeneration(config)
    with pytest.raises(ValueError, match="T5ForConditionalGeneration"):
        helpers.find_layers(model)


def test_meta_model_needs_no_memory():
    big = helpers.meta_model(helpers.qwen2_0_5b_config())
    layers = helpers.find_layers(big)
    assert len(layers.blocks) == 24 and layers.tied
    helpers.apply_strategy(big, "adapter_layers")
    # Top 2 blocks + final norm; the tied head is the frozen embedding.
    per_block = helpers.trainable_map(big).loc["block 23", "parameters"]
    assert helpers.count_parameters(big)[0] == 2 * per_block + 896
    assert torch.device("meta") == next(big.parameters()).device


def test_final_norm_registered_before_the_blocks_is_found():
    # OPT registers its final norm before the block list; registration order must not hide it.
    model = tiny_model("llama")
    inner = model.model
    inner._modules = {k: inner._modules[k] for k in ("embed_tokens", "norm", "layers", "rotary_emb")}
    assert helpers.find_layers(model).final_norm is inner.norm
    helpers.apply_strategy(model, "adapter_layers")
    assert all(p.requires_grad for p in inner.norm.parameters())


def test_an_embedding_norm_before_the_blocks_is_not_the_final_norm():
    # BLOOM normalises its embeddings before the blocks and has ln_f after them.
    model = tiny_model("llama")
    inner = model.model
    inner.embeddings_norm = nn.LayerNorm(32)
    inner._modules = {k: inner._modules[k] for k in ("embed_tokens", "embeddings_norm", "layers", "norm", "rotary_emb")}
    layers = helpers.find_layers(model)
    assert layers.final_norm is inner.norm
    assert {id(p) for p in layers.other} == {id(p) for p in inner.embeddings_norm.parameters()}


def _olmo_like() -> nn.Module:
    """Return tiny Llama with OLMo's final norm: a LayerNorm without weights."""
    model = tiny_model("llama")
    model.model.norm = nn.LayerNorm(32, elementwise_affine=False)
    return model


def test_parameter_free_final_norm_is_found_and_has_nothing_to_train():
    model = _olmo_like()
    layers = helpers.find_layers(model)
    assert layers.final_norm is model.model.norm and not list(layers.final_norm.parameters())
    assert helpers.describe_layers(model)["final norm"] == "model.norm (LayerNorm)"
    for strategy in sorted(STRATEGIES):
        assert helpers.apply_strategy(_olmo_like(), strategy).strategy_info.name == strategy
    helpers.apply_strategy(model, "adapter_layers")
    with_weights = helpers.apply_strategy(tiny_model("llama"), "adapter_layers")
    assert helpers.count_parameters(model)[0] == helpers.count_parameters(with_weights)[0] - 32
    assert helpers.trainable_map(model).loc["final norm", "parameters"] == 0


def test_no_final_norm_at_all():
    # A post-norm model (GPT-1) has no final norm: find_layers says None and the strategies train the rest.
    model = tiny_model("llama")
    model.model.norm = nn.Identity()
    assert helpers.find_layers(model).final_norm is None
    helpers.apply_strategy(model, "adapter_layers")
    assert model.strategy_info.name == "adapter_layers"
    assert list(helpers.trainable_map(model).index)[-2:] == ["final norm", "head"]


def test_tensors_outside_the_parts_train_only_with_the_whole_model():
    model = tiny_model("llama")
    model.model.mixer = nn.Linear(32, 32)
    extra = {id(p) for p in model.model.mixer.parameters()}
    assert {id(p) for p in helpers.find_layers(model).other} == extra
    expected = {"full_fine_tuning": True, "freeze_embeddings": True,
                "freeze_lower_layers": False, "adapter_layers": False}
    for strategy, trains in expected.items():
        helpers.apply_strategy(model, strategy)
        assert all(p.requires_grad == trains for p in model.model.mixer.parameters()), strategy
    assert helpers.trainable_map(model).loc["other", "parameters"] == 32 * 32 + 32


def test_a_tensor_shared_by_a_frozen_and_a_trained_block_stays_frozen():
    # Zamba shares one attention block between layers; freezing wins, as for a tied head.
    model = tiny_model("llama")
    shared = model.model.layers[0].mlp.up_proj.weight
    model.model.layers[3].mlp.up_proj.weight = shared
    helpers.apply_strategy(model, "freeze_lower_layers", n_frozen=1)
    assert not shared.requires_grad
    assert model.model.layers[3].mlp.down_proj.weight.requires_grad


def test_block_list_counted_by_another_config_field():
    # LongCat-Flash's num_hidden_layers counts two sub-layers per block; its list has config.num_layers blocks.
    model = tiny_model("llama")
    model.config.num_layers = 4
    model.config.num_hidden_layers = 8
    assert helpers.find_layers(model).blocks is model.model.layers


def test_apply_strategy_to_something_that_is_not_a_model():
    with pytest.raises(ValueError, match="needs a torch nn.Module.*str"):
        helpers.apply_strategy("Qwen/Qwen2-0.5B", "full_fine_tuning")
