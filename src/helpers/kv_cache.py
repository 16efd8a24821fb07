"""The KV cache: what it holds, the report's token-by-token "fix" and its cost, and where a cache belongs."""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pandas as pd
import torch
from transformers import DynamicCache, PretrainedConfig, PreTrainedModel

from . import families
from .compat import require
from .device import synchronize
from .evaluation import next_token_nll
from .progress import tqdm
from .strategies import unwrap

MODES = ("full", "token_by_token")
"""The two ways of getting every position's logits: one forward over the sequence, or one forward per token."""


def _device(model: PreTrainedModel) -> torch.device:
    return next(model.parameters()).device


def _check_inputs(model: PreTrainedModel, input_ids: torch.Tensor) -> torch.Tensor:
    """Return `input_ids` on the model's device after checking it is a [batch, seq] tensor for a decoder-only LM."""
    if getattr(model.config, "is_encoder_decoder", False):
        raise TypeError(f"{type(model).__name__} is an encoder-decoder model; these helpers take decoder-only causal "
                        "LMs (GPT-2, Qwen2, Llama, ...) loaded with AutoModelForCausalLM.")
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.shape[1] == 0:
        shape = list(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a non-empty [batch, seq] tensor of token ids; got {shape}. "
                         "Add the batch dimension with ids[None] (or ids.unsqueeze(0)).")
    return input_ids.to(_device(model))


def _positions(batch: int, begin: int, length: int, device: torch.device) -> torch.Tensor:
    return torch.arange(begin, begin + length, device=device).expand(batch, length)


# --- the two ways of computing logits -------------------------------------------------------------------------


def logits_full_sequence(model: PreTrainedModel, input_ids: torch.Tensor) -> torch.Tensor:
    """Return [batch, seq, vocab] logits from one causal forward over the whole sequence, no cache (notebook 02)."""
    return model(input_ids=_check_inputs(model, input_ids), use_cache=False).logits


def logits_token_by_token(model: PreTrainedModel, input_ids: torch.Tensor) -> torch.Tensor:
    """Return [batch, seq, vocab] logits the report's way: a fresh cache, one forward per token (notebook 02)."""
    input_ids = _check_inputs(model, input_ids)
    batch, seq = input_ids.shape
    # A peft wrapper forwards keyword arguments to the transformers model inside; read that one's signature.
    forward = unwrap(model).forward
    argument = families.cache_argument(model, forward)  # 'cache' for GPT-2, Qwen2 and Llama
    positions = families.takes_position_ids(forward)
    # The first forward builds the cache (a DynamicCache); each later forward gets back what the one before returned.
    cache = None
    steps = []
    for pos in range(seq):
        kwargs = {argument: cache} if cache is not None else {}
        if positions:
            kwargs["position_ids"] = _positions(batch, pos, 1, input_ids.device)
        out = model(input_ids=input_ids[:, pos : pos + 1], use_cache=True, **kwargs)
        cache = families.next_cache(model, out, argument, batch, pos)  # out.cache for GPT-2, Qwen2 and Llama
        steps.append(out.logits)
    return torch.cat(steps, dim=1)


# --- what the cache holds -------------------------------------------------------------------------------------


@torch.no_grad()
def fill_cache(model: PreTrainedModel, input_ids: torch.Tensor) -> DynamicCache:
    """Return a fresh DynamicCache holding the keys and values of `input_ids`, one prefill (notebook 02)."""
    input_ids = _check_inputs(model, input_ids)
    cache = DynamicCache(config=model.config)
    model(input_ids=input_ids, cache=cache, use_cache=True)
    return cache


def _cache_layers(cache: DynamicCache) -> list:
    # Layers holding .keys and .values: the layout of transformers 5's DynamicCache.
    require("transformers", "~=5.24.0", "helpers.cache_nbytes and helpers.cache_table (they read DynamicCache.layers)")
    return cache.layers


def cache_nbytes(cache: DynamicCache) -> int:
    """Return the bytes held by every key and value tensor of `cache` (notebook 02)."""
    layers = _cache_layers(cache)
    return sum(t.nelement() * t.element_size() for layer in layers for t in (layer.keys, layer.values) if t is not None)


