"""Training tokens/s of each strategy on the default model, against the matrix products of its own shapes.

Usage: python benchmarks/train_throughput.py [--steps 4] [--strategies full_fine_tuning,...]
Prefix TUTORIAL_MALLOC=system to measure with glibc's default malloc settings instead of the ones
`helpers.setup()` sets (see helpers.keep_freed_memory); the two runs' seconds per step compare them.
The ceiling is `helpers.training_matmuls`: the fastest time of the three products a training step does with each
of the model's linear layers, at the recipe's batch of tokens. It is timed for full fine-tuning only (a frozen
weight needs no weight gradient), just before and after the steps, and the faster of the two counts. No step can
run faster than those products alone, so "of ceiling" says how much of the machine the training loop uses.
Step times are the fastest of the timed steps (the first step, which allocates, is not timed): other work on the
machine only ever adds time.
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import helpers  # noqa: E402

STRATEGIES = ["full_fine_tuning", "freeze_embeddings", "freeze_lower_layers", "adapter_layers"]


def ceiling_seconds(model) -> float:
    """Return the seconds one recipe step needs for the products of `model`'s linear layers alone."""
    tokens = helpers.RECIPE["batch_size"] * helpers.RECIPE["block_size"]
    return float(helpers.training_matmuls(model, tokens=tokens, repeats=3)["seconds per step"].sum())


def measure(strategy: str, model, tokenizer, corpus, steps: int) -> dict:
    """Return the fastest step's seconds and tokens/s under `strategy`, and the matmul ceiling's."""
    helpers.apply_strategy(model, strategy)
    train_data, val_data = helpers.recipe_data(tokenizer, corpus)
    config = helpers.recipe_config(strategy, steps=steps + 1, warmup_steps=0, eval_every=0, eval_at_start=False,
                                   progress=False)
    # Only full fine-tuning does all three products with every weight: a frozen weight needs no weight gradient.
    full = strategy == "full_fine_tuning"
    before = ceiling_seconds(model) if full else float("nan")
    history = helpers.train(model, train_data, val_data, config)
    after = ceiling_seconds(model) if full else float("nan")
    step_seconds = history["seconds"].diff().iloc[1:].min()
    tokens_per_step = helpers.RECIPE["batch_size"] * helpers.RECIPE["block_size"]
    trainable, total = helpers.count_parameters(model)
    return {"strategy": strategy, "trainable": trainable, "total": total, "step_seconds": step_seconds,
            "tokens_per_second": tokens_per_step / step_seconds,
            "ceiling_seconds": min(before, after) if full else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4,
                        help="timed optimizer steps per strategy, after one untimed (default 4)")
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated strategy names")
    args = parser.parse_args(argv)
    helpers.setup()
    corpus = helpers.load_corpus()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; recipe batch {helpers.RECIPE['batch_size']} "
          f"x {helpers.RECIPE['block_size']} tokens, fp32, {args.steps} timed steps per strategy; "
          f"freed CPU memory kept for reuse: {helpers.device_report()['freed CPU memory kept for reuse']}")
    rows = []
    for strategy in args.strategies.split(","):
        model, tokenizer = helpers.load_model()
        rows.append(measure(strategy, model, tokenizer, corpus, args.steps))
        del model
    print(f"{'strategy':<22}{'trainable':>14}{'s/step':>8}{'tokens/s':>10}{'ceiling s/step':>16}{'of ceiling':>12}")
    for r in rows:
        line = f"{r['strategy']:<22}{r['trainable']:>14,}{r['step_seconds']:>8.2f}{r['tokens_per_second']:>10.0f}"
        if r["ceiling_seconds"] is not None:
            line += f"{r['ceiling_seconds']:>16.2f}{r['ceiling_seconds'] / r['step_seconds']:>12.0%}"
        print(line)
    full = [r for r in rows if r["strategy"] == "full_fine_tuning"]
    if full:
        r = full[0]
        # 6 x N x T: forward 2NT, backward 4NT; the tied head's matmul is counted through the embedding.
        achieved = 6 * r["total"] * r["tokens_per_second"] / 1e9
        print(f"full fine-tuning: 6 x {r['total']:,} params x {r['tokens_per_second']:.0f} tokens/s = "
              f"{achieved:.1f} GFLOP/s; its linear layers' products alone take {r['ceiling_seconds']:.2f} s "
              f"of its {r['step_seconds']:.2f} s step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
