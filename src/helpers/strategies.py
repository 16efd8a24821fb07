"""Which parts of a decoder-only model train: find the parts structurally, freeze by strategy, count what trains."""
from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd
from torch import nn

from . import families

_NORM_TYPES = tuple(t for t in (nn.LayerNorm, getattr(nn, "RMSNorm", None)) if t is not None)


@dataclass
class LayerMap:
    """The parts of a decoder-only causal LM, found by structure rather than by parameter names (notebook 03).

    `final_norm` may be None (GPT-1 has none). `other` holds the tensors outside these parts (an embedding LayerNorm,
    ...): they train only when everything but the embeddings does.
    """

    embeddings: list[nn.Module]
    blocks: nn.ModuleList
    final_norm: nn.Module | None
    head: nn.Module
    tied: bool
    other: list[nn.Parameter] = field(default_factory=list)

    def parts(self) -> list[tuple[str, list[nn.Module]]]:
        """Return (part name, modules) bottom to top: embeddings, blocks, final norm, head (notebook 03)."""
        rows = [("embeddings", list(self.embeddings))]
        rows += [(f"block {i}", [b]) for i, b in enumerate(self.blocks)]
        rows.append(("final norm", [self.final_norm] if self.final_norm is not None else []))
        rows.append(("head", [self.head]))
        return rows


def unwrap(model: nn.Module) -> nn.Module:
    """Return the transformers model inside a peft wrapper, or `model` itself (used by the strategies, notebook 07)."""
    get_base_model = getattr(model, "get_base_model", None)  # peft's PeftModel has it, transformers models do not
    return get_base_model() if callable(get_base_model) else model


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, _NORM_TYPES) or "norm" in type(module).__name__.lower()


def _cannot(model: nn.Module, why: str) -> ValueError:
    return ValueError(
        f"Cannot find the layers of {type(model).__name__}: {why}. The strategies work on transformers "
        "decoder-only causal LMs (GPT-2, Qwen2, Llama and the like) whose transformer blocks sit in one "
        "nn.ModuleList of config.num_hidden_layers blocks, with get_input_embeddings() and get_output_embeddings()."
    )


def _final_norm(parent: nn.Module, blocks: nn.ModuleList) -> nn.Module | None:
    """Return the norm applied to the top block's output: the first norm registered after the blocks."""
    children = list(parent.named_children())
    at = next(i for i, (_, child) in enumerate(children) if child is blocks)
    # GPT-2's ln_f, Qwen2's and Llama's norm (with or without weights); other families keep it elsewhere.
    after = next((child for _, child in children[at + 1:] if _is_norm(child)), None)
    return after if after is not None else families.final_norm_elsewhere(children, at, _is_norm)


def find_layers(model: nn.Module) -> LayerMap:
    """Return the LayerMap (embeddings, blocks, final norm, head, tied, other) of a causal LM (notebook 03)."""
    base = unwrap(model)
    if not isinstance(base, nn.Module):
        raise TypeError(f"find_layers needs a torch nn.Module; got {type(model).__name__}.")
    config = families.text_config(getattr(base, "config", None))
    if getattr(config, "is_encoder_decoder", False):
        raise _cannot(base, "it is an encoder-decoder model, with two stacks of blocks")
    counts = families.block_counts(config)  # config.num_hidden_layers first
    if not counts:
        raise _cannot(base, "it has no config.num_hidden_layers")
    get_in, get_out = getattr(base, "get_input_embeddings", None), getattr(base, "get_output_embeddings", None)
    token = get_in() if callable(get_in) else None
    head = get_out() if callable(get_out) else None
    if token is None:
        raise _cannot(base, "get_input_embeddings() returned nothing")
    if head is None or getattr(head, "weight", None) is None:
        raise _cannot(base, "get_output_embeddings() returned no head with a weight (is it a causal LM?)")

    names = {m: n for n, m in base.named_modules()}
    blocks = families.block_list(names, counts)  # GPT-2's transformer.h, Qwen2's and Llama's model.layers
    if blocks is None:
        raise _cannot(base, f"no nn.ModuleList holds its {counts[0]} blocks")
    if sum(p.numel() for p in blocks.parameters()) == 0:
        raise _cannot(base, f"the nn.ModuleList of {len(blocks)} modules at '{names[blocks]}' holds no parameters")

    block_name = names[blocks]
    parent = base.get_submodule(block_name.rpartition(".")[0]) if "." in block_name else base
    final_norm = _final_norm(parent, blocks)

    # A learned position embedding is any other nn.Embedding outside the blocks and the head (GPT-2's wpe).
    inside = {id(m) for m in blocks.modules()} | {id(m) for m in head.modules()}
    positions = [m for m in names if isinstance(m, nn.Embedding) and m is not token and id(m) not in inside
                 and getattr(m, "weight", None) is not None]
    tied = head.weight is getattr(token, "weight", None)
    layers = LayerMap(embeddings=[token, *positions], blocks=blocks, final_norm=final_norm, head=head, tied=tied)
    layers.other = _unmapped(base, layers)
    return layers


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """Return (trainable, total) element counts; a tied head and embedding count once (notebook 03)."""
    params = list(model.parameters())  # parameters() yields a shared tensor once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def count_tensors(model: nn.Module) -> tuple[int, int]:
    """Return (trainable tensors, all tensors): how many weight tensors, not numbers (notebook 03)."""
    params = list(model.parameters())
    return sum(1 for p in params if p.requires_grad), len(params)


