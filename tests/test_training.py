"""The training loop on tiny models: loss goes down, frozen tensors stay bit-identical, errors and interrupts behave."""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import helpers
from helpers.strategies import StrategyInfo
from helpers.training import TrainConfig, evaluate_loss, lr_factor

from conftest import tiny_model


def loaders(tokenizer, text, *, batch_size=4, shuffle=True, block_size=32):
    """Return (train, validation) loaders over the fixture text, built fresh so their order is reproducible."""
    train = helpers.make_dataloader(tokenizer, text, block_size=block_size, batch_size=batch_size,
                                    shuffle=shuffle, seed=0)
    val = helpers.make_dataloader(tokenizer, text[:400], block_size=block_size, batch_size=4, shuffle=False)
    return train, val


def quick(**overrides) -> TrainConfig:
    values = dict(steps=10, lr=3e-3, warmup_steps=2, eval_every=5, progress=False)
    values.update(overrides)
    return TrainConfig(**values)


@pytest.mark.parametrize("strategy", ["full_fine_tuning", "freeze_lower_layers", "adapter_layers"])
def test_ten_steps_lower_the_training_loss_and_keep_frozen_tensors(model, tokenizer, text, strategy):
    train_data, val_data = loaders(tokenizer, text)
    helpers.apply_strategy(model, strategy)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss_before = evaluate_loss(model, train_data)
    history = helpers.train(model, train_data, val_data, quick())
    assert evaluate_loss(model, train_data) < loss_before - 0.05
    assert history["train_loss"].iloc[-3:].mean() < history["train_loss"].iloc[1:4].mean()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[name]), f"{name} should have trained"
        else:
            assert torch.equal(p, before[name]), f"{name} is frozen but changed"


def test_history_columns_tokens_and_validation(tokenizer, text):
    model = helpers.apply_strategy(tiny_model("qwen2"), "full_fine_tuning")
    train_data, val_data = loaders(tokenizer, text)
    history = helpers.train(model, train_data, val_data, quick(steps=7, eval_every=3))
    assert list(history.columns) == ["step", "tokens", "train_loss", "val_loss", "val_ppl", "lr", "seconds"]
    assert history["step"].tolist() == list(range(8))
    assert history["tokens"].tolist() == [i * 4 * 32 for i in range(8)]
    # Validation at the start, every 3 steps and at the end.
    assert history.dropna(subset=["val_loss"])["step"].tolist() == [0, 3, 6, 7]
    checked = history.dropna(subset=["val_loss"])
    assert all(math.isclose(p, math.exp(v)) for v, p in zip(checked["val_loss"], checked["val_ppl"]))
    assert history["seconds"].is_monotonic_increasing
    assert history.attrs["precision"] == "fp32" and history.attrs["gradient_checkpointing"] is False
    assert history.attrs["tokens"] == 7 * 4 * 32 and history.attrs["peak_memory_mb"] > 0


def test_learning_rate_warms_up_then_decays(tokenizer, text):
    config = quick(steps=10, warmup_steps=2, lr=1e-3, min_lr_ratio=0.1)
    assert [lr_factor(s, config) for s in (1, 2)] == [0.5, 1.0]
    assert math.isclose(lr_factor(10, config), 0.1)
    assert lr_factor(3, config) == 1.0
    factors = [lr_factor(s, config) for s in range(3, 11)]
    assert all(a > b for a, b in zip(factors, factors[1:]))
    model = helpers.apply_strategy(tiny_model("llama"), "full_fine_tuning")
    history = helpers.train(model, *loaders(tokenizer, text), config)
    assert history["lr"].iloc[1:].round(12).tolist() == [round(1e-3 * lr_factor(s, config), 12) for s in range(1, 11)]


def test_training_is_reproducible(family, tokenizer, text):
    runs = []
    for _ in range(2):
        model = helpers.apply_strategy(tiny_model(family), "freeze_embeddings")
        history = helpers.train(model, *loaders(tokenizer, text), quick(steps=4))
        runs.append((history, [p.detach().clone() for p in model.parameters()]))
    assert runs[0][0][["train_loss", "val_loss"]].equals(runs[1][0][["train_loss", "val_loss"]])
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


