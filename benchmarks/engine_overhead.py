"""What the Accelerate engine costs one process: helpers.train alone against helpers.train on Accelerate.

Usage: python benchmarks/engine_overhead.py [--steps 4] [--rounds 3] [--strategy full_fine_tuning]
Both loops train the default model at the recipe's batch (4 x 128 tokens, fp32) in this one process, in alternating
rounds on fresh copies of the same weights, so that whatever else the machine does falls on both. Each round times
`--steps` optimizer steps after one untimed step (which allocates); the fastest step of all rounds counts, because
other work only ever adds time. The ratio accelerated / plain is the engine's throughput relative to helpers.train
(issue 13's target: at least 0.95).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import helpers  # noqa: E402
from helpers.engine import make_accelerator  # noqa: E402


def fastest_step(history) -> float:
    """Return the fastest timed step's seconds (the first step, which allocates, is not timed)."""
    return float(history["seconds"].diff().iloc[2:].min())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="timed steps per round, after one untimed (default 4)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of each loop (default 3)")
    parser.add_argument("--strategy", default="full_fine_tuning", help="strategy to train (default full_fine_tuning)")
    args = parser.parse_args(argv)
    helpers.setup()
    base, tokenizer = helpers.load_model()
    corpus = helpers.load_corpus()
    accelerator = make_accelerator()
    config = helpers.recipe_config(args.strategy, steps=args.steps + 1, warmup_steps=0, eval_every=0,
                                   eval_at_start=False, progress=False)
    best = {"plain": float("inf"), "accelerated": float("inf")}
    for round_ in range(args.rounds):
        for name in best:
            model = helpers.apply_strategy(copy.deepcopy(base), args.strategy)
            train_data, val_data = helpers.recipe_data(tokenizer, corpus)
            if name == "plain":
                history = helpers.train(model, train_data, val_data, config)
            else:
                history = helpers.train(model, train_data, val_data, config, accelerator=accelerator)
            best[name] = min(best[name], fastest_step(history))
            print(f"round {round_ + 1}: {name:<12} fastest step {fastest_step(history):.3f} s", flush=True)
            del model
    tokens = helpers.RECIPE["batch_size"] * helpers.RECIPE["block_size"]
    print(f"\n{args.strategy}, fp32, {tokens} tokens per step, {accelerator.device}, one process")
    for name, seconds in best.items():
        print(f"{name:<12} {seconds:.3f} s/step  {tokens / seconds:.0f} tokens/s")
    print(f"throughput accelerated / plain: {best['plain'] / best['accelerated']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
