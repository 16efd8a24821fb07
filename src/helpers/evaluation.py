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

    Each window holds block_size tokens: the `n_prefix`-token special prefix (a BOS), then text. A stride below
    block_size - n_prefix re-feeds the tokens already scored as context (the sliding window of the transformers
    perplexity guide).
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


def next_token_nll(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Return the NLL in nats of `targets` under `logits`, summed: the one loss every score uses (notebook 01).

    logits[..., i, :] predicts targets[..., i], so the caller shifts by one (logits[:, :-1] against ids[:, 1:]); a
    target of -100 is not scored. Perplexity is exp(NLL / scored targets); reduction="none" keeps one NLL per target.
    """
    return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), reduction=reduction)


@torch.no_grad()
def token_nll(model: PreTrainedModel, ids: torch.Tensor, *, block_size: int = 256, stride: int | None = None,
              batch_size: int = 8, prefix: list[int] | tuple[int, ...] = (),
              progress: bool | None = None) -> tuple[float, int]:
    """Return (summed NLL in nats, number of predicted tokens) over the 1-D text `ids`: the one scorer (notebook 01).

    Every window is fed as `prefix` + text tokens (see `windows`); the prefix is context and never scored.
    """
    if ids.numel() + len(prefix) < 2:
        raise ValueError(f"Perplexity needs at least 2 tokens (one input, one target); the text has {ids.numel()} "
                         f"and the tokenizer's prefix {len(prefix)}. Pass a longer text.")
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
        logits = model(input_ids=x, use_cache=False).logits
        targets = x[:, 1:].clone()
        for row, (_, _, n_context) in enumerate(batch):
            # Target j is the token at fed position j+1: the prefix and the re-fed context are not scored.
            targets[row, : max(n_prefix + n_context - 1, 0)] = -100
        total_nll += next_token_nll(logits[:, :-1], targets).item()
        total_tokens += int((targets != -100).sum())
    model.train(was_training)
    return total_nll, total_tokens


def perplexity(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: str | list[str], *,
               block_size: int = 256, stride: int | None = None, batch_size: int = 8,
               progress: bool | None = None) -> float:
    """Return exp of the token-weighted mean NLL of the text tokens of `texts` (written out in notebook 01).

    The text is read as the model was trained to read it (see `helpers.data.special_prefix`): documents joined by a
    blank line, the tokenizer's BOS (if it adds one) in front of every window as unscored context, no chat tokens.
    """
    nll, n = token_nll(model, tokenize(tokenizer, texts), block_size=block_size, stride=stride, batch_size=batch_size,
                       prefix=special_prefix(tokenizer), progress=progress)
    return math.exp(nll / n)


@torch.no_grad()
def window_perplexities(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: str | list[str], *,
                        block_size: int = 8, batch_size: int = 64) -> torch.Tensor:
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
        logits = model(input_ids=x, use_cache=False).logits
        nll = next_token_nll(logits[:, start - 1 : -1], x[:, start:], reduction="none").view(len(x), -1)
        values.append(nll.mean(dim=1).exp().cpu())
    model.train(was_training)
    return torch.cat(values)


@torch.no_grad()
def generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: str, *, max_new_tokens: int = 60,
             greedy: bool = True, temperature: float = 0.8, top_p: float = 0.95, seed: int = 0) -> str:
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
