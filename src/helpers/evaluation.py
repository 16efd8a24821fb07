"""Perplexity over held-out text and text generation."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from .progress import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .data import make_blocks, special_prefix, tokenize


def windows(n_tokens: int, block_size: int, stride: int | None = None, *,
            n_prefix: int = 0) -> list[tuple[int, int, int]]:
    """Return (begin, end, n_context) per window of text tokens, the first n_context context only (notebook 01).

    Each window holds block_size tokens: an `n_prefix`-token special prefix (a BOS, see `special_prefix`), then up to
    block_size - n_prefix text tokens. With the default stride the windows do not overlap; without a prefix the first
    token of each window has nothing to be predicted from, with one it is predicted from the BOS. A smaller stride
    re-feeds block_size - n_prefix - stride tokens of context so each scored token sees more history (the sliding
    window of the transformers perplexity guide).
    """
    span_len = block_size - n_prefix
    if block_size < 2 or span_len < 1:
        raise ValueError(f"block_size must be at least 2 and longer than the {n_prefix}-token prefix; "
                         f"got {block_size}.")
    stride = span_len if stride is None else stride
    if not 1 <= stride <= span_len:
        raise ValueError(f"stride must be between 1 and block_size ({span_len} text tokens per window); got {stride}.")
    spans, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + span_len, n_tokens)
        # Tokens before prev_end were already scored; they are fed only as context.
        n_context = max(prev_end - begin, 0)
        if n_prefix + end - begin >= 2 and end > prev_end:
            spans.append((begin, end, n_context))
        prev_end = end
        if end == n_tokens:
            break
    return spans


@torch.no_grad()
def token_nll(
    model: PreTrainedModel,
    ids: torch.Tensor,
    *,
    block_size: int = 256,
    stride: int | None = None,
    batch_size: int = 8,
    prefix: list[int] | tuple[int, ...] = (),
    progress: bool | None = None,
) -> tuple[float, int]:
    """Return (summed NLL in nats, number of predicted tokens) over the 1-D text `ids`: the one scorer (notebook 01).

    Every window is fed as `prefix` + text tokens (see `windows`); the prefix is context and never scored.
    """
    if ids.numel() + len(prefix) < 2:
        raise ValueError(
            f"Perplexity needs at least 2 tokens (one input, one target); the text has {ids.numel()} "
            f"and the tokenizer's prefix {len(prefix)}. Pass a longer text."
        )
    device = next(model.parameters()).device
    n_prefix = len(prefix)
    spans = windows(ids.numel(), block_size, stride, n_prefix=n_prefix)
    head = torch.tensor(list(prefix), dtype=ids.dtype)
    # Batch windows of equal length together: no padding, so every forward is one dense full-sequence pass.
    groups: dict[int, list[tuple[int, int, int]]] = {}
    for span in spans:
        groups.setdefault(span[1] - span[0], []).append(span)
    batches = [g[i : i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]
    show = len(batches) > 4 if progress is None else progress
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    for batch in tqdm(batches, desc="perplexity", disable=not show, leave=False):
        x = torch.stack([torch.cat([head, ids[b:e]]) for b, e, _ in batch]).to(device)
        logits = model(input_ids=x, use_cache=False).logits.float()
        targets = x[:, 1:].clone()
        for row, (_, _, n_context) in enumerate(batch):
            # Target j is the token at fed position j+1: the prefix and the re-fed context are not scored.
            targets[row, : max(n_prefix + n_context - 1, 0)] = -100
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
        total_nll += nll.item()
        total_tokens += int((targets != -100).sum())
    model.train(was_training)
    return total_nll, total_tokens


def perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: str | list[str],
    *,
    block_size: int = 256,
    stride: int | None = None,
    batch_size: int = 8,
    progress: bool | None = None,
) -> float:
    """Return exp of the token-weighted mean NLL of the text tokens of `texts` (written out in notebook 01).

    The text is read as the model was trained to read it (see `helpers.data.special_prefix`): documents joined by a
    blank line, the tokenizer's BOS (if it adds one) in front of every window as unscored context, no chat tokens.
    """
    nll, n = token_nll(model, tokenize(tokenizer, texts), block_size=block_size, stride=stride, batch_size=batch_size,
                       prefix=special_prefix(tokenizer), progress=progress)
    return math.exp(nll / n)


@torch.no_grad()
def window_perplexities(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: str | list[str],
    *,
    block_size: int = 8,
    batch_size: int = 64,
) -> torch.Tensor:
    """Return the perplexity of every non-overlapping `block_size`-token window of `texts` (notebook 01)."""
    prefix = special_prefix(tokenizer)
    blocks = make_blocks(tokenize(tokenizer, texts), block_size, prefix)
    # The first scored position: the first text token after a prefix, else the window's second token.
    start = max(len(prefix), 1)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    values = []
    for x in blocks.split(batch_size):
        x = x.to(device)
        logits = model(input_ids=x, use_cache=False).logits.float()
        nll = F.cross_entropy(logits[:, start - 1 : -1].transpose(1, 2), x[:, start:], reduction="none")
        values.append(nll.mean(dim=1).exp().cpu())
    model.train(was_training)
    return torch.cat(values)


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    *,
    max_new_tokens: int = 60,
    greedy: bool = True,
    temperature: float = 0.8,
    top_p: float = 0.95,
    seed: int = 0,
) -> str:
    """Return the text the model writes after `prompt`, greedy or seeded nucleus sampling (notebook 01)."""
    device = next(model.parameters()).device
    inputs = tokenizer(prompt, return_tensors="pt").to(device)
    torch.manual_seed(seed)
    sampling = {} if greedy else {"temperature": temperature, "top_p": top_p, "top_k": 0}
    out = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=not greedy,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        **sampling,
    )
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
