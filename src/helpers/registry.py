"""The six strategies by name, in one table above strategies.py, lora.py and unfreezing.py, and `apply_strategy`."""
from __future__ import annotations

import inspect
from typing import Callable

import pandas as pd
from torch import nn

from .lora import lora
from .recipe import REPORT_STRATEGIES
from .strategies import (
    adapter_layers, count_parameters, count_tensors, freeze_embeddings, freeze_lower_layers, full_fine_tuning, unwrap,
)
from .unfreezing import gradual_unfreezing

STRATEGIES: dict[str, Callable] = {
    "full_fine_tuning": full_fine_tuning,
    "freeze_embeddings": freeze_embeddings,
    "freeze_lower_layers": freeze_lower_layers,
    "adapter_layers": adapter_layers,
    "lora": lora,
    "gradual_unfreezing": gradual_unfreezing,
}
"""Strategy name -> fn(model, **options) -> (model, StrategyInfo), in the order the notebooks introduce them."""


def register_strategy(name: str) -> Callable[[Callable], Callable]:
    """Return a decorator that adds fn(model, **options) -> (model, info) to STRATEGIES (exercise of notebook 05)."""

    def decorator(fn: Callable) -> Callable:
        STRATEGIES[name] = fn
        return fn

    return decorator


def strategy_options(name: str) -> dict[str, inspect.Parameter]:
    """Return the options strategy `name` accepts, with defaults (the explorer of notebook 08)."""
    params = list(inspect.signature(STRATEGIES[name]).parameters.values())[1:]
    return {p.name: p for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def apply_strategy(model: nn.Module, name: str, **options) -> nn.Module:
    """Return the model ready to train under strategy `name`, strategy_info attached (first used in notebook 03)."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"apply_strategy needs a torch nn.Module (a causal LM); got {type(model).__name__}.")
    if name not in STRATEGIES:
        raise ValueError(f"Unknown strategy {name!r}. Valid strategies: {', '.join(sorted(STRATEGIES))}.")
    valid = list(strategy_options(name))
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"Unknown option(s) {unknown} for strategy {name!r}. "
                         f"Valid options: {', '.join(valid) or 'none'}.")
    model, info = STRATEGIES[name](model, **options)
    trainable, total = count_parameters(model)
    if trainable == 0:
        raise ValueError(f"Strategy {name!r} with options {options} leaves 0 of {total:,} parameters trainable in "
                         f"{type(unwrap(model)).__name__}; training would change nothing. Choose options that leave "
                         "something to train (for example fewer frozen blocks).")
    model.strategy_info = info
    return model


def strategy_counts(model: nn.Module, names: tuple[str, ...] = REPORT_STRATEGIES) -> pd.DataFrame:
    """Return trainable and total tensors and parameters of `model` per strategy, the last left on (notebook 03)."""
    rows = []
    for name in names:
        apply_strategy(model, name)
        (t_tensors, n_tensors), (t_params, n_params) = count_tensors(model), count_parameters(model)
        rows.append({"strategy": name, "trainable tensors": t_tensors, "tensors": n_tensors,
                     "trainable parameters": t_params, "parameters": n_params})
    return pd.DataFrame(rows).set_index("strategy")
