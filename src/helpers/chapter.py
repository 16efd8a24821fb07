"""What every notebook does first (`setup`), and the pipeline of notebooks 04-07 that notebook 03 writes out."""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from .data import Corpus, load_corpus, load_general
from .device import keep_freed_memory
from .experiment import (baseline_perplexity, check_context, choose_learning_rate, complete, evaluate_splits,
                         make_result, recipe_config, recipe_data, save_result)
from .models import is_default_model, load_model, quiet_transformers
from .plotting import plot_history, plot_trainable_map, show_figure
from .recipe import PROMPT, RECIPE
from .registry import STRATEGIES, apply_strategy
from .strategies import LayerMap, count_parameters, count_tensors, find_layers, trainable_map
from .training import TrainConfig, changed_tensors, frozen_snapshot, train_strategy


def setup(seed: int = 0) -> None:
    """Seed Python's, numpy's and torch's generators with `seed` and silence transformers' logs (notebook 00 on).

    It also has glibc keep freed CPU memory for the next training step (helpers.device.keep_freed_memory).
    """
    keep_freed_memory()
    quiet_transformers()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class StrategyRun:
    """One strategy under the shared recipe: `prepare_run` builds it, `finish` trains it (first used in notebook 04)."""

    strategy: str
    model: nn.Module
    tokenizer: object
    corpus: Corpus
    options: dict
    config: TrainConfig
    baseline_test_ppl: float
    baseline_general_ppl: float
    generation_before: str
    frozen_before: dict = field(repr=False, default_factory=dict)
    history: pd.DataFrame | None = field(repr=False, default=None)
    evaluation: dict | None = None
    generation_after: str | None = None
    changed: list[str] | None = None
    result: dict | None = field(repr=False, default=None)
    path: Path | None = None
    model_name: str | None = None

    @property
    def layers(self) -> LayerMap:
        """Return the model's parts, found by structure with `find_layers` (notebook 04)."""
        return find_layers(self.model)

    @property
    def counts(self) -> dict[str, int]:
        """Return trainable and total parameters (unique elements) and tensors (notebook 04)."""
        trainable, total = count_parameters(self.model)
        trainable_tensors, total_tensors = count_tensors(self.model)
        return {"trainable": trainable, "total": total,
                "trainable_tensors": trainable_tensors, "total_tensors": total_tensors}

    def finish(self, *, save: bool = True, show: bool = True) -> "StrategyRun":
        """Return this run trained, evaluated, checked for moved frozen tensors and saved (notebook 04)."""
        if self.history is not None:
            raise ValueError(f"This {self.strategy} run has already been trained; call helpers.prepare_run again "
                             "for a new one.")
        train_data, val_data = recipe_data(self.tokenizer, self.corpus)
        self.history = train_strategy(self.model, train_data, val_data, self.config, frozen=self.frozen_before)
        # Frozen tensors that moved: none in a fixed strategy (train_strategy checks); blocks gradual unfreezing opened.
        self.changed = changed_tensors(self.model, self.frozen_before)
        self.evaluation = evaluate_splits(self.model, self.tokenizer, self.corpus)
        self.generation_after = complete(self.model, self.tokenizer)
        self.result = make_result(
            self.model, self.history, strategy=self.strategy, baseline_test_ppl=self.baseline_test_ppl,
            baseline_general_ppl=self.baseline_general_ppl, evaluation=self.evaluation,
            generation_before=self.generation_before,
            generation_after=self.generation_after, model_name=self.model_name,
        )
        self.result["trainable_map"] = trainable_map(self.model).reset_index().to_dict(orient="records")
        if save:
            self.path = save_result(self.result)
        if show:
            print(self.report())
            checked = self.history["val_loss"].dropna()
            show_figure(plot_history(self.history, title=f"{self.strategy}: loss while training"),
                        f"{self.strategy}: training and validation loss against training tokens seen; validation "
                        f"loss went from {checked.iloc[0]:.3f} to {checked.iloc[-1]:.3f} nats.")
        return self

    def report(self) -> str:
        """Return the run's text report: counts, losses, perplexities, cost, generations, file (notebook 04)."""
        c = self.counts
        lines = [f"{self.strategy}: {c['trainable']:,} of {c['total']:,} parameters trainable "
                 f"({c['trainable'] / c['total']:.1%}), {c['trainable_tensors']} of {c['total_tensors']} tensors"]
        if self.history is None:
            lines.append(f"baseline test perplexity {self.baseline_test_ppl:.2f} (not trained yet: call .finish())")
            return "\n".join(lines)
        h, a = self.history, self.history.attrs
        trained = h.dropna(subset=["train_loss"])["train_loss"]
        checked = h.dropna(subset=["val_loss"])["val_loss"]
        ev = self.evaluation
        lines += [
            f"trained {len(trained)} steps at lr {self.config.lr:g}: {a['tokens']:,} tokens in "
            f"{a['train_seconds']:.0f} s ({a['tokens_per_second']:.0f} tokens/s), peak memory "
            f"{a['peak_memory_mb']:,.0f} MiB",
            f"loss: train {trained.iloc[:5].mean():.3f} -> {trained.iloc[-5:].mean():.3f} (mean of first/last 5 "
            f"steps), validation {checked.iloc[0]:.3f} -> {checked.iloc[-1]:.3f}",
            f"perplexity: validation {ev['val_ppl']:.2f}; test {self.baseline_test_ppl:.2f} -> {ev['test_ppl']:.2f} "
            f"({ev['test_ppl'] / self.baseline_test_ppl:.3f} x the baseline); general English "
            f"{self.baseline_general_ppl:.2f} -> {ev['general_ppl']:.2f} "
            f"({ev['general_ppl'] / self.baseline_general_ppl:.3f} x)",
            f"frozen tensors unchanged: {len(self.frozen_before) - len(self.changed)} of {len(self.frozen_before)}",
            f"prompt {PROMPT!r}",
            f"  before: {self.generation_before!r}",
            f"  after:  {self.generation_after!r}",
        ]
        if self.path is not None:
            lines.append(f"saved {self.path.parent.name}/{self.path.name}")
        return "\n".join(lines)


