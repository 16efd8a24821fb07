"""The pipeline of notebooks 04-07 (`prepare_run` ... `finish`) and the setup every notebook calls, on a tiny model."""
from __future__ import annotations

import pytest
import torch

import helpers
from helpers.training import TrainConfig

from conftest import tiny_model


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """Keep cached baselines out of the user's cache."""
    monkeypatch.setenv("TUTORIAL_CACHE", str(tmp_path / "cache"))


def tiny_corpus(text: str) -> helpers.Corpus:
    return helpers.Corpus(train=[text * 4], validation=[text[:300]], test=[text[100:400]])


def long_context(family: str):
    """Return a tiny rotary-position model that reads the recipe's 256-token windows (rotary: no position table)."""
    model = tiny_model(family)
    model.config.max_position_embeddings = 512
    return model


def quick_config() -> TrainConfig:
    return TrainConfig(steps=12, lr=3e-3, warmup_steps=2, eval_every=6, progress=False)


def test_setup_seeds_every_generator_the_same_way():
    helpers.setup(3)
    first = torch.rand(4)
    helpers.setup(3)
    assert torch.equal(torch.rand(4), first)
    helpers.setup(4)
    assert not torch.equal(torch.rand(4), first)


@pytest.mark.parametrize("strategy", ["full_fine_tuning", "freeze_lower_layers"])
def test_a_run_trains_evaluates_and_keeps_its_frozen_tensors(tokenizer, text, cache, strategy):
    corpus = tiny_corpus(text)
    run = helpers.prepare_run(strategy, model_and_tokenizer=(long_context("llama"), tokenizer), corpus=corpus,
                              config=quick_config(), show=False)
    assert run.history is None and "not trained yet" in run.report()
    frozen = len(run.frozen_before)
    assert (frozen > 0) == (strategy == "freeze_lower_layers")
    run.finish(save=False, show=False)
    assert run.path is None and run.changed == []
    assert len(run.history) == run.config.steps + 1
    assert run.evaluation["test_ppl"] < run.baseline_test_ppl
    assert run.result["trainable_params"] == run.counts["trainable"]
    # The forgetting axis: the whole general-English set, scored by the Rust splits' rule, before and after training.
    general = helpers.perplexity(run.model, tokenizer, helpers.load_general(),
                                 block_size=helpers.RECIPE["eval_block_size"])
    assert run.result["general_ppl"] == pytest.approx(general, rel=1e-6)
    assert run.result["baseline_general_ppl"] != pytest.approx(general, rel=1e-3)
    text_report = run.report()
    assert f"frozen tensors unchanged: {frozen} of {frozen}" in text_report
    assert "x the baseline" in text_report and strategy in text_report and "general English" in text_report


def test_gradual_unfreezing_finishes_with_the_blocks_it_opened_counted_as_moved(tokenizer, text, cache):
    # 12 steps, a block more every 5: blocks 2 and 1 of 0-3 open while training. The frozen check once counted them as
    # frozen tensors that moved and raised, so the shared pipeline could not train this strategy past its first stage.
    run = helpers.prepare_run("gradual_unfreezing", model_and_tokenizer=(long_context("llama"), tokenizer),
                              corpus=tiny_corpus(text), config=quick_config(), show=False, every=5)
    frozen = len(run.frozen_before)
    run.finish(save=False, show=False)
    opened = {name.split(".")[2] for name in run.changed}
    assert opened == {"1", "2"} and all(name.startswith("model.layers.") for name in run.changed)
    assert f"frozen tensors unchanged: {frozen - len(run.changed)} of {frozen}" in run.report()


def test_a_frozen_tensor_that_moves_fails_the_pipeline(tokenizer, text):
    model = helpers.apply_strategy(tiny_model("llama"), "freeze_lower_layers", n_frozen=1)
    frozen = helpers.frozen_snapshot(model)
    name = next(iter(frozen))
    with torch.no_grad():
        dict(model.named_parameters())[name].add_(1.0)  # what a strategy that leaks gradients would do
    data = helpers.make_dataloader(tokenizer, [text], block_size=16, batch_size=2)
    with pytest.raises(AssertionError, match=f"1 frozen tensors changed during training: \\['{name}'\\]"):
        helpers.train_strategy(model, data, data, TrainConfig(steps=1, warmup_steps=0, progress=False), frozen=frozen)


def test_a_run_cannot_be_finished_twice(tokenizer, text, cache):
    run = helpers.prepare_run("adapter_layers", model_and_tokenizer=(long_context("qwen2"), tokenizer),
                              corpus=tiny_corpus(text), config=quick_config(), show=False, n_top=1)
    run.finish(save=False, show=False)
    with pytest.raises(ValueError, match="already been trained"):
        run.finish(save=False, show=False)


def test_bad_arguments_are_named(tokenizer, text, cache):
    pair = (tiny_model("llama"), tokenizer)
    with pytest.raises(ValueError, match="Unknown strategy 'freeze_everything'.*full_fine_tuning"):
        helpers.prepare_run("freeze_everything", model_and_tokenizer=pair, corpus=tiny_corpus(text), show=False)
    with pytest.raises(ValueError, match="either lr or config"):
        helpers.prepare_run("full_fine_tuning", model_and_tokenizer=pair, corpus=tiny_corpus(text), lr=1e-3,
                            config=quick_config(), show=False)


def test_a_model_with_a_short_context_is_refused_before_anything_runs(tokenizer, text, cache):
    model = tiny_model("gpt2")
    with pytest.raises(ValueError, match=f"at most {model.config.n_positions} positions.*longer context"):
        helpers.prepare_run("full_fine_tuning", model_and_tokenizer=(model, tokenizer), corpus=tiny_corpus(text),
                            config=quick_config(), show=False)


def test_another_model_trains_at_the_rate_a_short_check_on_validation_chose(tokenizer, text, cache, capsys):
    corpus = tiny_corpus(text)
    model = long_context("llama")
    before = [p.detach().clone() for p in model.parameters()]
    lr = helpers.choose_learning_rate("lora", model, tokenizer, corpus, steps=2, lrs=(1e-4, 3e-2))
    line = capsys.readouterr().out.strip()
    tried = line[line.index("(") + 1:-1].split(", ")
    losses = {float(part.split(": ")[0]): float(part.split(": ")[1]) for part in tried}
    assert lr == min(losses, key=losses.get) and line.startswith(f"learning rate {lr:g} for lora, chosen on validation")
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))  # it trains copies
    run = helpers.prepare_run("lora", model_and_tokenizer=(model, tokenizer), corpus=corpus, model_name="tiny-llama",
                              show=True)
    assert "(chosen on validation for this model)" in capsys.readouterr().out
    assert run.config.lr in helpers.recipe.RATE_GRID
