"""Training tokens/s of each strategy on the default model, against this machine's fp32 matmul GFLOP/s.

Usage: python benchmarks/train_throughput.py [--steps 4] [--strategies full_fine_tuning,...]
Full fine-tuning costs about 6 x parameters x tokens FLOPs (2 forward, 4 backward); dividing by the
measured seconds gives the achieved GFLOP/s, and its ratio to a plain n x n matmul says how much of the
machine the training loop actually uses. Both are measured in this one process, minutes apart at most.
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import helpers  # noqa: E402

STRATEGIES = ["full_fine_tuning", "freeze_embeddings", "freeze_lower_layers", "adapter_layers"]


def measure(strategy: str, model, tokenizer, corpus, steps: int) -> dict:
    """Return tokens/s and seconds of `steps` recipe steps under `strategy` (after one warm-up step)."""
    helpers.apply_strategy(model, strategy)
    train_data, val_data = helpers.recipe_data(tokenizer, corpus)
    config = helpers.recipe_config(steps=1, warmup_steps=0, eval_every=0, eval_at_start=False, progress=False)
    # A warm-up step pays for first-call allocations, so the timed steps see the steady state.
    helpers.train(model, train_data, val_data, config)
    history = helpers.train(model, train_data, val_data, helpers.recipe_config(
        steps=steps, warmup_steps=0, eval_every=0, eval_at_start=False, progress=False))
    trainable, total = helpers.count_parameters(model)
    # The final validation of train() is not in train_seconds; tokens/s counts only the optimizer steps.
    return {"strategy": strategy, "trainable": trainable, "total": total,
            "tokens_per_second": history.attrs["tokens_per_second"], "seconds": history.attrs["train_seconds"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps per strategy (default 4)")
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated strategy names")
    args = parser.parse_args(argv)
    helpers.quiet_transformers()
    torch.manual_seed(0)
    corpus = helpers.load_corpus()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; recipe batch {helpers.RECIPE['batch_size']} "
          f"x {helpers.RECIPE['block_size']} tokens, fp32, {args.steps} timed steps per strategy")
    gflops_before = helpers.matmul_gflops("cpu", n=1024, seconds=2.0)
    rows = []
    for strategy in args.strategies.split(","):
        model, tokenizer = helpers.load_model()
        rows.append(measure(strategy, model, tokenizer, corpus, args.steps))
        del model
    gflops_after = helpers.matmul_gflops("cpu", n=1024, seconds=2.0)
    gflops = (gflops_before + gflops_after) / 2
    print(f"fp32 matmul (1024 x 1024): {gflops:.1f} GFLOP/s (before {gflops_before:.1f}, after {gflops_after:.1f})")
    print(f"{'strategy':<22}{'trainable':>14}{'tokens/s':>10}{'model GFLOP/s':>15}{'of matmul':>11}")
    for r in rows:
        # 6 x N x T counts all weight gradients; frozen strategies skip some, so their FLOPs are an upper bound.
        achieved = 6 * r["total"] * r["tokens_per_second"] / 1e9 if r["strategy"] == "full_fine_tuning" else float("nan")
        ratio = f"{achieved / gflops:>10.0%}" if achieved == achieved else f"{'-':>10}"
        shown = f"{achieved:>15.1f}" if achieved == achieved else f"{'-':>15}"
        print(f"{r['strategy']:<22}{r['trainable']:>14,}{r['tokens_per_second']:>10.0f}{shown}{ratio}")
    full = [r for r in rows if r["strategy"] == "full_fine_tuning"]
    if full:
        achieved = 6 * full[0]["total"] * full[0]["tokens_per_second"] / 1e9
        print(f"full fine-tuning: 6 x {full[0]['total']:,} params x {full[0]['tokens_per_second']:.0f} tokens/s = "
              f"{achieved:.1f} GFLOP/s = {achieved / gflops:.0%} of fp32 matmul throughput")
    return 0


if __name__ == "__main__":
    sys.exit(main())
