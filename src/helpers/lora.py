"""LoRA (Hu et al. 2021) through peft: trainable low-rank updates beside the frozen projections of every block."""
from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence

import pandas as pd
from torch import nn

from . import families
from .strategies import StrategyInfo, find_layers, unwrap

# peft (about 5 s) and transformers (about 1 s) are imported by the functions that use them, so that importing
# helpers, or applying another strategy, does not pay for them.

LORA_DEFAULTS: dict = {"r": 16, "alpha": 32, "dropout": 0.05}
"""Default LoRA options: rank 16 with scale alpha / r = 2, a little dropout on the adapter input."""


def _is_peft_model(model: object) -> bool:
    # A model can only be a PeftModel once peft is imported; checking sys.modules first avoids importing it here.
    return "peft" in sys.modules and isinstance(model, sys.modules["peft"].PeftModel)


def _is_conv1d(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def _fans(module: nn.Module) -> tuple[int, int]:
    # GPT-2's Conv1D stores its weight as (in, out), the transpose of nn.Linear's.
    return tuple(module.weight.shape if _is_conv1d(module) else module.weight.shape[::-1])


def _projections(model: nn.Module) -> dict[str, nn.Module]:
    """Return {qualified name: module} of every nn.Linear / GPT-2 Conv1D inside the model's transformer blocks."""
    base = unwrap(model)
    inside = {id(m) for m in find_layers(base).blocks.modules()}
    refused = families.peft_refused_targets(base)  # none in GPT-2, Qwen2 and Llama
    found = {}
    for name, m in base.named_modules():
        if id(m) not in inside or name.rpartition(".")[2] in refused:
            continue
        # GPT-2's projections are Conv1D, Qwen2's and Llama's nn.Linear; some families subclass nn.Linear.
        if _is_conv1d(m) or type(m) is nn.Linear or isinstance(m, nn.Linear) and families.is_linear_projection(m):
            found[name] = m
    return found


def lora_target_modules(model: nn.Module) -> list[str]:
    """Return the projection kinds inside the blocks: q_proj, up_proj, ...; c_attn, c_fc for GPT-2 (notebook 07)."""
    names = list(dict.fromkeys(families.target_name(name) for name in _projections(model)))
    if not names:
        raise ValueError(
            f"{type(unwrap(model)).__name__} has no nn.Linear or Conv1D projections inside its transformer blocks, "
            "so LoRA has nothing to adapt. Pass targets=[...] with the names of the layers to adapt."
        )
    return names


def lora_parameter_count(model: nn.Module, r: int = LORA_DEFAULTS["r"], targets: Sequence[str] | None = None) -> int:
    """Return the LoRA parameters r * (fan_in + fan_out) summed over the targeted projections (notebook 00)."""
    targets = list(targets) if targets is not None else lora_target_modules(model)
    return sum(r * sum(_fans(m)) for name, m in _projections(model).items() if families.target_name(name) in targets)


def lora_parameter_table(model: nn.Module, r: int = LORA_DEFAULTS["r"]) -> pd.DataFrame:
    """Return per projection kind: in, out, modules, weights, LoRA parameters r*(in+out) it adds (notebook 07)."""
    rows: dict[str, dict] = {}
    for name, module in _projections(model).items():
        fan_in, fan_out = _fans(module)
        row = rows.setdefault(families.target_name(name),
                              {"in": fan_in, "out": fan_out, "modules": 0, "weights": 0, "lora params": 0})
        row["modules"] += 1
        row["weights"] += fan_in * fan_out
        row["lora params"] += r * (fan_in + fan_out)
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "projection"
    table.loc["total"] = [None, None, table["modules"].sum(), table["weights"].sum(), table["lora params"].sum()]
    return table.astype({"in": "Int64", "out": "Int64", "modules": "Int64", "weights": "int64", "lora params": "int64"})


def lora(model: nn.Module, *, r: int = LORA_DEFAULTS["r"], alpha: float = LORA_DEFAULTS["alpha"],
         dropout: float = LORA_DEFAULTS["dropout"],
         targets: Sequence[str] | None = None) -> tuple[nn.Module, StrategyInfo]:
    """Return (the peft-wrapped model with rank-`r` adapters beside each block projection, its info) (notebook 07)."""
    if _is_peft_model(model):
        raise ValueError(
            "This model is already wrapped by peft (LoRA applied before). Load a fresh model, or merge the "
            "adapters first with helpers.merge_lora(model) and apply LoRA to the result."
        )
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"LoRA rank r must be a positive int; got {r!r}.")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
        raise ValueError(f"LoRA alpha must be a positive number (the update is scaled by alpha / r); got {alpha!r}.")
    if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"LoRA dropout must lie in [0, 1); got {dropout!r}.")
    layers = find_layers(model)
    found = lora_target_modules(model)
    targets = list(targets) if targets is not None else found
    unknown = sorted(set(targets) - set(found))
    if unknown or not targets:
        raise ValueError(f"LoRA targets {unknown or targets} are not projections inside the blocks; "
                         f"choose from {found}.")
    projections = _projections(model)
    target_modules = families.peft_target_modules(unwrap(model), projections, targets)  # `targets` for GPT-2
    from peft import LoraConfig, get_peft_model

    # fan_in_fan_out: GPT-2's Conv1D stores its weight as (in, out), the transpose of nn.Linear's.
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, bias="none",
                        fan_in_fan_out=any(map(_is_conv1d, projections.values())), task_type="CAUSAL_LM")
    with warnings.catch_warnings(), families.without_peft_v4_renaming():
        # peft reads a transformers attribute deprecated in v5; the warning is theirs, not the reader's.
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        wrapped = get_peft_model(model, config)
    tied = (
        " The head is tied to the token embedding; both stay frozen, so the output projection is unchanged."
        if layers.tied else " The embeddings and the (untied) head stay frozen."
    )
    summary = (
        f"LoRA: every weight of the model is frozen; each of the {len(layers.blocks)} blocks gets trainable rank-{r} "
        f"updates B·A (scaled by alpha/r = {alpha / r:g}) beside its projections {', '.join(targets)}." + tied
    )
    options = {"r": r, "alpha": alpha, "dropout": dropout, "targets": targets}
    return wrapped, StrategyInfo("lora", options, summary)


def merge_lora(model: nn.Module) -> nn.Module:
    """Return the plain transformers model with the LoRA updates added into its weights (notebook 07)."""
    if not _is_peft_model(model):
        raise ValueError(
            f"merge_lora needs a model wrapped by apply_strategy(model, 'lora'); got {type(model).__name__}."
        )
    merged = model.merge_and_unload()
    # The strategy_info described the adapters, which no longer exist after merging.
    if "strategy_info" in vars(merged):
        del merged.strategy_info
    return merged
