"""Training tokens/s of each strategy on the default model, against this machine's fp32 matmul GFLOP/s.

Usage: python benchmarks/train_throughput.py [--steps 4] [--strategies full_fine_tuning,...]
Prefix TUTORIAL_MALLOC=system to measure with glibc's default malloc settings instead of the ones
`import helpers` sets (see helpers.keep_freed_memory).
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
    """Return tokens/s of the median recipe step under `strategy` (the first step, which allocates, is dropped)."""
    helpers.apply_strategy(model, strategy)
    train_data, val_data = helpers.recipe_data(tokenizer, corpus)
    config = helpers.recipe_config(steps=steps + 1, warmup_steps=0, eval_every=0, eval_at_start=False, progress=False)
    before = helpers.matmul_gflops("cpu", n=1024, seconds=2.0)
    history = helpers.train(model, train_data, val_data, config)
    after = helpers.matmul_gflops("cpu", n=1024, seconds=2.0)
    # Median step time: robust to a noisy neighbour stealing the CPU for one step.
    step_seconds = history["seconds"].diff().iloc[1:].median()
    tokens_per_step = helpers.RECIPE["batch_size"] * helpers.RECIPE["block_size"]
    trainable, total = helpers.count_parameters(model)
    return {"strategy": strategy, "trainable": trainable, "total": total, "step_seconds": step_seconds,
            "tokens_per_second": tokens_per_step / step_seconds, "gflops": (before + after) / 2}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps per strategy, after one untimed (default 4)")
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated strategy names")
    args = parser.parse_args(argv)
    helpers.quiet_transformers()
    torch.manual_seed(0)
    corpus = helpers.load_corpus()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; recipe batch {helpers.RECIPE['batch_size']} "
          f"x {helpers.RECIPE['block_size']} tokens, fp32, {args.steps} timed steps per strategy; "
          f"freed CPU memory kept for reuse: {helpers.CPU_MEMORY_KEPT}")
    rows = []
    for strategy in args.strategies.split(","):
        model, tokenizer = helpers.load_model()
        rows.append(measure(strategy, model, tokenizer, corpus, args.steps))
        del model
    print(f"{'strategy':<22}{'trainable':>14}{'s/step':>8}{'tokens/s':>10}{'matmul GFLOP/s':>16}{'model GFLOP/s':>15}{'ratio':>7}")
    for r in rows:
        line = f"{r['strategy']:<22}{r['trainable']:>14,}{r['step_seconds']:>8.2f}{r['tokens_per_second']:>10.0f}{r['gflops']:>16.1f}"
        if r["strategy"] == "full_fine_tuning":
            # 6 x N x T: forward 2NT, backward 4NT; the tied head's matmul is counted through the embedding.
            achieved = 6 * r["total"] * r["tokens_per_second"] / 1e9
            line += f"{achieved:>15.1f}{achieved / r['gflops']:>7.0%}"
        print(line)
    full = [r for r in rows if r["strategy"] == "full_fine_tuning"]
    if full:
        r = full[0]
        achieved = 6 * r["total"] * r["tokens_per_second"] / 1e9
        print(f"full fine-tuning: 6 x {r['total']:,} params x {r['tokens_per_second']:.0f} tokens/s = "
              f"{achieved:.1f} GFLOP/s = {achieved / r['gflops']:.0%} of the fp32 matmul throughput "
              f"({r['gflops']:.1f} GFLOP/s, measured just before and after)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