def cache_table(cache: DynamicCache) -> pd.DataFrame:
    """Return one row per layer: keys' and values' shapes [batch, kv heads, tokens, head dim], bytes (notebook 02)."""
    rows = []
    for i, layer in enumerate(_cache_layers(cache)):
        nbytes = sum(t.nelement() * t.element_size() for t in (layer.keys, layer.values))
        rows.append({"layer": i, "keys": list(layer.keys.shape), "values": list(layer.values.shape), "bytes": nbytes})
    return pd.DataFrame(rows).set_index("layer")


def kv_geometry(config: PretrainedConfig) -> dict[str, int]:
    """Return the numbers that size a KV cache: layers, query and key/value heads, head dimension (notebook 02)."""
    config = config.get_text_config(decoder=True)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return {"layers": config.num_hidden_layers, "query heads": heads, "kv heads": kv_heads, "head dim": head_dim}


def kv_bytes_per_token(config: PretrainedConfig, dtype: torch.dtype = torch.float32) -> int:
    """Return the cache bytes a token adds: 2 (keys, values) x layers x kv heads x head dim x bytes (notebook 02)."""
    g = kv_geometry(config)
    return 2 * g["layers"] * g["kv heads"] * g["head dim"] * torch.empty((), dtype=dtype).element_size()


def cache_growth(model: PreTrainedModel, lengths: list[int]) -> pd.DataFrame:
    """Return, per sequence length, the measured cache bytes of a prefill and the formula's bytes (notebook 02)."""
    per_token = kv_bytes_per_token(model.config, next(model.parameters()).dtype)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for n in lengths:
        ids = torch.randint(model.config.get_text_config(decoder=True).vocab_size, (1, n), generator=generator)
        measured = cache_nbytes(fill_cache(model, ids))
        rows.append({"tokens": n, "measured bytes": measured, "formula bytes": n * per_token,
                     "MiB": round(measured / 2**20, 2)})
    return pd.DataFrame(rows).set_index("tokens")


# --- the report's bug, reproduced --------------------------------------------------------------------------------


class StatefulLM:
    """A causal LM that keeps its KV cache between calls, as the report's candle Qwen2 model does (notebook 02).

    `forward(input_ids, seqlen_offset)` follows candle: the new tokens get positions seqlen_offset, ...; for more than
    one token the causal mask is [batch, 1, new, seqlen_offset + new], from the offset given, not from what the cache
    holds; keys and values pile up in the cache until `clear_kv_cache()`.
    """

    def __init__(self, model: PreTrainedModel):
        self.model = model
        self.cache = DynamicCache(config=model.config)
        self.last_mask_shape: list[int] | None = None

    def clear_kv_cache(self) -> None:
        """Forget every cached key and value (notebook 02)."""
        self.cache = DynamicCache(config=self.model.config)

    @property
    def cached_tokens(self) -> int:
        """Return how many tokens' keys and values the cache holds (notebook 02)."""
        return self.cache.get_seq_length()

    def forward(self, input_ids: torch.Tensor, seqlen_offset: int) -> torch.Tensor:
        """Return [batch, new, vocab] logits of the new tokens, attending to whatever the cache holds (notebook 02)."""
        input_ids = _check_inputs(self.model, input_ids)
        batch, new = input_ids.shape
        mask = None
        if new > 1:
            dtype = next(self.model.parameters()).dtype
            device = input_ids.device
            blocked = torch.ones(new, seqlen_offset + new, dtype=torch.bool, device=device).triu(seqlen_offset + 1)
            mask = torch.zeros(blocked.shape, dtype=dtype, device=device).masked_fill(blocked, torch.finfo(dtype).min)
            mask = mask.expand(batch, 1, *blocked.shape)
            self.last_mask_shape = list(mask.shape)
        positions = _positions(batch, seqlen_offset, new, input_ids.device)
        return self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=self.cache,
                          use_cache=True).logits

    __call__ = forward


def logits_stale_cache(model: PreTrainedModel, input_ids: torch.Tensor, previous_ids: torch.Tensor) -> torch.Tensor:
    """Return [batch, seq, vocab] logits of `input_ids` with the cache of `previous_ids` never cleared (notebook 02).

    The new tokens restart at position 0 but attend to the previous sequence's keys too: in one forward, what a
    StatefulLM that was not cleared gives when fed them one by one, as the report's `forward(&token, pos)` does.
    """
    input_ids = _check_inputs(model, input_ids)
    if previous_ids.ndim != 2 or previous_ids.shape[0] != input_ids.shape[0]:
        raise ValueError(f"previous_ids must be [batch, seq] with the batch size of input_ids ({input_ids.shape[0]}); "
                         f"got {list(previous_ids.shape)}.")
    cache = fill_cache(model, previous_ids)
    batch, seq = input_ids.shape
    positions = _positions(batch, 0, seq, input_ids.device)
    return model(input_ids=input_ids, position_ids=positions, cache=cache, use_cache=True).logits