@dataclass
class StrategyInfo:
    """What a strategy did: name, options and a summary, attached as model.strategy_info (first used in notebook 03)."""

    name: str
    options: dict = field(default_factory=dict)
    summary: str = ""

    def param_groups(self, model: nn.Module, lr: float) -> list[dict]:
        """Return the optimizer's parameter groups, by default every trainable tensor at rate `lr` (notebook 03)."""
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr}]

    def on_step(self, model: nn.Module, step: int) -> None:
        """Do nothing after a step; gradual unfreezing overrides it (called by train, notebook 08)."""

    def __str__(self) -> str:
        return self.summary


def _train_from(model: nn.Module, layers: LayerMap, first: int) -> None:
    """Make blocks[first:], the final norm and the head trainable, and freeze everything else."""
    trainable = [*layers.blocks[first:], *(m for m in (layers.final_norm, layers.head) if m is not None)]
    keep = {id(p) for m in trainable for p in m.parameters()}
    parts = [m for _, modules in layers.parts() for m in modules]
    frozen = {id(p) for m in parts if not any(m is t for t in trainable) for p in m.parameters()}
    # Freezing wins: a head tied to the frozen token embedding is that same tensor, so it stays frozen; so does a
    # tensor that a frozen block shares with a trained one (Zamba's shared attention), and anything outside the parts.
    for p in model.parameters():
        p.requires_grad_(id(p) in keep and id(p) not in frozen)


def _tied_note(layers: LayerMap, embeddings_frozen: bool) -> str:
    if not layers.tied:
        return " The head has its own weight (not tied to the embedding)."
    if embeddings_frozen:
        return (" The head is tied to the token embedding (one shared tensor), so freezing the embedding "
                "freezes the head as well: the output projection does not train.")
    return " The head is tied to the token embedding (one shared tensor), so both train together."


def _span(first: int, end: int) -> str:
    if end - first <= 0:
        return "no blocks"
    return f"block {first}" if end - first == 1 else f"blocks {first}-{end - 1}"


def _resolve_n(value: int | float, n_blocks: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} must be an int (blocks) or a float fraction of the {n_blocks} blocks; got {value!r}.")
    if isinstance(value, float):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{what} as a fraction must lie in [0, 1]; got {value}.")
        value = round(value * n_blocks)
    if not 0 <= value <= n_blocks:
        raise ValueError(f"{what} must lie between 0 and the model's {n_blocks} blocks; got {value}.")
    return int(value)


def full_fine_tuning(model: nn.Module) -> tuple[nn.Module, StrategyInfo]:
    """Return the model with every parameter trainable, and its StrategyInfo (notebook 03)."""
    layers = find_layers(model)
    model.requires_grad_(True)
    summary = "Full fine-tuning: every parameter trains." + _tied_note(layers, False)
    return model, StrategyInfo("full_fine_tuning", {}, summary)


