"""LoRA (Hu et al. 2021) through peft: trainable low-rank updates beside the frozen projections of every block."""
from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Sequence

import pandas as pd
from torch import nn

from .strategies import StrategyInfo, find_layers, register_strategy, unwrap

# peft (about 5 s) and transformers (about 1 s) are imported by the functions that use them, so that importing
# helpers, or applying another strategy, does not pay for them.

LORA_DEFAULTS: dict = {"r": 16, "alpha": 32, "dropout": 0.05}
"""Default LoRA options: rank 16 with scale alpha / r = 2, a little dropout on the adapter input."""


def _conv1d() -> type:
    from transformers.pytorch_utils import Conv1D

    return Conv1D


def _is_peft_model(model: object) -> bool:
    # A model can only be a PeftModel once peft is imported; checking sys.modules first avoids importing it here.
    return "peft" in sys.modules and isinstance(model, sys.modules["peft"].PeftModel)


# peft refuses LoRA on these projections of the Mamba-based model types it lists: their fused kernels read the
# weight directly, so an adapter beside it would be skipped.
_PEFT_MAMBA_TYPES = {"falcon_h1", "mamba", "mamba2", "falcon_mamba", "nemotron_h"}
_PEFT_MAMBA_REFUSED = {"out_proj"}


def _is_projection(module: nn.Module, conv1d: type) -> bool:
    if isinstance(module, conv1d):
        return True
    if not isinstance(module, nn.Linear):
        return False
    # peft adds x A^T B^T to what the layer returns, which is right for y = x W^T + b. A Linear subclass with its own
    # forward and its own constructor computes something else (a MoE router returns scores and indices, a grouped
    # projection reshapes its weight); one that only rewrites forward (Falcon's FalconLinear) keeps that contract.
    cls = type(module)
    return cls.forward is nn.Linear.forward or cls.__init__ is nn.Linear.__init__


def _projection_names(model: nn.Module) -> dict[str, nn.Module]:
    """Return {qualified name: module} of every nn.Linear / GPT-2 Conv1D inside the model's transformer blocks."""
    base = unwrap(model)
    blocks = find_layers(base).blocks
    inside = {id(m) for m in blocks.modules()}
    conv1d = _conv1d()
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    refused = _PEFT_MAMBA_REFUSED if model_type in _PEFT_MAMBA_TYPES else set()
    return {
        name: m for name, m in base.named_modules()
        if id(m) in inside and _is_projection(m, conv1d) and name.rpartition(".")[2] not in refused
    }


def _target_name(name: str) -> str:
    """Return the end of a qualified module name that names its kind: 'q_proj', or 'ffn.0' inside a Sequential."""
    parts = name.split(".")
    i = len(parts) - 1
    # A bare index ('0') would match every block of the list ('layers.0'); keep the container's name with it.
    while i > 0 and parts[i].isdigit():
        i -= 1
    return ".".join(parts[i:])


def _matches(name: str, targets: Sequence[str]) -> bool:
    # peft's rule for a list of targets: the whole name, or a dotted suffix of it.
    return any(name == t or name.endswith("." + t) for t in targets)


def lora_target_modules(model: nn.Module) -> list[str]:
    """Return the names of the projection kinds inside the blocks: q_proj, up_proj, ...; c_attn, c_fc for GPT-2."""
    names: list[str] = []
    for name in _projection_names(model):
        leaf = _target_name(name)
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
    conv1d = _conv1d()
    for name, module in _projection_names(model).items():
        if _target_name(name) in targets:
            fan_in, fan_out = module.weight.shape if isinstance(module, conv1d) else module.weight.shape[::-1]
            total += r * (fan_in + fan_out)
    return total


def lora_parameter_table(model: nn.Module, r: int = LORA_DEFAULTS["r"]) -> pd.DataFrame:
    """Return per projection kind: shape (in x out), how many modules, weights they hold, LoRA parameters r*(in+out) it adds."""
    rows: dict[str, dict] = {}
    conv1d = _conv1d()
    for name, module in _projection_names(model).items():
        leaf = _target_name(name)
        fan_in, fan_out = module.weight.shape if isinstance(module, conv1d) else module.weight.shape[::-1]
        row = rows.setdefault(leaf, {"in": fan_in, "out": fan_out, "modules": 0, "weights": 0, "lora params": 0})
        row["modules"] += 1
        row["weights"] += fan_in * fan_out
        row["lora params"] += r * (fan_in + fan_out)
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "projection"
    table.loc["total"] = [None, None, table["modules"].sum(), table["weights"].sum(), table["lora params"].sum()]
    return table.astype({"in": "Int64", "out": "Int64", "modules": "Int64", "weights": "int64", "lora params": "int64"})


@contextlib.contextmanager
def _without_peft_v4_renaming():
    """Switch off, for one get_peft_model call, peft's renaming of transformers-v4 MoE target names.

    peft rewrites the targets gate_proj / up_proj / down_proj of MoE model types (DeepSeek, Qwen-MoE, GLM-MoE, ...)
    to the fused expert tensors of transformers v5, so that adapters trained on v4 still load. For a new adapter on
    the projections listed here that rewrite would drop the dense and shared-expert projections of those names and
    put adapters on the experts instead (which then refuse dropout).
    """
    try:
        from peft.utils import transformers_weight_conversion as conversion
    except ImportError:  # a peft without the renaming
        yield
        return
    original = getattr(conversion, "convert_peft_config_for_transformers", None)
    if original is None:
        yield
        return
    conversion.convert_peft_config_for_transformers = lambda *args, **kwargs: None
    try:
        yield
    finally:
        conversion.convert_peft_config_for_transformers = original


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
    if _is_peft_model(model):
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
    # peft matches a target by the end of a module's qualified name, so a name shared with a module that is not one
    # of the block projections (a head called 'proj', a router, a whole block) would adapt that too; then list the
    # block projections by full name.
    projections = _projection_names(model)
    inside = [n for n in projections if _target_name(n) in targets]
    clash = [n for n, _ in unwrap(model).named_modules() if _matches(n, targets) and n not in projections]
    conv1d = any(isinstance(m, _conv1d()) for m in projections.values())
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=inside if clash else targets,
        fan_in_fan_out=conv1d,  # GPT-2's Conv1D stores its weight as (in, out), the transpose of nn.Linear
        bias="none",
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings(), _without_peft_v4_renaming():
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
    if not _is_peft_model(model):
        raise ValueError(
            f"merge_lora needs a model wrapped by apply_strategy(model, 'lora'); got {type(model).__name__}."
        )
    merged = model.merge_and_unload()
    # The strategy_info described the adapters, which no longer exist after merging.
    if "strategy_info" in vars(merged):
        del merged.strategy_info
    return merged
