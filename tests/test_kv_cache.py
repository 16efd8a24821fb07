"""The KV-cache lesson: token-by-token logits equal full-sequence ones, the report's bugs bite, generation agrees."""
import time

import pytest
import torch
import torch.nn.functional as F

import helpers
from conftest import tiny_model
from helpers import kv_cache as kv


def ids_of(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 255, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("batch", [1, 2])
def test_token_by_token_equals_full_sequence(model, batch):
    ids = ids_of(batch, 24)
    with torch.no_grad():
        full = helpers.logits_full_sequence(model, ids)
        steps = helpers.logits_token_by_token(model, ids)
    assert full.shape == steps.shape == (batch, 24, model.config.vocab_size)
    assert (full - steps).abs().max().item() <= 1e-4


def test_token_by_token_equals_an_independent_per_prefix_computation(model):
    # Position t of a causal LM sees tokens 0..t only: the last logits of the prefix 0..t, no cache involved.
    ids = ids_of(1, 10)
    with torch.no_grad():
        steps = helpers.logits_token_by_token(model, ids)
        last = [model(input_ids=ids[:, : t + 1], use_cache=False).logits[:, -1:] for t in range(10)]
        prefixes = torch.cat(last, dim=1)
    assert (steps - prefixes).abs().max().item() <= 1e-4


def test_gradients_agree_between_the_two_paths(model):
    ids = ids_of(1, 12)
    grads = []
    for fn in (helpers.logits_full_sequence, helpers.logits_token_by_token):
        model.zero_grad(set_to_none=True)
        logits = fn(model, ids)
        F.cross_entropy(logits[0, :-1], ids[0, 1:]).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert grads[0].shape == grads[1].shape
    assert torch.allclose(grads[0], grads[1], atol=1e-4, rtol=1e-3)


def test_cached_and_uncached_greedy_generation_give_identical_ids(model):
    prompt = ids_of(1, 6, seed=3)
    with_cache, _ = helpers.greedy_generate(model, prompt, 40, use_cache=True)
    without, _ = helpers.greedy_generate(model, prompt, 40, use_cache=False)
    assert with_cache.shape == (1, 46)
    assert torch.equal(with_cache[:, :6], prompt)
    assert torch.equal(with_cache, without)


def test_generation_speed_reports_both_runs(model):
    result = helpers.generation_speed(model, ids_of(1, 4), new_tokens=8)
    assert result["identical"] is True
    assert result["cached ids"].shape == (1, 12)
    assert result["cached tokens/s"] > 0 and result["uncached tokens/s"] > 0


def test_stale_cache_changes_the_logits_and_the_perplexity(model):
    previous, ids = ids_of(2, 16, seed=1), ids_of(2, 16, seed=2)
    with torch.no_grad():
        clean = helpers.logits_full_sequence(model, ids)
        stale = helpers.logits_stale_cache(model, ids, previous)
    assert (stale - clean).abs().max().item() > 1e-2
    clean_ppl = helpers.next_token_perplexity(clean, ids)
    assert helpers.next_token_perplexity(stale, ids) != pytest.approx(clean_ppl, rel=1e-3)


def test_stale_cache_is_what_the_report_loop_computes_without_clearing(model):
    previous, ids = ids_of(1, 9, seed=1), ids_of(1, 7, seed=2)
    lm = helpers.StatefulLM(model)
    with torch.no_grad():
        lm(previous, 0)
        assert lm.cached_tokens == 9
        loop = torch.cat([lm(ids[:, p : p + 1], p) for p in range(7)], dim=1)
        assert lm.cached_tokens == 16
        one_pass = helpers.logits_stale_cache(model, ids, previous)
    assert (loop - one_pass).abs().max().item() <= 1e-4


def test_frozen_position_is_the_loop_that_never_advances_pos(model):
    ids = ids_of(1, 12)
    lm = helpers.StatefulLM(model)
    with torch.no_grad():
        loop = torch.cat([lm(ids[:, p : p + 1], 0) for p in range(12)], dim=1)
        one_pass = helpers.logits_frozen_position(model, ids)
        clean = helpers.logits_full_sequence(model, ids)
    assert (loop - one_pass).abs().max().item() <= 1e-4
    # Random tiny models barely use positions, so the difference is small but far above float noise.
    assert (one_pass - clean).abs().max().item() > 1e-3


def test_stateful_lm_is_right_when_cleared_and_fails_like_the_report_when_not(model):
    ids = ids_of(1, 48)
    lm = helpers.StatefulLM(model)
    with torch.no_grad():
        first = lm(ids[:, :32], 0)  # the 32-token training block: correct, and now cached
        assert (first - helpers.logits_full_sequence(model, ids[:, :32])).abs().max().item() <= 1e-4
        with pytest.raises(RuntimeError, match=r"size of tensor a \(48\) must match the size of tensor b \(16\)"):
            lm(ids[:, 32:], 0)  # the 16-token test block: mask [1, 1, 16, 16], keys 32 cached + 16 new
        assert lm.last_mask_shape == [1, 1, 16, 16]
        lm.clear_kv_cache()
        assert lm.cached_tokens == 0
        again = lm(ids[:, 32:], 0)
    assert (again - helpers.logits_full_sequence(model, ids[:, 32:])).abs().max().item() <= 1e-4


def test_cache_holds_keys_and_values_of_the_size_the_formula_says(model):
    cache = helpers.fill_cache(model, ids_of(2, 10))
    g = helpers.kv_geometry(model.config)
    table = helpers.cache_table(cache)
    assert len(table) == g["layers"]
    assert table["keys"].iloc[0] == [2, g["kv heads"], 10, g["head dim"]]
    assert table["values"].iloc[-1] == [2, g["kv heads"], 10, g["head dim"]]
    assert helpers.cache_nbytes(cache) == table["bytes"].sum() == 2 * 10 * helpers.kv_bytes_per_token(model.config)
    growth = helpers.cache_growth(model, [4, 8, 16])
    assert (growth["measured bytes"] == growth["formula bytes"]).all()
    first = growth["measured bytes"].iloc[0]
    assert list(growth["measured bytes"]) == [first, 2 * first, 4 * first]  # linear in the number of tokens


def test_kv_bytes_per_token_of_the_report_model():
    # Qwen2-0.5B: 24 layers x 2 KV heads x 64 dims x (keys + values) x 4 bytes.
    assert helpers.kv_bytes_per_token(helpers.qwen2_0_5b_config()) == 24 * 2 * 64 * 2 * 4
    assert helpers.kv_bytes_per_token(helpers.qwen2_0_5b_config(), torch.bfloat16) == 24 * 2 * 64 * 2 * 2


def test_timing_sweep_measures_both_modes(model):
    # On the CPU clock (blind to other programs), T forward passes cost more than one: a swapped column would not.
    table = helpers.timing_sweep(model, [4, 8], repeats=1, threads=1, clock="cpu", progress=False)
    assert list(table.index) == [4, 8]
    assert (table[["full (s)", "token by token (s)"]] > 0).all().all()
    assert (table["ratio"] > 1).all(), table
    assert all(p.grad is None for p in model.parameters())
    assert not model.training


def test_timing_runs_on_the_threads_asked_for_and_restores_torch_setting(model, monkeypatch):
    before = torch.get_num_threads()
    other = 2 if before == 1 else 1
    seen = []
    real = kv._logits

    def spy(m, ids, mode):
        seen.append(torch.get_num_threads())
        return real(m, ids, mode)

    monkeypatch.setattr(kv, "_logits", spy)
    helpers.timing_sweep(model, [4, 6], repeats=1, threads=other, progress=False)
    assert seen and set(seen) == {other}  # warm-ups included
    assert torch.get_num_threads() == before
    seen.clear()
    helpers.time_forward_backward(model, ids_of(1, 4), "full")
    assert seen == [before]  # threads=None leaves torch's setting alone

    def boom(m, ids, mode):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(kv, "_logits", boom)
    with pytest.raises(RuntimeError, match="out of memory"):
        helpers.time_forward_backward(model, ids_of(1, 4), "full", threads=other)
    assert torch.get_num_threads() == before  # restored after an error too


def test_cpu_clock_leaves_out_time_the_step_does_not_use_the_cpu(monkeypatch):
    # A step that sleeps stands for one that the machine set aside to run another program. The clock does not
    # depend on the family: one is enough (each sleeps for seconds in all).
    model = tiny_model("gpt2")
    real = kv._logits

    def sleepy(m, ids, mode):
        time.sleep(0.3)
        return real(m, ids, mode)

    monkeypatch.setattr(kv, "_logits", sleepy)
    wall = helpers.time_forward_backward(model, ids_of(1, 4), "full", threads=1, clock="wall")
    cpu = helpers.time_forward_backward(model, ids_of(1, 4), "full", threads=1, clock="cpu")
    assert wall >= 0.3
    assert 0 <= cpu < 0.15
    table = helpers.timing_sweep(model, [4], repeats=1, threads=1, clock="cpu", progress=False)
    assert (table[["full (s)", "token by token (s)"]] < 0.3).all().all()


def test_generation_speed_runs_on_the_threads_asked_for(model, monkeypatch):
    before = torch.get_num_threads()
    other = 2 if before == 1 else 1
    seen = []
    real = kv.greedy_generate
    monkeypatch.setattr(kv, "greedy_generate", lambda *a, **k: (seen.append(torch.get_num_threads()), real(*a, **k))[1])
    kv.generation_speed(model, ids_of(1, 4), new_tokens=4, threads=other)
    assert seen == [other] * 3
    assert torch.get_num_threads() == before
    result = kv.generation_speed(model, ids_of(1, 4), new_tokens=4, threads=1, clock="cpu")
    assert result["identical"] and result["cached tokens/s"] > 0
    with pytest.raises(ValueError, match="needs threads=1"):
        kv.generation_speed(model, ids_of(1, 4), new_tokens=4, threads=2, clock="cpu")


def test_bad_inputs_get_one_clear_error(model):
    with pytest.raises(ValueError, match=r"ids\[None\]"):
        helpers.logits_token_by_token(model, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="Unknown mode 'cached'"):
        helpers.time_forward_backward(model, ids_of(1, 4), "cached")
    with pytest.raises(ValueError, match="Unknown clock 'process'"):
        helpers.timing_sweep(model, [4], repeats=1, threads=1, clock="process", progress=False)
    with pytest.raises(ValueError, match="needs threads=1"):
        helpers.timing_sweep(model, [4], repeats=1, threads=2, clock="cpu", progress=False)
    with pytest.raises(ValueError, match="needs threads=1"):
        helpers.time_forward_backward(model, ids_of(1, 4), "full", threads=2, clock="cpu")
    with kv.intra_op_threads(2), pytest.raises(ValueError, match="needs threads=1"):
        helpers.greedy_generate(model, ids_of(1, 4), 2, use_cache=True, clock="cpu")  # torch's own setting counts
    for bad in (0, -1, 1.5, "2", True):
        with pytest.raises(ValueError, match="threads must be a positive whole number"):
            helpers.timing_sweep(model, [4], repeats=1, threads=bad, progress=False)
    with pytest.raises(ValueError, match="batch size"):
        helpers.logits_stale_cache(model, ids_of(2, 4), ids_of(1, 4))
    with pytest.raises(ValueError, match="new_tokens"):
        helpers.greedy_generate(model, ids_of(1, 4), 0, use_cache=True)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        helpers.time_forward_backward(model, ids_of(1, 4), "full")


def test_encoder_decoder_models_are_refused():
    import transformers

    config = transformers.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
    t5 = transformers.T5ForConditionalGeneration(config)
    with pytest.raises(TypeError, match="encoder-decoder"):
        helpers.logits_full_sequence(t5, ids_of(1, 4))


def test_training_and_evaluation_use_one_full_sequence_forward_without_cache(model, tokenizer, text):
    calls = []

    def record(module, args, kwargs):
        calls.append((kwargs["input_ids"].shape[1], kwargs.get("use_cache")))

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        helpers.token_nll(model, helpers.tokenize(tokenizer, text), block_size=32, batch_size=4, progress=False)
        n_eval = len(calls)
        data = helpers.make_dataloader(tokenizer, text, block_size=32, batch_size=4)
        config = helpers.TrainConfig(steps=2, warmup_steps=0, eval_every=2, eval_batches=1, progress=False)
        helpers.train(model, data, data, config)
    finally:
        handle.remove()
    assert n_eval >= 1 and len(calls) > n_eval
    assert all(seq > 1 and use_cache is False for seq, use_cache in calls)
