"""Which parts of a decoder-only model train: find the parts structurally, freeze by strategy, count what trains."""
from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Callable

import pandas as pd
from torch import nn

_NORM_TYPES = tuple(t for t in (nn.LayerNorm, getattr(nn, "RMSNorm", None)) if t is not None)


@dataclass
class LayerMap:
    """The parts of a decoder-only causal LM, found by structure rather than by parameter names.

    `final_norm` may be None (a post-norm model such as GPT-1 has none) or a module without parameters (OLMo's
    non-parametric LayerNorm): then there is nothing in it to train. `other` holds the tensors outside these parts
    (an embedding LayerNorm, a hyper-connection mixer, ...): they train only when everything but the embeddings does.
    """

    embeddings: list[nn.Module]
    blocks: nn.ModuleList
    final_norm: nn.Module | None
    head: nn.Module
    tied: bool
    other: list[nn.Parameter] = field(default_factory=list)

    def parts(self) -> list[tuple[str, list[nn.Module]]]:
        """Return (part name, modules) bottom to top: embeddings, block 0 .. n-1, final norm, head."""
        rows = [("embeddings", list(self.embeddings))]
        rows += [(f"block {i}", [b]) for i, b in enumerate(self.blocks)]
        rows.append(("final norm", [self.final_norm] if self.final_norm is not None else []))
        rows.append(("head", [self.head]))
        return rows


def unwrap(model: nn.Module) -> nn.Module:
    """Return the transformers model inside a peft wrapper (or `model` itself when it is not wrapped)."""
    seen = 0
    while hasattr(model, "get_base_model") and callable(model.get_base_model) and seen < 4:
        inner = model.get_base_model()
        if inner is model:
            break
        model, seen = inner, seen + 1
    return model


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, _NORM_TYPES) or "norm" in type(module).__name__.lower()


def _cannot(model: nn.Module, why: str) -> ValueError:
    return ValueError(
        f"Cannot find the layers of {type(model).__name__}: {why}. The strategies work on transformers "
        "decoder-only causal LMs (GPT-2, Qwen2, Llama and the like) whose transformer blocks sit in one "
        "nn.ModuleList of config.num_hidden_layers blocks, with get_input_embeddings() and get_output_embeddings()."
    )


# Config fields that may give the length of the block list: num_hidden_layers first, then names families use
# when num_hidden_layers counts something else (LongCat-Flash counts two sub-layers per block).
_LAYER_COUNTS = ("num_hidden_layers", "num_layers", "n_layer", "n_layers")


def _final_norm(parent: nn.Module, blocks: nn.ModuleList) -> nn.Module | None:
    """Return the norm applied to the top block's output: found among the blocks' siblings, with or without weights."""
    children = list(parent.named_children())
    at = next(i for i, (_, child) in enumerate(children) if child is blocks)
    after = [child for _, child in children[at + 1:]]
    # Most models register the final norm right after the blocks (GPT-2's ln_f, Llama's norm).
    for child in after:
        if _is_norm(child):
            return child
    # OPT registers it before the blocks; a norm there named for the embeddings (BLOOM's) normalises the input.
    before = [child for name, child in children[:at] if _is_norm(child) and "emb" not in name.lower()]
    if before:
        return before[-1]
    # Some keep it inside a module that runs after the blocks (a hyper-connection mixer with its own norm).
    for child in after:
        nested = next((m for m in child.modules() if m is not child and _is_norm(m)), None)
        if nested is not None:
            return nested
    return None


def find_layers(model: nn.Module) -> LayerMap:
    """Return the LayerMap (embeddings, blocks, final norm, head, tied, other) of a decoder-only causal LM."""
    base = unwrap(model)
    if not isinstance(base, nn.Module):
        raise TypeError(f"find_layers needs a torch nn.Module; got {type(model).__name__}.")
    config = getattr(base, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    if getattr(config, "is_encoder_decoder", False):
        raise _cannot(base, "it is an encoder-decoder model, with two stacks of blocks")
    counts = [getattr(config, key, None) for key in _LAYER_COUNTS]
    counts = [n for n in counts if isinstance(n, int) and not isinstance(n, bool) and n >= 1]
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
    n_blocks = counts[0]
    lists = []
    for n in dict.fromkeys(counts):
        lists = [m for m in names if isinstance(m, nn.ModuleList) and len(m) == n]
        if lists:
            n_blocks = n
            break
    if not lists:
        raise _cannot(base, f"no nn.ModuleList holds its {counts[0]} blocks")
    # Several lists of that length would be unusual; the blocks are the one that holds the weights.
    blocks = max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))
    if sum(p.numel() for p in blocks.parameters()) == 0:
        raise _cannot(base, f"the nn.ModuleList of {n_blocks} modules at '{names[blocks]}' holds no parameters")

    block_name = names[blocks]
    parent = base.get_submodule(block_name.rpartition(".")[0]) if "." in block_name else base
    final_norm = _final_norm(parent, blocks)

    # A learned position embedding is any other nn.Embedding outside the blocks and the head (GPT-2's wpe).
    inside = {id(m) for m in blocks.modules()} | {id(m) for m in head.modules()}
    positions = [
        m for m in names
        if isinstance(m, nn.Embedding) and m is not token and id(m) not in inside and getattr(m, "weight", None) is not None
    ]
    tied = head.weight is getattr(token, "weight", None)
    layers = LayerMap(embeddings=[token, *positions], blocks=blocks, final_norm=final_norm, head=head, tied=tied)
    layers.other = _unmapped(base, layers)
    return layers