def freeze_embeddings(model: nn.Module) -> tuple[nn.Module, StrategyInfo]:
    """Return the model with the embeddings frozen and everything else trainable, and its StrategyInfo (notebook 04)."""
    layers = find_layers(model)
    model.requires_grad_(True)
    for module in layers.embeddings:
        module.requires_grad_(False)
    what = "token and position embeddings are" if len(layers.embeddings) > 1 else "token embedding is"
    summary = (f"Freeze embeddings: the {what} frozen; all blocks, the final norm and the head train."
               + _tied_note(layers, True))
    return model, StrategyInfo("freeze_embeddings", {}, summary)


def freeze_lower_layers(model: nn.Module, *, n_frozen: int | float = 2 / 3) -> tuple[nn.Module, StrategyInfo]:
    """Return the model with the embeddings and the lowest `n_frozen` blocks frozen, and its info (notebook 05)."""
    layers = find_layers(model)
    n_blocks = len(layers.blocks)
    k = _resolve_n(n_frozen, n_blocks, "n_frozen")
    _train_from(model, layers, k)
    summary = (
        f"Freeze lower layers: the embeddings and {_span(0, k)} ({k} of {n_blocks}) are frozen; "
        f"{_span(k, n_blocks)}, the final norm and the head train." if k else
        f"Freeze lower layers with n_frozen=0: only the embeddings are frozen; all {n_blocks} blocks, the final "
        "norm and the head train."
    ) + _tied_note(layers, True)
    return model, StrategyInfo("freeze_lower_layers", {"n_frozen": k}, summary)


def adapter_layers(model: nn.Module, *, n_top: int = 2) -> tuple[nn.Module, StrategyInfo]:
    """Return the model with only the top `n_top` blocks, final norm and head trainable, and its info (notebook 06)."""
    layers = find_layers(model)
    n_blocks = len(layers.blocks)
    k = _resolve_n(n_top, n_blocks, "n_top")
    _train_from(model, layers, n_blocks - k)
    blocks = f"{_span(n_blocks - k, n_blocks)} (the top {k} of {n_blocks})" if k else "no blocks"
    summary = (f"Adapter layers: only {blocks}, the final norm and the head train; everything below is frozen."
               + _tied_note(layers, True))
    return model, StrategyInfo("adapter_layers", {"n_top": k}, summary)


def _unmapped(model: nn.Module, layers: LayerMap) -> list[nn.Parameter]:
    """Return the model's unique tensors outside embeddings, blocks, final norm and head."""
    mapped = {id(p) for _, mods in layers.parts() for m in mods for p in m.parameters()}
    return [p for p in model.parameters() if id(p) not in mapped]


def trainable_map(model: nn.Module) -> pd.DataFrame:
    """Return one row per part (embeddings, blocks, final norm, head): parameters and trainable ones (notebook 04)."""
    layers = find_layers(model)
    groups = [(part, [p for m in modules for p in m.parameters()]) for part, modules in layers.parts()]
    groups.append(("other", _unmapped(model, layers)))
    notes = {"head": "tied to the token embedding (counted there)" if layers.tied else "",
             "other": "outside the mapped parts"}
    seen: set[int] = set()
    rows = []
    for part, params in groups:
        fresh = [p for p in dict.fromkeys(params) if id(p) not in seen]  # a tensor counts in the first part it is in
        seen.update(id(p) for p in fresh)
        note = notes.get(part) or ("shares tensors with a part above" if len(fresh) < len(set(params)) else "")
        if fresh or part != "other":
            rows.append({"part": part, "parameters": sum(p.numel() for p in fresh),
                         "trainable": sum(p.numel() for p in fresh if p.requires_grad), "note": note})
    return pd.DataFrame(rows).set_index("part")


def describe_layers(model: nn.Module) -> dict[str, object]:
    """Return where find_layers found each part of `model`: paths, blocks, norm class, tied head (notebook 04)."""
    layers = find_layers(model)
    base = unwrap(model)
    names = {id(m): n for n, m in base.named_modules()}
    return {
        "model": type(base).__name__,
        "embeddings": ", ".join(names[id(m)] for m in layers.embeddings),
        "blocks": f"{names[id(layers.blocks)]} [{len(layers.blocks)} x {type(layers.blocks[0]).__name__}]",
        "final norm": (f"{names[id(layers.final_norm)]} ({type(layers.final_norm).__name__})"
                       if layers.final_norm is not None else "none"),
        "head": names[id(layers.head)],
        "tied": layers.tied,
    }
