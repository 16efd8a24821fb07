"""The shared recipe of notebooks 03-08: same data, token budget and seed for every strategy, and its results files."""
from __future__ import annotations

import copy
import hashlib
import json
import math
import re
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from .data import Corpus, load_corpus, load_general, make_dataloader, special_prefix, tokenize
from .evaluation import generate, perplexity
from .models import DEFAULT_MODEL, cache_dir, default_model_name
from .recipe import LEARNING_RATES, PROMPT, RATE_GRID, RECIPE
from .strategies import count_parameters, count_tensors
from .training import TrainConfig, train_strategy


RESULTS = Path(__file__).resolve().parents[2] / "results"
"""The default model's committed results; every other model's go to results/other-models/<model>/ (git-ignored)."""


def results_dir(model_name: str | None = None) -> Path:
    """Return the results folder of `model_name` (default: the notebooks' model), created if missing (notebook 08).

    One folder per model, so that a run of another model never overwrites the default model's committed results.
    """
    name = model_name or default_model_name()
    path = RESULTS if name == DEFAULT_MODEL else RESULTS / "other-models" / re.sub(r"[^\w.-]+", "-", name).strip("-")
    path.mkdir(parents=True, exist_ok=True)
    return path


def recipe_config(strategy: str | None = None, *, model_name: str | None = None, **overrides) -> TrainConfig:
    """Return the TrainConfig of RECIPE at `strategy`'s rate, `overrides` applied (first used in notebook 03).

    The strategies' rates were tuned for the default model only: for another one (`model_name`, default the notebooks'
    model) pass lr=..., for example from `choose_learning_rate`.
    """
    fields = TrainConfig.__dataclass_fields__
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(f"Unknown TrainConfig field(s) {unknown}. Valid fields: {', '.join(fields)}.")
    if "lr" not in overrides:
        name = model_name or default_model_name()
        if name != DEFAULT_MODEL:
            raise ValueError(f"helpers.recipe.LEARNING_RATES were chosen by the sweep for {DEFAULT_MODEL}, not for "
                             f"{name}: pass lr=..., or choose one on validation with helpers.choose_learning_rate.")
        if strategy not in LEARNING_RATES:
            raise ValueError(f"recipe_config needs the strategy whose learning rate to use, one of "
                             f"{', '.join(LEARNING_RATES)} (helpers.recipe.LEARNING_RATES), or an explicit lr=...; "
                             f"got {strategy!r}.")
        overrides["lr"] = LEARNING_RATES[strategy]
    return TrainConfig(**({k: v for k, v in RECIPE.items() if k in fields} | overrides))


def recipe_data(tokenizer, corpus: Corpus | None = None) -> tuple[DataLoader, DataLoader]:
    """Return (train, validation) DataLoaders of RECIPE blocks, training shuffled (first used in notebook 03)."""
    corpus = corpus or load_corpus()
    size, batch, seed = RECIPE["block_size"], RECIPE["batch_size"], RECIPE["seed"]
    train_data = make_dataloader(tokenizer, corpus.train, block_size=size, batch_size=batch, shuffle=True, seed=seed)
    val_data = make_dataloader(tokenizer, corpus.validation, block_size=size, batch_size=batch, shuffle=False)
    return train_data, val_data


def choose_learning_rate(strategy: str, model: nn.Module, tokenizer, corpus: Corpus | None = None, *,
                         steps: int = 6, lrs: tuple[float, ...] = RATE_GRID, show: bool = True, **options) -> float:
    """Return the rate of `lrs` whose short run of `strategy` ends at the lowest validation loss (notebook 04).

    For a model the sweep did not tune: each rate trains a copy of `model` (`options` go to apply_strategy) for
    `steps` recipe steps, scored on RECIPE's validation batches. The test split is never read; `model` is untouched.
    """
    from .registry import apply_strategy

    train_data, val_data = recipe_data(tokenizer, corpus)
    losses = {}
    for lr in lrs:
        torch.manual_seed(RECIPE["seed"])  # the same LoRA initialisation for every rate
        trial = apply_strategy(copy.deepcopy(model), strategy, **options)
        config = recipe_config(lr=lr, steps=steps, warmup_steps=min(RECIPE["warmup_steps"], steps), eval_every=0,
                               eval_at_start=False, progress=False)
        losses[lr] = float(train_strategy(trial, train_data, val_data, config)["val_loss"].dropna().iloc[-1])
        del trial
    best = min(sorted(losses), key=losses.__getitem__)
    if show:
        tried = ", ".join(f"{lr:g}: {loss:.3f}" for lr, loss in losses.items())
        print(f"learning rate {best:g} for {strategy}, chosen on validation loss after {steps} steps ({tried})")
    return best


def check_context(model: nn.Module, longest: int, windows: str) -> None:
    """Raise ValueError if `model` reads fewer than `longest` positions (first used in notebook 04)."""
    config = model.config
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if context is not None and context < longest:
        raise ValueError(f"{type(model).__name__} reads at most {context} positions, but {windows}. "
                         "Use a model with a longer context.")


def _fingerprint(model: nn.Module, tokenizer, texts: list[str]) -> str:
    """Return a hash of the model's class, config and weights and of the tokens it reads: a cached perplexity's key."""
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    digest.update(type(model).__name__.encode())
    digest.update((config.to_json_string(use_diff=False) if config is not None else "").encode())
    with torch.no_grad():
        for p in model.parameters():
            digest.update(f"{p.double().sum().item():.12e}".encode())
    # The token ids, prefix included, rather than the text: a new tokenizer or tokenization rule is a new key.
    digest.update(str(special_prefix(tokenizer)).encode())
    digest.update(tokenize(tokenizer, texts).numpy().tobytes())
    digest.update(str(RECIPE["eval_block_size"]).encode())
    return digest.hexdigest()[:24]