def _unique_parameters(model: nn.Module) -> list[nn.Parameter]:
    seen, out = set(), []
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """Return (trainable, total) element counts over unique tensors; a tied head and embedding count once."""
    params = _unique_parameters(model)
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def count_tensors(model: nn.Module) -> tuple[int, int]:
    """Return (trainable tensors, all tensors): how many weight tensors, not how many numbers (the report's 291)."""
    params = _unique_parameters(model)
    return sum(1 for p in params if p.requires_grad), len(params)


@dataclass
class StrategyInfo:
    """What a strategy did: its name, options and a one-paragraph summary; attached as model.strategy_info."""

    name: str
    options: dict = field(default_factory=dict)
    summary: str = ""

    def param_groups(self, model: nn.Module, lr: float) -> list[dict]:
        """Return the optimizer's parameter groups: by default every trainable tensor at learning rate `lr`."""
        return [{"params": [p for p in _unique_parameters(model) if p.requires_grad], "lr": lr}]

    def on_step(self, model: nn.Module, step: int) -> None:
        """Do nothing; strategies that change what trains during training (gradual unfreezing) override this."""

    def __str__(self) -> str:
        return self.summary


STRATEGIES: dict[str, Callable] = {}
"""Registry of strategy name -> fn(model, **options) -> (model, StrategyInfo)."""


def register_strategy(name: str) -> Callable[[Callable], Callable]:
    """Return a decorator that registers fn(model, **options) -> (model, StrategyInfo) under `name`."""

    def decorator(fn: Callable) -> Callable:
        STRATEGIES[name] = fn
        return fn

    return decorator


def _options_of(fn: Callable) -> list[str]:
    params = list(inspect.signature(fn).parameters.values())[1:]
    return [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]


def apply_strategy(model: nn.Module, name: str, **options) -> nn.Module:
    """Return the model ready to train under strategy `name`: requires_grad set, model.strategy_info attached."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"apply_strategy needs a torch nn.Module (a transformers causal LM); got {type(model).__name__}.")
    if name not in STRATEGIES:
        raise ValueError(f"Unknown strategy {name!r}. Valid strategies: {', '.join(sorted(STRATEGIES))}.")
    fn = STRATEGIES[name]
    valid = _options_of(fn)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"Unknown option(s) {unknown} for strategy {name!r}. Valid options: {', '.join(valid) or 'none'}."
        )
    model, info = fn(model, **options)
    trainable, total = count_parameters(model)
    if trainable == 0:
        raise ValueError(
            f"Strategy {name!r} with options {options} leaves 0 of {total:,} parameters trainable in "
            f"{type(unwrap(model)).__name__}; training would change nothing. Choose options that leave "
            "something to train (for example fewer frozen blocks)."
        )
    model.strategy_info = info
    return model


def _set(modules: list[nn.Module], flag: bool) -> None:
    for module in modules:
        for p in module.parameters():
            p.requires_grad_(flag)


def _freeze_all_but(model: nn.Module, layers: LayerMap, trainable: list[nn.Module]) -> None:
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
        return (
            " The head is tied to the token embedding (one shared tensor), so freezing the embedding "
            "freezes the head as well: the output projection does not train."
        )
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


@register_strategy("full_fine_tuning")
def full_fine_tuning(model: nn.Module) -> tuple[nn.Module, StrategyInfo]:
    """Return the model with every parameter trainable, and its StrategyInfo."""
    layers = find_layers(model)
    _set([model], True)
    summary = "Full fine-tuning: every parameter trains." + _tied_note(layers, False)
    return model, StrategyInfo("full_fine_tuning", {}, summary)


@register_strategy("freeze_embeddings")
def freeze_embeddings(model: nn.Module) -> tuple[nn.Module, StrategyInfo]:
    """Return the model with the embeddings frozen and everything else trainable, and its StrategyInfo."""
    layers = find_layers(model)
    _set([model], True)
    _set(layers.embeddings, False)
    what = "token and position embeddings are" if len(layers.embeddings) > 1 else "token embedding is"
    summary = f"Freeze embeddings: the {what} frozen; all blocks, the final norm and the head train." + _tied_note(layers, True)
    return model, StrategyInfo("freeze_embeddings", {}, summary)


@register_strategy("freeze_lower_layers")
def freeze_lower_layers(model: nn.Module, *, n_frozen: int | float = 2 / 3) -> tuple[nn.Module, StrategyInfo]:
    """Return the model with the embeddings and the lowest `n_frozen` blocks frozen (int, or fraction), and its StrategyInfo."""
    layers = find_layers(model)
    n_blocks = len(layers.blocks)
    k = _resolve_n(n_frozen, n_blocks, "n_frozen")
    _freeze_all_but(model, layers, list(layers.blocks[k:]) + [m for m in (layers.final_norm, layers.head) if m is not None])
    summary = (
        f"Freeze lower layers: the embeddings and {_span(0, k)} ({k} of {n_blocks}) are frozen; "
        f"{_span(k, n_blocks)}, the final norm and the head train." if k else
        f"Freeze lower layers with n_frozen=0: only the embeddings are frozen; all {n_blocks} blocks, the final norm and the head train."
    ) + _tied_note(layers, True)
    return model, StrategyInfo("freeze_lower_layers", {"n_frozen": k}, summary)


@register_strategy("adapter_layers")
def adapter_layers(model: nn.Module, *, n_top: int = 2) -> tuple[nn.Module, StrategyInfo]:
    """Return the model with only the top `n_top` blocks, the final norm and the head trainable, and its StrategyInfo."""
    layers = find_layers(model)
    n_blocks = len(layers.blocks)
    k = _resolve_n(n_top, n_blocks, "n_top")
    top = list(layers.blocks[n_blocks - k:]) if k else []
    _freeze_all_but(model, layers, top + [m for m in (layers.final_norm, layers.head) if m is not None])
    first = n_blocks - k
    blocks = f"{_span(first, n_blocks)} (the top {k} of {n_blocks})" if k else "no blocks"
    summary = f"Adapter layers: only {blocks}, the final norm and the head train; everything below is frozen." + _tied_note(layers, True)
    return model, StrategyInfo("adapter_layers", {"n_top": k}, summary)


def _unmapped(model: nn.Module, layers: LayerMap) -> list[nn.Parameter]:
    """Return the model's unique tensors outside embeddings, blocks, final norm and head."""
    mapped = {id(p) for _, mods in layers.parts() for m in mods for p in m.parameters()}
    return [p for p in _unique_parameters(model) if id(p) not in mapped]


