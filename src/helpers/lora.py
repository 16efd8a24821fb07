"""LoRA (Hu et al. 2021) through peft: trainable low-rank updates beside the frozen projections of every block."""
from __future__ import annotations

import warnings
from collections.abc import Sequence

import pandas as pd
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from .strategies import StrategyInfo, find_layers, register_strategy, unwrap

LORA_DEFAULTS: dict = {"r": 16, "alpha": 32, "dropout": 0.05}
"""Default LoRA options: rank 16 with scale alpha / r = 2, a little dropout on the adapter input."""

_PROJECTIONS = (nn.Linear, Conv1D)


def _projection_names(model: nn.Module) -> dict[str, nn.Module]:
    """Return {qualified name: module} of every nn.Linear / GPT-2 Conv1D inside the model's transformer blocks."""
    base = unwrap(model)
    blocks = find_layers(base).blocks
    inside = {id(m) for m in blocks.modules()}
    return {name: m for name, m in base.named_modules() if isinstance(m, _PROJECTIONS) and id(m) in inside}


def lora_target_modules(model: nn.Module) -> list[str]:
    """Return the leaf names (e.g. q_proj, up_proj; c_attn, c_fc for GPT-2) of the projections inside the blocks."""
    names: list[str] = []
    for name in _projection_names(model):
        leaf = name.rpartition(".")[2]
        if leaf not in names:
            names.append(leaf)
    if not names:
        raise ValueError(
            f"{type(unwrap(model)).__name__} has no nn.Linear or Conv1D projections inside its transformer blocks, "
            "so LoRA has nothing to adapt. Pass targets=[...] with the names of the layers to adapt."
        )
    return names


def lora_parameter_count(model: nn.Module, r: int = LORA_DEFAULTS["r"], targets: Sequence[str] | None = None) -> int:
    """Return the number of LoRA parameters r * (fan_in + fan_out) summed over the targeted projections."""
    targets = list(targets) if targets is not None else lora_target_modules(model)
    total = 0
    for name, module in _projection_names(model).items():
        if name.rpartition(".")[2] in targets:
            fan_in, fan_out = module.weight.shape if isinstance(module, Conv1D) else module.weight.shape[::-1]
            total += r * (fan_in + fan_out)
    return total


def lora_parameter_table(model: nn.Module, r: int = LORA_DEFAULTS["r"]) -> pd.DataFrame:
    """Return per projection kind: shape (in x out), how many modules, weights they hold, LoRA parameters r*(in+out) it adds."""
    rows: dict[str, dict] = {}
    for name, module in _projection_names(model).items():
        leaf = name.rpartition(".")[2]
        fan_in, fan_out = module.weight.shape if isinstance(module, Conv1D) else module.weight.shape[::-1]
        row = rows.setdefault(leaf, {"in": fan_in, "out": fan_out, "modules": 0, "weights": 0, "lora params": 0})
        row["modules"] += 1
        row["weights"] += fan_in * fan_out
        row["lora params"] += r * (fan_in + fan_out)
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "projection"
    table.loc["total"] = [None, None, table["modules"].sum(), table["weights"].sum(), table["lora params"].sum()]
    return table.astype({"in": "Int64", "out": "Int64", "modules": "Int64", "weights": "int64", "lora params": "int64"})


def _check(r: int, alpha: float, dropout: float) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"LoRA rank r must be a positive int; got {r!r}.")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
        raise ValueError(f"LoRA alpha must be a positive number (the update is scaled by alpha / r); got {alpha!r}.")
    if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"LoRA dropout must lie in [0, 1); got {dropout!r}.")


@register_strategy("lora")
def lora(
    model: nn.Module,
    *,
    r: int = LORA_DEFAULTS["r"],
    alpha: float = LORA_DEFAULTS["alpha"],
    dropout: float = LORA_DEFAULTS["dropout"],
    targets: Sequence[str] | None = None,
) -> tuple[nn.Module, StrategyInfo]:
    """Return (the peft-wrapped model with rank-`r` adapters on every block projection, its StrategyInfo)."""
    if isinstance(model, PeftModel):
        raise ValueError(
            "This model is already wrapped by peft (LoRA applied before). Load a fresh model, or merge the "
            "adapters first with helpers.merge_lora(model) and apply LoRA to the result."
        )
    _check(r, alpha, dropout)
    layers = find_layers(model)
    found = lora_target_modules(model)
    targets = list(targets) if targets is not None else found
    unknown = sorted(set(targets) - set(found))
    if unknown or not targets:
        raise ValueError(f"LoRA targets {unknown or targets} are not projections inside the blocks; choose from {found}.")
    # peft matches a target by the end of a module's qualified name, so a leaf name shared with a module outside
    # the blocks (a head called 'proj', say) would adapt that too; then list the block modules by full name.
    inside = [n for n in _projection_names(model) if n.rpartition(".")[2] in targets]
    outside = [
        n for n, m in unwrap(model).named_modules()
        if n.rpartition(".")[2] in targets and n not in inside and len(list(m.children())) == 0
    ]
    conv1d = any(isinstance(m, Conv1D) for m in _projection_names(model).values())
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=inside if outside else targets,
        fan_in_fan_out=conv1d,  # GPT-2's Conv1D stores its weight as (in, out), the transpose of nn.Linear
        bias="none",
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        # peft reads a transformers attribute deprecated in v5; the warning is theirs, not the reader's.
        warnings.simplefilter("ignore", FutureWarning)
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
    """Return the plain transformers model with the LoRA updates added into its weights (peft merge_and_unload)."""
    if not isinstance(model, PeftModel):
        raise ValueError(
            f"merge_lora needs a model wrapped by apply_strategy(model, 'lora'); got {type(model).__name__}."
        )
    merged = model.merge_and_unload()
    # The strategy_info described the adapters, which no longer exist after merging.
    if "strategy_info" in vars(merged):
        del merged.strategy_info
    return merged