def test_gradient_accumulation_matches_one_big_batch(tokenizer, text):
    results = []
    for batch_size, accum in ((4, 1), (2, 2)):
        model = helpers.apply_strategy(tiny_model("llama"), "full_fine_tuning")
        train_data, val_data = loaders(tokenizer, text, batch_size=batch_size, shuffle=False)
        history = helpers.train(model, train_data, val_data, quick(steps=2, grad_accum=accum, grad_clip=0.0))
        results.append(history["train_loss"].iloc[1:].tolist())
    # Step 2's loss is measured after step 1's update, so it matches only if the accumulated gradient did.
    # (Weights themselves are not compared: AdamW's first step is ~lr*sign(g), which float rounding flips near g=0.)
    assert results[0] == pytest.approx(results[1], rel=1e-5)


def test_gradient_checkpointing_gives_the_same_result(tokenizer, text):
    losses = []
    for checkpointing in (False, True):
        model = helpers.apply_strategy(tiny_model("qwen2"), "full_fine_tuning")
        history = helpers.train(model, *loaders(tokenizer, text), quick(steps=3, gradient_checkpointing=checkpointing))
        assert history.attrs["gradient_checkpointing"] is checkpointing
        losses.append(history["train_loss"].iloc[1:].tolist())
        assert not getattr(model, "is_activation_checkpointing", False)  # restored afterwards
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_mixed_precision_on_the_cpu_stays_fp32(tokenizer, text):
    model = helpers.apply_strategy(tiny_model("gpt2"), "full_fine_tuning")
    history = helpers.train(model, *loaders(tokenizer, text), quick(steps=2, mixed_precision=True))
    assert history.attrs["precision"] == "fp32"
    assert next(model.parameters()).dtype == torch.float32


def test_nan_loss_names_the_step(tokenizer, text):
    model = helpers.apply_strategy(tiny_model("llama"), "full_fine_tuning")

    def poison(row):
        if row["step"] == 2:
            with torch.no_grad():
                model.model.norm.weight.fill_(float("nan"))

    with pytest.raises(FloatingPointError, match="at step 3"):
        helpers.train(model, *loaders(tokenizer, text), quick(steps=5), callback=poison)


def test_keyboard_interrupt_returns_history_so_far(tokenizer, text):
    model = helpers.apply_strategy(tiny_model("gpt2"), "freeze_lower_layers")
    flags = [p.requires_grad for p in model.parameters()]

    def stop(row):
        if row["step"] == 3:
            raise KeyboardInterrupt

    history = helpers.train(model, *loaders(tokenizer, text), quick(steps=10), callback=stop)
    assert history["step"].tolist() == [0, 1, 2, 3]
    assert history.attrs["interrupted"] is True
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert torch.isfinite(evaluate_loss(model, loaders(tokenizer, text)[1]) * torch.ones(1)).all()


def test_on_step_and_param_groups_of_the_strategy_are_used(tokenizer, text):
    calls = []

    class Recording(StrategyInfo):
        def param_groups(self, model, lr):
            return [{"params": [model.lm_head.weight], "lr": lr * 10}]

        def on_step(self, model, step):
            calls.append(step)

    model = helpers.apply_strategy(tiny_model("llama"), "full_fine_tuning")
    model.strategy_info = Recording("recording")
    before = model.model.norm.weight.detach().clone()
    history = helpers.train(model, *loaders(tokenizer, text), quick(steps=3, lr=1e-3, warmup_steps=0))
    assert calls == [1, 2, 3]
    assert history["lr"].iloc[1] == pytest.approx(1e-2)
    assert torch.equal(model.model.norm.weight, before)  # not in the optimizer's groups


def test_nothing_trainable_is_an_error(tokenizer, text):
    model = tiny_model("gpt2")
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        helpers.train(model, *loaders(tokenizer, text), quick())