def trainable_map(model: nn.Module) -> pd.DataFrame:
    """Return a table with one row per part (embeddings, block 0..n-1, final norm, head): parameters and trainable ones."""
    layers = find_layers(model)
    seen: set[int] = set()
    rows = []
    for part, modules in layers.parts():
        params, shared = [], False
        for m in modules:
            for p in m.parameters():
                if id(p) in seen:
                    shared = True
                    continue
                seen.add(id(p))
                params.append(p)
        note = "tied to the token embedding (counted there)" if part == "head" and layers.tied else ""
        if shared and not note:
            note = "shares tensors with a part above"
        rows.append({
            "part": part,
            "parameters": sum(p.numel() for p in params),
            "trainable": sum(p.numel() for p in params if p.requires_grad),
            "note": note,
        })
    rest = [p for p in _unmapped(model, layers) if id(p) not in seen]
    if rest:
        rows.append({"part": "other", "parameters": sum(p.numel() for p in rest),
                     "trainable": sum(p.numel() for p in rest if p.requires_grad), "note": "outside the mapped parts"})
    return pd.DataFrame(rows).set_index("part")


BASE_STRATEGIES = ("full_fine_tuning", "freeze_embeddings", "freeze_lower_layers", "adapter_layers")
"""The four strategies of the report, in its order of presentation."""


def strategy_counts(model: nn.Module, names: tuple[str, ...] = BASE_STRATEGIES) -> pd.DataFrame:
    """Return, per strategy, trainable and total tensors and parameters of `model` (it is left with the last strategy)."""
    rows = []
    for name in names:
        apply_strategy(model, name)
        (t_tensors, n_tensors), (t_params, n_params) = count_tensors(model), count_parameters(model)
        rows.append({"strategy": name, "trainable tensors": t_tensors, "tensors": n_tensors,
                     "trainable parameters": t_params, "parameters": n_params})
    return pd.DataFrame(rows).set_index("strategy")


def describe_layers(model: nn.Module) -> dict[str, object]:
    """Return where find_layers found each part of `model`: module paths, block count, norm class, tied head."""
    layers = find_layers(model)
    base = unwrap(model)
    names = {id(m): n for n, m in base.named_modules()}
    return {
        "model": type(base).__name__,
        "embeddings": ", ".join(names[id(m)] for m in layers.embeddings),
        "blocks": f"{names[id(layers.blocks)]} [{len(layers.blocks)} x {type(layers.blocks[0]).__name__}]",
        "final norm": f"{names[id(layers.final_norm)]} ({type(layers.final_norm).__name__})" if layers.final_norm is not None else "none",
        "head": names[id(layers.head)],
        "tied": layers.tied,
    }


# The strategies defined in other modules register themselves on import; import them here so that STRATEGIES and
# apply_strategy know every one of them whichever helpers module a reader imported first. (Neither imports peft.)
for _module in ("unfreezing", "lora"):
    importlib.import_module(f"{__package__}.{_module}")