def prepare_run(strategy: str, *, lr: float | None = None, show: bool = True, model_name: str | None = None,
                model_and_tokenizer: tuple | None = None, corpus: Corpus | None = None,
                config: TrainConfig | None = None, **options) -> StrategyRun:
    """Return a StrategyRun: model loaded, baseline measured, `strategy` applied, ready to `finish` (notebook 04).

    `config` defaults to the recipe at `lr`: by default the strategy's rate for the default model, and for another
    model the rate `choose_learning_rate` picks on validation. `options` go to `apply_strategy`.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"Unknown strategy {strategy!r}. Valid strategies: {', '.join(sorted(STRATEGIES))}.")
    if config is not None and lr is not None:
        raise ValueError("Pass either lr or config (whose lr field sets the rate), not both.")
    model, tokenizer = model_and_tokenizer if model_and_tokenizer is not None else load_model(model_name)
    check_context(model, max(RECIPE["block_size"], RECIPE["eval_block_size"]),
                  f"the recipe trains on {RECIPE['block_size']}-token blocks and evaluates "
                  f"{RECIPE['eval_block_size']}-token windows")
    corpus = corpus or load_corpus()
    baseline = baseline_perplexity(model, tokenizer, corpus.test)
    baseline_general = baseline_perplexity(model, tokenizer, load_general())
    before = complete(model, tokenizer)
    # The sweep tuned the rates for the default model only; another model gets its own, from a short check.
    chosen = config is None and lr is None and not is_default_model(model_name=model_name)
    if chosen:
        lr = choose_learning_rate(strategy, model, tokenizer, corpus, show=show, **options)
    model = apply_strategy(model, strategy, **options)
    config = config or (recipe_config(strategy) if lr is None else recipe_config(lr=lr))
    run = StrategyRun(strategy=strategy, model=model, tokenizer=tokenizer, corpus=corpus,
                      options=dict(model.strategy_info.options), config=config, baseline_test_ppl=baseline,
                      baseline_general_ppl=baseline_general,
                      generation_before=before, frozen_before=frozen_snapshot(model), model_name=model_name)
    if show:
        layers = run.layers
        docs = {split: info["documents"] for split, info in corpus.summary().items()}
        print(f"{type(model).__name__} with {len(layers.blocks)} blocks, tied head: {layers.tied}; "
              f"documents per split: {docs}")
        print(f"baseline test perplexity {baseline:.2f}; {PROMPT!r} -> {before!r}")
        print(model.strategy_info.summary)
        print(run.report().splitlines()[0])
        tokens_per_step = RECIPE["batch_size"] * RECIPE["block_size"] * config.grad_accum
        source = "chosen on validation for this model" if chosen else "the shared recipe"
        print(f"to train: {config.steps} steps x {tokens_per_step:,} tokens at lr {config.lr:g} ({source})")
        table = trainable_map(model)
        show_figure(plot_trainable_map(table, title=f"{strategy}: trainable parameters per part"),
                    f"{strategy}: one bar per model part ({len(table)}), its parameters in millions, the trainable "
                    f"share shaded; {int((table['trainable'] > 0).sum())} parts train.")
    return run