def test_bad_config_is_an_error(tokenizer, text):
    with pytest.raises(ValueError, match="warmup_steps"):
        helpers.train(tiny_model("gpt2"), *loaders(tokenizer, text), quick(steps=2, warmup_steps=5))


def test_padding_and_ignored_tokens_are_not_scored():
    model = tiny_model("llama")
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    padded = evaluate_loss(model, [{"input_ids": ids, "attention_mask": mask}])
    # Same scored targets, computed as two separate unpadded rows.
    a = evaluate_loss(model, [(ids[:1],)]) * 11
    b = evaluate_loss(model, [(ids[1:, :6],)]) * 5
    assert padded == pytest.approx((a + b) / 16, rel=1e-5)


def test_save_and_load_only_the_trained_tensors(tmp_path, tokenizer, text):
    model = helpers.apply_strategy(tiny_model("qwen2"), "adapter_layers")
    helpers.train(model, *loaders(tokenizer, text), quick(steps=3))
    path = helpers.save_trained(model, tmp_path / "adapter")
    from safetensors.torch import load_file

    saved = load_file(str(path))
    assert set(saved) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert sum(t.numel() for t in saved.values()) == helpers.count_parameters(model)[0]
    fresh = helpers.load_trained(tiny_model("qwen2"), path)
    x = torch.randint(0, 200, (1, 16))
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=x).logits, model.eval()(input_ids=x).logits)
    with pytest.raises(ValueError, match="lacks"):
        helpers.load_trained(tiny_model("llama"), path)
    folder = helpers.save_full(model, tmp_path / "full", tokenizer)
    assert (folder / "config.json").is_file() and (folder / "tokenizer_config.json").is_file()


def test_the_token_count_is_what_the_steps_read(tokenizer, text):
    # Unshuffled blocks of 32 tokens, 4 to a batch, 2 batches a step: 3 steps read 24 blocks (the loader holds more).
    train_data, val_data = loaders(tokenizer, text, shuffle=False)
    assert len(train_data.dataset) > 24
    model = helpers.apply_strategy(tiny_model("gpt2"), "full_fine_tuning")
    history = helpers.train(model, train_data, val_data, quick(steps=3, grad_accum=2, warmup_steps=0))
    assert history["tokens"].tolist() == [0, 256, 512, 768] and history.attrs["tokens"] == 768
    assert 0 < history.attrs["train_seconds"] and history.attrs["tokens_per_second"] > 0


def test_plots_draw(tokenizer, text):
    import matplotlib

    matplotlib.use("Agg")
    model = helpers.apply_strategy(tiny_model("gpt2"), "adapter_layers")
    history = helpers.train(model, *loaders(tokenizer, text), quick(steps=2))
    figure = helpers.plot_trainable_map(helpers.trainable_map(model))
    assert len(figure.axes[0].patches) == 2 * (3 + 3)
    assert helpers.plot_history({"adapter": history}).axes


def test_data_loader_tensor_dataset_and_plain_tensors_both_work():
    model = helpers.apply_strategy(tiny_model("llama"), "full_fine_tuning")
    data = torch.randint(0, 200, (8, 16), generator=torch.Generator().manual_seed(1))
    train_data = DataLoader(TensorDataset(data), batch_size=4)
    history = helpers.train(model, train_data, [data[:4]], quick(steps=2, eval_every=0))
    assert history["val_loss"].notna().sum() == 2  # start and end


# --- early stopping ---------------------------------------------------------------------------------------------------

def early(**overrides) -> TrainConfig:
    values = dict(steps=30, lr=3e-2, warmup_steps=0, eval_every=1, patience=2, progress=False)
    values.update(overrides)
    return TrainConfig(**values)