def logits_frozen_position(model: PreTrainedModel, input_ids: torch.Tensor) -> torch.Tensor:
    """Return [batch, seq, vocab] logits token by token, fresh cache, every token at position 0 (notebook 02)."""
    input_ids = _check_inputs(model, input_ids)
    batch, seq = input_ids.shape
    position_ids = torch.zeros(batch, seq, dtype=torch.long, device=input_ids.device)
    # The report's loop with `pos` never advanced, in one forward. An empty cache, not None: without one,
    # transformers reads all-zero positions as packed one-token sequences.
    cache = DynamicCache(config=model.config)
    return model(input_ids=input_ids, position_ids=position_ids, cache=cache, use_cache=True).logits


def next_token_perplexity(logits: torch.Tensor, input_ids: torch.Tensor) -> float:
    """Return exp of the mean next-token NLL when `logits[:, t]` predicts `input_ids[:, t + 1]` (notebook 02)."""
    if logits.shape[:2] != input_ids.shape or input_ids.shape[1] < 2:
        raise ValueError(f"logits {list(logits.shape)} and input_ids {list(input_ids.shape)} must share "
                         "[batch, seq >= 2].")
    nll = next_token_nll(logits[:, :-1], input_ids[:, 1:].to(logits.device), reduction="mean")
    return float(torch.exp(nll))


# --- the cost of the report's fix for training ---------------------------------------------------------------


def _logits(model: PreTrainedModel, input_ids: torch.Tensor, mode: str) -> torch.Tensor:
    return logits_full_sequence(model, input_ids) if mode == "full" else logits_token_by_token(model, input_ids)


CLOCKS = ("wall", "cpu")
"""What a timing counts: wall-clock seconds, or the CPU seconds of the timing thread (one intra-op thread only)."""


@contextmanager
def intra_op_threads(threads: int | None, clock: str = "wall",
                     device: torch.device | None = None) -> Iterator[Callable[[], float]]:
    """Run the block on `threads` torch intra-op threads (None: torch's) and yield `clock` (notebook 02).

    On a shared machine each parallel operation waits for the thread that shares a core with another program, by an
    amount that changes from run to run; one thread never waits. clock="cpu" leaves out time given to other programs.
    """
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive whole number of intra-op threads, or None to keep torch's "
                         f"setting ({torch.get_num_threads()} here); got {threads!r}.")
    if clock not in CLOCKS:
        raise ValueError(f"Unknown clock {clock!r}; use one of {CLOCKS}.")
    in_effect = threads or torch.get_num_threads()
    if clock == "cpu" and in_effect != 1:
        # With more threads the work is spread over threads this clock does not see.
        raise ValueError(f"clock='cpu' counts the CPU time of the calling thread only, so it needs threads=1; "
                         f"got {in_effect} threads. Pass threads=1, or use clock='wall'.")
    if clock == "cpu" and device is not None and device.type != "cpu":
        raise ValueError(f"clock='cpu' counts CPU seconds, but the model runs on {device}, whose work the CPU only "
                         "waits for; use clock='wall'.")
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        # On one thread, CPU-side PyTorch runs every operation, the autograd backward included, in the calling thread.
        yield time.thread_time if clock == "cpu" else time.perf_counter
    finally:
        torch.set_num_threads(before)


def time_forward_backward(model: PreTrainedModel, input_ids: torch.Tensor, mode: str, *, repeats: int = 1,
                          budget_s: float | None = None, threads: int | None = None, clock: str = "wall") -> float:
    """Return the fastest of `repeats` timings (s) of one step's forward + backward in `mode` (notebook 02).

    The fastest, because other work only ever adds time. Repeating stops after `budget_s` wall-clock seconds (and at
    least one run), so a slow mode is timed once. `threads` and `clock`: see `intra_op_threads`.
    """
    if mode not in MODES:
        raise ValueError(f"Unknown mode {mode!r}; use one of {MODES}.")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("The model has no trainable parameters, so there is no backward pass to time; "
                         "set requires_grad.")
    input_ids = _check_inputs(model, input_ids)
    device = input_ids.device
    with intra_op_threads(threads, clock, device) as now:
        was_training = model.training
        model.train()
        times: list[float] = []
        deadline = time.perf_counter() + (math.inf if budget_s is None else budget_s)
        try:
            for _ in range(repeats):
                if times and time.perf_counter() >= deadline:
                    break
                model.zero_grad(set_to_none=True)
                synchronize(device)
                start = now()
                logits = _logits(model, input_ids, mode)
                next_token_nll(logits[:, :-1], input_ids[:, 1:], reduction="mean").backward()
                synchronize(device)
                times.append(now() - start)
        finally:
            model.zero_grad(set_to_none=True)
            model.train(was_training)
    return min(times)


