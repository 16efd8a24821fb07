"""Perplexity checked against an independent computation, and generation."""
import math

import pytest
import torch
import torch.nn.functional as F

import helpers
from helpers.evaluation import next_token_nll, windows


def reference_nll(model, ids, block_size, stride, prefix=()):
    """Sum of -log p(token) scored once each, one window at a time, as the transformers perplexity guide does,
    with the tokenizer's prefix (BOS) in front of every window as unscored context."""
    total, count, prev_end, span = 0.0, 0, 0, block_size - len(prefix)
    for begin in range(0, ids.numel(), stride):
        end = min(begin + span, ids.numel())
        x = torch.cat([torch.tensor(list(prefix), dtype=torch.long), ids[begin:end]]).unsqueeze(0)
        with torch.no_grad():
            logp = F.log_softmax(model(x).logits[0].double(), dim=-1)
        for pos in range(max(prev_end, begin), end):
            fed = len(prefix) + pos - begin
            if fed == 0:  # the very first fed token has nothing before it to be predicted from
                continue
            total -= logp[fed - 1, ids[pos]].item()
            count += 1
        prev_end = end
        if end == ids.numel():
            break
    return total, count


def test_next_token_nll_sums_the_scored_targets_only():
    logits = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(0))
    targets = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(1))
    targets[0, :2] = -100
    logp = F.log_softmax(logits.double(), dim=-1)
    expected = -sum(logp[b, t, targets[b, t]].item() for b in range(2) for t in range(5) if targets[b, t] != -100)
    assert next_token_nll(logits, targets).item() == pytest.approx(expected, rel=1e-6)
    per_target = next_token_nll(logits, targets, reduction="none")
    assert per_target.shape == (10,) and per_target[:2].eq(0).all()
    assert per_target.sum().item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("stride", [None, 8])
@pytest.mark.parametrize("with_bos", [False, True])
def test_perplexity_matches_independent_computation(model, tokenizer, bos_tokenizer, text, stride, with_bos):
    tok = bos_tokenizer if with_bos else tokenizer
    prefix = helpers.special_prefix(tok)
    ids = helpers.tokenize(tok, text)
    nll, n = helpers.token_nll(model, ids, block_size=32, stride=stride, batch_size=3, prefix=prefix)
    ref_nll, ref_n = reference_nll(model, ids, 32, stride or 32 - len(prefix), prefix)
    assert n == ref_n
    assert nll == pytest.approx(ref_nll, rel=1e-5)
    ppl = helpers.perplexity(model, tok, text, block_size=32, stride=stride)
    assert ppl == pytest.approx(math.exp(ref_nll / ref_n), rel=1e-5)


@pytest.mark.parametrize("with_bos", [False, True])
def test_one_window_equals_the_transformers_loss_with_the_tokenizers_defaults(
    model, tokenizer, bos_tokenizer, text, with_bos
):
    tok = bos_tokenizer if with_bos else tokenizer
    snippet = text[:120]
    ids = torch.tensor([tok(snippet).input_ids])
    assert (ids[0, 0].item() == tok.bos_token_id) == with_bos
    with torch.no_grad():
        expected = math.exp(model(ids, labels=ids).loss.item())
    assert helpers.perplexity(model, tok, snippet, block_size=256) == pytest.approx(expected, rel=1e-6)


def test_sliding_window_scores_every_token_but_the_first_once():
    spans = windows(100, 32, 8)
    scored = []
    for begin, end, n_context in spans:
        scored += list(range(begin + max(n_context, 1), end))
    assert sorted(scored) == list(range(1, 100))


@pytest.mark.parametrize("stride", [None, 8])
def test_with_a_bos_prefix_every_token_is_scored_once_the_first_included(stride):
    spans = windows(100, 32, stride, n_prefix=1)
    assert all(end - begin <= 31 for begin, end, _ in spans)
    scored = [i for begin, end, n_context in spans for i in range(begin + n_context, end)]
    assert sorted(scored) == list(range(100))


def test_the_bos_is_fed_but_never_scored(model, bos_tokenizer, text):
    ids = helpers.tokenize(bos_tokenizer, text)[:40]
    nll, n = helpers.token_nll(model, ids, block_size=16, prefix=[bos_tokenizer.bos_token_id])
    assert n == 40  # 3 windows of BOS + 15, 15, 10 text tokens: every text token once, the BOS never
    _, n_plain = helpers.token_nll(model, ids, block_size=16)
    assert n_plain == 40 - 3  # without a BOS, each window's first token has nothing to be predicted from