@pytest.mark.usefixtures("one_thread")
def test_early_stopping_keeps_the_best_validation_weights(tokenizer, text):
    model = helpers.apply_strategy(tiny_model("qwen2"), "full_fine_tuning")
    train_data, val_data = loaders(tokenizer, text)
    history = helpers.train(model, train_data, val_data, early())
    attrs = history.attrs
    checked = history.dropna(subset=["val_loss"])
    assert attrs["stopped_early_at"] is not None and attrs["stopped_early_at"] < 30
    assert history["step"].max() == attrs["stopped_early_at"]
    assert 0 < attrs["best_step"] < attrs["stopped_early_at"]
    # Two validations in a row without a new best, then the stop.
    assert checked["step"].tolist()[-3:] == [attrs["best_step"], attrs["best_step"] + 1, attrs["best_step"] + 2]
    assert attrs["best_val_loss"] == checked["val_loss"].min()
    assert checked.set_index("step")["val_loss"][attrs["best_step"]] == attrs["best_val_loss"]
    assert evaluate_loss(model, val_data) == pytest.approx(attrs["best_val_loss"], rel=1e-6)
    assert evaluate_loss(model, val_data) < checked["val_loss"].iloc[-1]  # not the last weights


@pytest.mark.usefixtures("one_thread")
def test_early_stopping_without_any_improvement_restores_the_initial_weights(tokenizer, text):
    model = helpers.apply_strategy(tiny_model("llama"), "full_fine_tuning")
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_data, val_data = loaders(tokenizer, text)
    history = helpers.train(model, train_data, val_data, early(lr=1.0))
    attrs = history.attrs
    assert attrs["best_step"] == 0 and attrs["stopped_early_at"] == 2
    assert history["val_loss"].iloc[1:].min() > attrs["best_val_loss"]
    assert all(torch.equal(p, initial[n]) for n, p in model.named_parameters())
    assert evaluate_loss(model, val_data) == pytest.approx(attrs["best_val_loss"], rel=1e-6)


@pytest.mark.usefixtures("one_thread")
def test_patience_zero_trains_every_step_and_keeps_the_last_weights(tokenizer, text):
    model = helpers.apply_strategy(tiny_model("qwen2"), "full_fine_tuning")
    train_data, val_data = loaders(tokenizer, text)
    history = helpers.train(model, train_data, val_data, early(steps=12, patience=0))
    attrs = history.attrs
    assert history["step"].tolist() == list(range(13))
    assert attrs["stopped_early_at"] is None and attrs["best_step"] is None and attrs["best_val_loss"] is None
    # The validation loss rises after its minimum (step 6), yet the last weights stay.
    assert history["val_loss"].iloc[-1] > history["val_loss"].min()
    assert evaluate_loss(model, val_data) == pytest.approx(history["val_loss"].iloc[-1], rel=1e-6)


@pytest.mark.parametrize("overrides, match", [
    ({"patience": -1}, "patience must be >= 0"), ({"patience": 2, "eval_every": 0}, "eval_every >= 1"),
])
def test_impossible_patience_is_refused(overrides, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**overrides).check()


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("strategy, lr", [("gradual_unfreezing", 3e-2), ("lora", 1e-1)])
def test_early_stopping_restores_the_best_weights_of_other_strategies(tokenizer, text, strategy, lr):
    model = helpers.apply_strategy(tiny_model("qwen2"), strategy)
    train_data, val_data = loaders(tokenizer, text)
    history = helpers.train(model, train_data, val_data, early(lr=lr))
    attrs = history.attrs
    checked = history.dropna(subset=["val_loss"])
    assert attrs["stopped_early_at"] is not None and 0 < attrs["best_step"] < attrs["stopped_early_at"]
    assert attrs["best_val_loss"] == checked["val_loss"].min() < checked["val_loss"].iloc[-1]
    assert evaluate_loss(model, val_data) == pytest.approx(attrs["best_val_loss"], rel=1e-6)


@pytest.mark.usefixtures("one_thread")
def test_patience_running_out_at_the_last_step_is_not_an_early_stop(tokenizer, text):
    model = helpers.apply_strategy(tiny_model("llama"), "full_fine_tuning")
    train_data, val_data = loaders(tokenizer, text)
    # lr 1.0 never beats the start: patience 2 runs out at step 2, which is also the last step.
    history = helpers.train(model, train_data, val_data, early(lr=1.0, steps=2))
    assert history["step"].max() == 2
    assert history.attrs["stopped_early_at"] is None and history.attrs["best_step"] == 0
