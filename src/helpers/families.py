"""Adaptations for the model families the tutorial never runs: the one module the teaching core consults about them.

strategies.py, lora.py and kv_cache.py are written for GPT-2, Qwen2 and Llama; where another family differs, they
call one function here, whose comment names the families that need it (checked by tests/test_families.py).
"""
from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Collection, Iterator, Sequence

from torch import nn

from .compat import require

# --- the parts of a model: find_layers in strategies.py (first used in notebook 03) ------------------------------


def text_config(config: object) -> object:
    """Return the part of `config` that describes the decoder, for find_layers (first used in notebook 03)."""
    # A composite config nests text, vision or audio sub-configs; GPT-2's, Qwen2's and Llama's return themselves.
    if config is not None and hasattr(config, "get_text_config"):
        return config.get_text_config()
    return config


LAYER_COUNTS = ("num_hidden_layers", "num_layers", "n_layer", "n_layers")
"""Config fields that may give the length of the block list, num_hidden_layers first (LongCat-Flash's counts two
sub-layers per block; its num_layers counts the blocks)."""


def block_counts(config: object) -> list[int]:
    """Return the lengths the block list may have, in the order of LAYER_COUNTS (find_layers, notebook 03)."""
    counts = [getattr(config, key, None) for key in LAYER_COUNTS]
    return [n for n in counts if isinstance(n, int) and not isinstance(n, bool) and n >= 1]


def block_list(modules: Collection[nn.Module], counts: Sequence[int]) -> nn.ModuleList | None:
    """Return the nn.ModuleList among `modules` that holds the blocks, or None (find_layers, notebook 03)."""
    # GPT-2, Qwen2 and Llama have one list of counts[0] (num_hidden_layers) blocks; LongCat-Flash's has the next count.
    for n in dict.fromkeys(counts):
        lists = [m for m in modules if isinstance(m, nn.ModuleList) and len(m) == n]
        if lists:
            # Several lists of that length would be unusual; the blocks are the one that holds the weights.
            return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))
    return None


def final_norm_elsewhere(children: list[tuple[str, nn.Module]], at: int,
                         is_norm: Callable[[nn.Module], bool]) -> nn.Module | None:
    """Return the final norm when no norm follows the blocks (children[at] of their parent), or None (notebook 03)."""
    # OPT registers it before the blocks; a norm there named for the embeddings (BLOOM's) normalises the input.
    before = [child for name, child in children[:at] if is_norm(child) and "emb" not in name.lower()]
    if before:
        return before[-1]
    # Qwen4-Exp keeps it inside a module that runs after the blocks (its hyper-connection mixer).
    for _, child in children[at + 1:]:
        nested = next((m for m in child.modules() if m is not child and is_norm(m)), None)
        if nested is not None:
            return nested
    return None  # a post-norm model, GPT-1 (openai-gpt), has none


# --- what LoRA adapts: lora.py (first used in notebook 07) ---------------------------------------------------------


def is_linear_projection(module: nn.Linear) -> bool:
    """Return whether a subclass of nn.Linear still computes x W^T + b, so LoRA can sit beside it (notebook 07)."""
    # peft adds x A^T B^T to what the layer returns. A subclass with its own forward and constructor computes something
    # else (Llama 4's and PhiMoE's routers); one that only rewrites forward (Falcon's FalconLinear) does not.
    cls = type(module)
    return cls.forward is nn.Linear.forward or cls.__init__ is nn.Linear.__init__


PEFT_MAMBA_TYPES = {"falcon_h1", "mamba", "mamba2", "falcon_mamba", "nemotron_h"}
"""Mamba-based model types on whose out_proj peft refuses LoRA: their fused kernels would skip an adapter."""