def baseline_perplexity(model: nn.Module, tokenizer, texts: list[str]) -> float:
    """Return the perplexity of the untrained `model` on `texts`, cached on disk (first used in notebook 03)."""
    path = cache_dir() / "perplexity" / f"{_fingerprint(model, tokenizer, texts)}.json"
    if path.is_file():
        return float(json.loads(path.read_text())["perplexity"])
    ppl = perplexity(model, tokenizer, texts, block_size=RECIPE["eval_block_size"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"perplexity": ppl}))
    return ppl


def evaluate_splits(model: nn.Module, tokenizer, corpus: Corpus, general: list[str] | None = None) -> dict[str, float]:
    """Return `model`'s perplexity on the whole validation and test splits and on the general-English set (default
    `load_general()`): what it learned and what it forgot, RECIPE's window (first used in notebook 03)."""
    size = RECIPE["eval_block_size"]
    return {"val_ppl": perplexity(model, tokenizer, corpus.validation, block_size=size),
            "test_ppl": perplexity(model, tokenizer, corpus.test, block_size=size),
            "general_ppl": perplexity(model, tokenizer, general or load_general(), block_size=size)}


def complete(model: nn.Module, tokenizer, prompt: str = PROMPT) -> str:
    """Return the text `model` adds to `prompt` decoding greedily, RECIPE's max_new_tokens tokens (notebook 03)."""
    return generate(model, tokenizer, prompt, max_new_tokens=RECIPE["max_new_tokens"])


def make_result(model: nn.Module, history, *, strategy: str, baseline_test_ppl: float, evaluation: dict[str, float],
                generation_before: str, generation_after: str, baseline_general_ppl: float | None = None,
                prompt: str = PROMPT, model_name: str | None = None) -> dict:
    """Return the result record of one run, the contents of results/<strategy>.json (first used in notebook 03).

    `evaluation` is `evaluate_splits`'s; `baseline_general_ppl` is the untrained model's on the general set."""
    trainable, total = count_parameters(model)
    trainable_tensors, total_tensors = count_tensors(model)
    info = getattr(model, "strategy_info", None)
    attrs = history.attrs
    return {
        "strategy": strategy, "options": dict(getattr(info, "options", {}) or {}),
        "summary": getattr(info, "summary", ""), "model": model_name or default_model_name(),
        "trainable_params": trainable, "total_params": total,
        "trainable_tensors": trainable_tensors, "total_tensors": total_tensors,
        "baseline_test_ppl": baseline_test_ppl, "val_ppl": evaluation["val_ppl"], "test_ppl": evaluation["test_ppl"],
        "ppl_ratio": evaluation["test_ppl"] / baseline_test_ppl,
        "baseline_general_ppl": baseline_general_ppl, "general_ppl": evaluation.get("general_ppl"),
        "train_seconds": attrs.get("train_seconds"), "train_tokens": attrs.get("tokens"),
        "tokens_per_second": attrs.get("tokens_per_second"), "peak_memory_mb": attrs.get("peak_memory_mb"),
        "precision": attrs.get("precision"), "gradient_checkpointing": attrs.get("gradient_checkpointing"),
        "recipe": dict(RECIPE), "config": attrs.get("config"), "torch_threads": torch.get_num_threads(),
        "prompt": prompt, "generation_before": generation_before, "generation_after": generation_after,
        "history": history_records(history),
    }


def history_records(history) -> list[dict]:
    """Return a training history's rows as JSON-ready dicts, NaN as None (first used in notebook 03)."""
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
            for row in history.to_dict(orient="records")]


RERUN_RTOL = 1e-4
"""Relative tolerance within which a re-run's numbers are the committed ones: another machine, thread count or load
changes the last digits (up to 3.4e-5 measured between two runs of notebook 07), a different run changes far more."""

_TIMINGS = {"seconds", "train_seconds", "tokens_per_second", "peak_memory_mb"}
"""The fields that vary from run to run of the same training: the clock and the allocator, not the numbers."""


def _same_numbers(a, b) -> bool:
    """Return whether two result records agree: timings ignored, floats within RERUN_RTOL, everything else exactly."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = set(a) - _TIMINGS
        return keys == set(b) - _TIMINGS and all(_same_numbers(a[k], b[k]) for k in keys)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_numbers(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=RERUN_RTOL)
    return a == b


def save_result(result: dict, path: str | Path | None = None) -> Path:
    """Write a result record to `path` (default: its model's results_dir), return the path (first used in notebook 03).

    A file with the same numbers (`_same_numbers`) is left alone, so re-running a notebook leaves git status clean.
    """
    path = Path(path) if path is not None else results_dir(result.get("model")) / f"{result['strategy']}.json"
    text = json.dumps(result, indent=1, default=float) + "\n"
    old = json.loads(path.read_text()) if path.is_file() else None
    if old is not None and old.get("model") != result.get("model"):
        raise ValueError(f"{path} holds a run of {old.get('model')}, not of {result.get('model')}: one model's results "
                         "never overwrite another's. Save it to helpers.results_dir(its model) or another path.")
    if not (old is not None and _same_numbers(old, json.loads(text))):
        path.write_text(text)
    return path


def load_results(folder: str | Path | None = None) -> dict[str, dict]:
    """Return {strategy: result record} of every .json in `folder`, default results_dir() (notebook 03)."""
    folder = Path(folder) if folder is not None else results_dir()
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}