def test_perplexity_is_token_weighted_not_a_mean_of_batch_means(model, tokenizer, text):
    # 3 full blocks and one short tail block: a mean of per-batch means would weight the tail like a full block.
    ids = helpers.tokenize(tokenizer, text)[: 3 * 32 + 5]
    nll_all, n_all = helpers.token_nll(model, ids, block_size=32, batch_size=8)
    assert n_all == 3 * 31 + 4
    nll_one, n_one = helpers.token_nll(model, ids, block_size=32, batch_size=1)
    assert (n_one, nll_one) == (n_all, pytest.approx(nll_all, rel=1e-5))


def test_random_model_scores_near_the_vocabulary_size(model, tokenizer, text):
    # A freshly initialised model predicts nearly uniformly: perplexity close to the vocabulary size.
    ppl = helpers.perplexity(model, tokenizer, text, block_size=64)
    assert 0.5 * model.config.vocab_size < ppl < 2 * model.config.vocab_size


def test_perplexity_rejects_bad_arguments(model, tokenizer, text):
    with pytest.raises(ValueError, match="stride must be between 1 and block_size"):
        helpers.perplexity(model, tokenizer, text, block_size=16, stride=32)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        helpers.token_nll(model, torch.tensor([5]))
    with pytest.raises(ValueError, match="at least 2 tokens.*Pass a longer text"):
        helpers.perplexity(model, tokenizer, "a")
    with pytest.raises(ValueError, match="No text given"):
        helpers.perplexity(model, tokenizer, " ")


def test_perplexity_restores_training_mode(model, tokenizer, text):
    model.train()
    helpers.perplexity(model, tokenizer, text, block_size=32)
    assert model.training


def test_greedy_generation_is_deterministic_and_sampling_is_seeded(model, tokenizer):
    a = helpers.generate(model, tokenizer, "fn main", max_new_tokens=12)
    b = helpers.generate(model, tokenizer, "fn main", max_new_tokens=12)
    assert a == b and isinstance(a, str)
    s1 = helpers.generate(model, tokenizer, "fn main", max_new_tokens=12, greedy=False, seed=1)
    s2 = helpers.generate(model, tokenizer, "fn main", max_new_tokens=12, greedy=False, seed=1)
    assert s1 == s2


def test_with_random_head_unties_and_leaves_the_original_alone(model):
    tied = helpers.heads_are_tied(model)
    before = model.get_output_embeddings().weight.clone()
    broken = helpers.with_random_head(model, seed=1)
    assert tied == model.config.tie_word_embeddings
    assert not helpers.heads_are_tied(broken)
    assert not torch.equal(broken.get_output_embeddings().weight, before)
    assert torch.equal(model.get_output_embeddings().weight, before)
    assert helpers.heads_are_tied(model) == tied


def test_a_head_of_zeros_guesses_uniformly_and_scores_exactly_the_vocabulary_size(model, tokenizer, text):
    uniform = helpers.with_random_head(model, std=0.0)
    ppl = helpers.perplexity(uniform, tokenizer, text, block_size=32)
    assert ppl == pytest.approx(model.config.vocab_size, rel=1e-5)


@pytest.mark.parametrize("with_bos", [False, True])
def test_window_perplexities_are_the_per_window_parts_of_the_total(model, tokenizer, bos_tokenizer, text, with_bos):
    tok = bos_tokenizer if with_bos else tokenizer
    n_text = 8 - with_bos  # text tokens per 8-token window, after the BOS if there is one
    snippet = text[: n_text * 12]  # one token per character: exactly 12 windows
    ids = helpers.tokenize(tok, snippet)
    per_window = helpers.window_perplexities(model, tok, snippet, block_size=8, batch_size=5)
    nll, n = helpers.token_nll(model, ids, block_size=8, prefix=helpers.special_prefix(tok))
    assert per_window.numel() == 12 and n == 7 * 12
    assert (per_window.log() * 7).sum().item() == pytest.approx(nll, rel=1e-5)


@pytest.mark.slow
def test_default_model_perplexity_equals_the_transformers_loss():
    # The issue behind the rule: one ~130-token test snippet scored 55.56 with an <|im_end|> appended, 46.83 without.
    model, tok = helpers.load_model()
    snippet = helpers.load_corpus().test[0][:600]
    ids = torch.tensor([tok(snippet).input_ids])
    assert 100 < ids.shape[1] < 256 and helpers.special_prefix(tok) == []
    with torch.no_grad():
        expected = math.exp(model(ids, labels=ids).loss.item())
    assert helpers.perplexity(model, tok, snippet) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        helpers.perplexity(model, tok, "a")