def peft_refused_targets(model: nn.Module) -> set[str]:
    """Return the projection names peft refuses to adapt in `model`: out_proj of PEFT_MAMBA_TYPES (notebook 07)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return {"out_proj"} if model_type in PEFT_MAMBA_TYPES else set()


def target_name(name: str) -> str:
    """Return the end of a qualified module name that names its kind: 'q_proj', or 'ffn.0' (notebook 07)."""
    parts = name.split(".")
    i = len(parts) - 1
    # CTRL's feed-forward is an nn.Sequential and Zamba2 keeps its adapters in lists: a bare index ('0') would match
    # every block of the list ('layers.0'), so the container's name stays with it.
    while i > 0 and parts[i].isdigit():
        i -= 1
    return ".".join(parts[i:])


def peft_target_modules(model: nn.Module, projections: Collection[str], targets: list[str]) -> list[str]:
    """Return peft's target_modules: the kinds `targets`, or the block projections by full name (notebook 07).

    peft matches a target by the end of a module's name, so when a kind also ends the name of a module outside the
    block projections (Qwen4-Exp's hyper-connection mixer), the projections are listed one by one.
    """
    clash = [n for n, _ in model.named_modules()
             if any(n == t or n.endswith("." + t) for t in targets) and n not in projections]
    return [n for n in projections if target_name(n) in targets] if clash else targets


@contextlib.contextmanager
def without_peft_v4_renaming() -> Iterator[None]:
    """Switch off, for one get_peft_model call, peft's renaming of transformers-v4 MoE targets (notebook 07).

    peft rewrites gate_proj / up_proj / down_proj of MoE types (DeepSeek, Qwen-MoE, ...) to transformers v5's fused
    expert tensors, which would move a new adapter off the dense and shared-expert projections onto the experts.
    """
    require("peft", "~=0.21.0", "helpers' LoRA (it switches off peft's v4 target renaming)")
    try:
        from peft.utils import transformers_weight_conversion as conversion
    except ImportError:  # a peft without the renaming
        conversion = None
    original = getattr(conversion, "convert_peft_config_for_transformers", None)
    if original is None:
        yield
        return
    conversion.convert_peft_config_for_transformers = lambda *args, **kwargs: None
    try:
        yield
    finally:
        conversion.convert_peft_config_for_transformers = original


# --- decoding token by token: logits_token_by_token in kv_cache.py (first used in notebook 02) ---------------------

CACHE_ARGUMENTS = ("cache", "past_key_values", "state")
"""Forward arguments that may carry the cache between calls, in this order: transformers 5's, the older one, RWKV's."""


def cache_argument(model: nn.Module, forward: Callable) -> str:
    """Return the argument of `forward` that carries `model`'s cache between calls (notebook 02)."""
    accepted = set(inspect.signature(forward).parameters)
    for name in CACHE_ARGUMENTS:
        if name in accepted:
            return name
    # GPT-1 (openai-gpt) has no cache at all.
    raise ValueError(
        f"{type(model).__name__} takes no cache argument in forward (no cache, past_key_values or state), so it "
        "cannot decode token by token: each step would see only its own token. Compute its logits with "
        "logits_full_sequence instead."
    )


def takes_position_ids(forward: Callable) -> bool:
    """Return whether `forward` takes position ids; GPT-2's, Qwen2's and Llama's do (notebook 02)."""
    # RWKV, Mamba, Mamba-2, Falcon-Mamba and xLSTM are recurrent, BLOOM and MPT use ALiBi, CPM-Ant counts positions
    # in its cache: none of them takes position ids.
    return "position_ids" in inspect.signature(forward).parameters


def next_cache(model: nn.Module, out: dict, argument: str, batch: int, pos: int) -> object:
    """Return the cache a one-token forward returned, for the next one; raise if it cannot continue (notebook 02)."""
    # A model returns its cache under the name of the argument ('cache', RWKV's 'state'); one that takes
    # past_key_values may return it under either name. The first forward built it (a DynamicCache, MiniMax's own).
    cache = out.get(argument) if argument != "past_key_values" else out.get("past_key_values", out.get("cache"))
    if cache is None:
        # RecurrentGemma keeps its recurrent state inside its modules.
        raise ValueError(
            f"{type(model).__name__} returned no cache from forward(use_cache=True), so the next token could not "
            "attend to this one. Compute its logits with logits_full_sequence instead."
        )
    if out.logits.shape[:2] != (batch, 1):
        # CPM-Ant keeps its prompt in the cache and returns no logits for a second single token.
        raise ValueError(
            f"{type(model).__name__} returned logits of shape {list(out.logits.shape)} for one new token at "
            f"position {pos} (expected [{batch}, 1, vocab]): its cache does not support decoding token by token. "
            "Compute its logits with logits_full_sequence instead."
        )
    return cache
