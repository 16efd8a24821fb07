"""What the Accelerate engine costs one process: helpers.train alone against helpers.train on Accelerate.

Usage: python benchmarks/engine_overhead.py [--steps 4] [--rounds 3] [--strategy full_fine_tuning]
Both loops train fresh copies of the default model at the recipe's batch (4 x 128 tokens, fp32) in alternating
rounds, so whatever else the machine does falls on both; the fastest timed step of all rounds counts, because other
work only adds time. The ratio accelerated / plain is the engine's relative throughput (issue 13's target: >= 0.95).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import helpers  # noqa: E402
from helpers.engine import make_accelerator  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="timed steps per round, after one untimed (default 4)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of each loop (default 3)")
    parser.add_argument("--strategy", default="full_fine_tuning", help="strategy to train (default full_fine_tuning)")
    args = parser.parse_args(argv)
    helpers.setup()
    base, tokenizer = helpers.load_model()
    corpus = helpers.load_corpus()
    engines = {"plain": None, "accelerated": make_accelerator()}
    config = helpers.recipe_config(args.strategy, steps=args.steps + 1, warmup_steps=0, eval_every=0,
                                   eval_at_start=False, progress=False)
    best = dict.fromkeys(engines, float("inf"))
    for round_ in range(args.rounds):
        for name, accelerator in engines.items():
            model = helpers.apply_strategy(copy.deepcopy(base), args.strategy)
            history = helpers.train(model, *helpers.recipe_data(tokenizer, corpus), config, accelerator=accelerator)
            fastest = float(history["seconds"].diff().iloc[2:].min())  # the first step, which allocates, is untimed
            best[name] = min(best[name], fastest)
            print(f"round {round_ + 1}: {name:<12} fastest step {fastest:.3f} s", flush=True)
            del model
    tokens = helpers.RECIPE["batch_size"] * helpers.RECIPE["block_size"]
    print(f"\n{args.strategy}, fp32, {tokens} tokens per step, {engines['accelerated'].device}, one process")
    for name, seconds in best.items():
        print(f"{name:<12} {seconds:.3f} s/step  {tokens / seconds:.0f} tokens/s")
    print(f"throughput accelerated / plain: {best['plain'] / best['accelerated']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