def timing_sweep(model: PreTrainedModel, lengths: list[int] = (16, 32, 64, 128, 256), *, repeats: int = 3,
                 token_repeats: int = 1, token_budget_s: float | None = None, threads: int | None = None,
                 clock: str = "wall", progress: bool = True) -> pd.DataFrame:
    """Return forward + backward seconds per sequence length (batch 1) for both modes, and their ratio (notebook 02).

    Each is the fastest of `repeats` full passes, or of up to `token_repeats` loops within `token_budget_s` seconds;
    every timing, warm-ups included, runs with `threads` and `clock` (see `intra_op_threads`).
    """
    vocab = model.config.get_text_config(decoder=True).vocab_size
    generator = torch.Generator().manual_seed(0)
    rows = []
    with intra_op_threads(threads, clock, _device(model)):  # a bad clock fails now, not after the warm-up
        # The first passes pay for allocations and kernel selection; keep them out of the table.
        time_forward_backward(model, torch.randint(vocab, (1, min(lengths)), generator=generator), "full")
        time_forward_backward(model, torch.randint(vocab, (1, 4), generator=generator), "token_by_token")
        for n in tqdm(list(lengths), desc="T", disable=not progress, leave=False):
            ids = torch.randint(vocab, (1, n), generator=generator)
            full = time_forward_backward(model, ids, "full", repeats=repeats, clock=clock)
            token = time_forward_backward(model, ids, "token_by_token", repeats=token_repeats, budget_s=token_budget_s,
                                          clock=clock)
            rows.append({"T": n, "full (s)": full, "token by token (s)": token, "ratio": token / full})
    return pd.DataFrame(rows).set_index("T")


# --- where the cache belongs: generation -------------------------------------------------------------------------


@torch.no_grad()
def greedy_generate(model: PreTrainedModel, input_ids: torch.Tensor, new_tokens: int, *, use_cache: bool,
                    clock: str = "wall") -> tuple[torch.Tensor, float]:
    """Return (prompt + exactly `new_tokens` greedy ids, seconds), with or without cache (notebook 02)."""
    input_ids = _check_inputs(model, input_ids)
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be at least 1; got {new_tokens}.")
    eos = model.generation_config.eos_token_id
    pad = model.generation_config.pad_token_id
    pad = pad if pad is not None else (eos[0] if isinstance(eos, list) else eos)
    device = input_ids.device
    with intra_op_threads(None, clock, device) as now:
        synchronize(device)
        start = now()
        # min_new_tokens: EOS must not end one run earlier than the other.
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, use_cache=use_cache, pad_token_id=pad)
        synchronize(device)
        seconds = now() - start
    return out, seconds


def generation_speed(model: PreTrainedModel, input_ids: torch.Tensor, new_tokens: int = 200, *,
                     threads: int | None = None, clock: str = "wall") -> dict[str, object]:
    """Return greedy generation with and without the cache: ids, whether identical, tokens/s, speed-up (notebook 02).

    Both runs, and a short warm-up, use `threads` and `clock` (see `intra_op_threads`).
    """
    with intra_op_threads(threads, clock, _device(model)):
        greedy_generate(model, input_ids, 2, use_cache=True)
        cached, t_cached = greedy_generate(model, input_ids, new_tokens, use_cache=True, clock=clock)
        uncached, t_uncached = greedy_generate(model, input_ids, new_tokens, use_cache=False, clock=clock)
    return {"new tokens": new_tokens, "identical": bool(torch.equal(cached, uncached)), "cached ids": cached,
            "uncached ids": uncached, "cached tokens/s": new_tokens / t_cached,
            "uncached tokens/s": new_tokens / t_uncached, "speed-up": t_uncached / t_cached}
