"""Gradual unfreezing on tiny GPT-2, Qwen2 and Llama: what trains when, discriminative rates, training via train()."""
import pytest
import torch

from helpers import TrainConfig, apply_strategy, count_parameters, find_layers, make_dataloader, train
from helpers.unfreezing import GradualUnfreezing, unfreezing_stages

from conftest import tiny_model


def _trains(module) -> bool:
    flags = {p.requires_grad for p in module.parameters()}
    assert len(flags) == 1, "a module is partly trainable"
    return flags.pop()


def test_starts_with_head_norm_and_top_block(model):
    model = apply_strategy(model, "gradual_unfreezing", every=2)
    layers = find_layers(model)
    n = len(layers.blocks)
    assert [_trains(b) for b in layers.blocks] == [False] * (n - 1) + [True]
    assert _trains(layers.head) and _trains(layers.final_norm)
    # A tied head is the token embedding, so it trains; an untied embedding waits for the last stage.
    assert _trains(layers.embeddings[0]) == layers.tied
    assert isinstance(model.strategy_info, GradualUnfreezing)


def test_param_groups_are_disjoint_cover_everything_and_fall_by_factor(model):
    model = apply_strategy(model, "gradual_unfreezing", every=3, factor=2.0)
    groups = model.strategy_info.param_groups(model, 1e-3)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len({id(p) for p in model.parameters()})
    assert [g["lr"] for g in groups] == pytest.approx([1e-3 / 2.0**i for i in range(len(groups))])
    layers = find_layers(model)
    assert len(groups) == len(layers.blocks) + (0 if layers.tied and len(layers.embeddings) == 1 else 1)


def test_training_unfreezes_on_schedule_and_lowers_loss(family, tokenizer, text):
    model = tiny_model(family)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model = apply_strategy(model, "gradual_unfreezing", every=2, factor=2.0)
    trainable_at_start = count_parameters(model)[0]
    data = make_dataloader(tokenizer, text, block_size=32, batch_size=4, seed=0)
    steps = 5
    history = train(model, data, data, TrainConfig(steps=steps, lr=1e-2, warmup_steps=1, eval_every=0, progress=False))
    assert history["val_loss"].iloc[-1] < history["val_loss"].iloc[0] - 0.05
    layers = find_layers(model)
    n = len(layers.blocks)
    # Steps 1-2 train the top block, 3-4 add the next, step 5 adds a third; the block due after step 5 never trains.
    trained_blocks = 3
    assert [_trains(b) for b in layers.blocks] == [False] * (n - trained_blocks) + [True] * trained_blocks
    changed = {n_: not torch.equal(p, before[n_]) for n_, p in model.named_parameters()}
    for i, block in enumerate(layers.blocks):
        prefix = next(k for k, m in model.named_modules() if m is block) + "."
        moved = any(v for k, v in changed.items() if k.startswith(prefix))
        assert moved == (i >= n - trained_blocks), f"block {i}"
    assert count_parameters(model)[0] > trainable_at_start


def test_on_step_unfreezes_at_the_next_training_forward():
    model = apply_strategy(tiny_model("llama"), "gradual_unfreezing", every=1)
    stages = unfreezing_stages(model)
    model.strategy_info.on_step(model, 1)
    assert not any(p.requires_grad for p in stages[1][1])
    model.eval()
    with torch.no_grad():
        model(input_ids=torch.zeros(1, 4, dtype=torch.long))
    assert not any(p.requires_grad for p in stages[1][1]), "evaluation must not unfreeze"
    model.train()
    model(input_ids=torch.zeros(1, 4, dtype=torch.long))
    assert all(p.requires_grad for p in stages[1][1]) and not any(p.requires_grad for p in stages[2][1])


@pytest.mark.parametrize("options, message",
                         [({"every": 0}, "every"), ({"factor": 0.5}, "factor"), ({"k": 2}, "Unknown option")])
def test_bad_options_name_the_problem(options, message):
    with pytest.raises(ValueError, match=message):
        apply_strategy(tiny_model("gpt2"), "gradual_unfreezing", **options)


def test_tensors_outside_the_parts_unfreeze_last():
    model = tiny_model("llama")
    model.model.mixer = torch.nn.Linear(32, 32)
    model = apply_strategy(model, "gradual_unfreezing", every=1)
    label, params = unfreezing_stages(model)[-1]
    assert label == "other" and {id(p) for p in params} == {id(p) for p in model.model.mixer.parameters()}
    groups = model.strategy_info.param_groups(model, 1e-3)
    assert sum(len(g["params"]) for g in groups) == len({id(p) for p in model.parameters()})
    assert not any(p.requires_grad for p in model.model.mixer.parameters())
