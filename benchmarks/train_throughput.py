"""Training tokens/s of each strategy on the default model, against the matrix products of its own shapes.

Usage: python benchmarks/train_throughput.py [--steps 4] [--strategies full_fine_tuning,...]
Each strategy counts its fastest timed step (the first, which allocates, is not timed): other work only adds time.
The ceiling, for full fine-tuning only (a frozen weight needs no weight gradient), is helpers.training_matmuls at
the recipe's batch, timed just before and after the steps, the faster counting: no step can run faster than those
products alone, so "of ceiling" says how much of the machine the loop uses. Prefix TUTORIAL_MALLOC=system to measure
with glibc's default malloc instead of helpers.setup()'s (see helpers.keep_freed_memory) and compare s/step.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd  # noqa: E402
import torch  # noqa: E402

import helpers  # noqa: E402

STRATEGIES = ["full_fine_tuning", "freeze_embeddings", "freeze_lower_layers", "adapter_layers"]
TOKENS = helpers.RECIPE["batch_size"] * helpers.RECIPE["block_size"]


def ceiling_seconds(model) -> float:
    """Return the seconds one recipe step needs for the products of `model`'s linear layers alone."""
    return float(helpers.training_matmuls(model, tokens=TOKENS, repeats=3)["seconds per step"].sum())


def measure(strategy: str, corpus, steps: int) -> dict:
    """Return the fastest step's seconds and tokens/s under `strategy` and, for full fine-tuning, the ceiling's."""
    model, tokenizer = helpers.load_model()
    helpers.apply_strategy(model, strategy)
    config = helpers.recipe_config(strategy, steps=steps + 1, warmup_steps=0, eval_every=0, eval_at_start=False,
                                   progress=False)
    full = strategy == "full_fine_tuning"
    before = ceiling_seconds(model) if full else math.nan
    history = helpers.train(model, *helpers.recipe_data(tokenizer, corpus), config)
    ceiling = min(before, ceiling_seconds(model)) if full else math.nan
    step_seconds = history["seconds"].diff().iloc[1:].min()
    trainable, total = helpers.count_parameters(model)
    return {"strategy": strategy, "trainable": trainable, "total": total, "s/step": step_seconds,
            "tokens/s": TOKENS / step_seconds, "ceiling s/step": ceiling, "of ceiling": ceiling / step_seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="timed steps per strategy, after one untimed")
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated strategy names")
    args = parser.parse_args(argv)
    helpers.setup()
    corpus = helpers.load_corpus()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; recipe batch {helpers.RECIPE['batch_size']} "
          f"x {helpers.RECIPE['block_size']} tokens, fp32, {args.steps} timed steps per strategy; "
          f"freed CPU memory kept for reuse: {helpers.device_report()['freed CPU memory kept for reuse']}")
    table = pd.DataFrame([measure(strategy, corpus, args.steps) for strategy in args.strategies.split(",")])
    print(table.drop(columns="total").to_string(index=False, na_rep="", formatters={
        "trainable": "{:,}".format, "s/step": "{:.2f}".format, "tokens/s": "{:.0f}".format,
        "ceiling s/step": "{:.2f}".format, "of ceiling": "{:.0%}".format}))
    for r in table[table["strategy"] == "full_fine_tuning"].to_dict("records"):
        # 6 x N x T: forward 2NT, backward 4NT; the tied head's matmul is counted through the embedding.
        print(f"full fine-tuning: 6 x {r['total']:,} params x {r['tokens/s']:.0f} tokens/s = "
              f"{6 * r['total'] * r['tokens/s'] / 1e9:.1f} GFLOP/s; its linear layers' products alone "
              f"take {r['ceiling s/step']:.2f} s of its {r['s/step']:.2f} s step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
