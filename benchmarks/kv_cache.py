"""What the report's token-by-token "fix" costs in training, and what the KV cache buys in generation.

Usage: python benchmarks/kv_cache.py [MODEL] [--lengths 16,32,64,128,256] [--repeats 3] [--new-tokens 200]
                                     [--long-prompt 64] [--threads N] [--clock wall|cpu]
MODEL is anything helpers.load_model accepts (default: the tutorial's default model). For each length T
it times one forward + backward of a next-token loss, once with a single full-sequence forward and once
with the report's loop (fresh cache, one forward per token), and prints the ratio. Then it generates
--new-tokens tokens greedily with and without the cache, checks that the ids are identical, and prints
tokens/s of both: once after a short prompt and once after the first --long-prompt tokens of the test
split, because without a cache every step re-reads the whole context, so the speed-up depends on its length.
--threads N runs every timing on N torch intra-op threads (notebook 02 times on 1, which a machine that other
programs share cannot slow down by making threads wait for each other); by default torch's own setting.
--clock cpu (with --threads 1) counts CPU seconds instead of wall-clock seconds, for the training steps and the
generations alike, so time the machine spends on other programs is left out.
--new-tokens 0 skips the generation part.
Prefix TUTORIAL_MALLOC=system to measure with glibc's default malloc settings (notebook 00 explains them).
Targets on a 2-core CPU, default model, fp32: ratio >= 15 at T = 64 and >= 50 at T = 256; cached
generation >= 5x the tokens/s of uncached generation at 200 new tokens.
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import helpers  # noqa: E402
from helpers.kv_cache import CLOCKS  # noqa: E402

TARGETS = {64: 15.0, 256: 50.0}
GENERATION_TARGET = 5.0
PROMPT = "Ownership in Rust means that"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=None,
                        help="model name, local folder, .gguf file or Hub id (default: the tutorial's)")
    parser.add_argument("--lengths", default="16,32,64,128,256", help="comma-separated sequence lengths T")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs of the full-sequence pass per T; the fastest counts")
    parser.add_argument("--token-repeats", type=int, default=1,
                        help="timed runs of the token-by-token pass per T; the fastest counts")
    parser.add_argument("--new-tokens", type=int, default=200,
                        help="greedy tokens to generate with and without the cache (0: skip generation)")
    parser.add_argument("--long-prompt", type=int, default=64,
                        help="tokens of test text for the second generation prompt (0: skip it)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads for every timing (default: torch's setting)")
    parser.add_argument("--clock", choices=CLOCKS, default="wall",
                        help="what every timing counts (cpu needs --threads 1)")
    args = parser.parse_args(argv)
    lengths = [int(n) for n in args.lengths.split(",")]

    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1; got {args.threads}. Leave it out to use torch's setting.")
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu counts the CPU time of one thread; add --threads 1.")
    helpers.setup()
    model, tokenizer = helpers.load_model(args.model)
    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    threads = args.threads or torch.get_num_threads()
    print(f"{type(model).__name__} {args.model or helpers.default_model_name()}: {n_params / 1e6:.1f} M parameters, "
          f"{next(model.parameters()).dtype}, torch {torch.__version__}, {threads} of {os.cpu_count()} CPU threads, "
          f"freed memory kept for reuse: {helpers.device_report()['freed CPU memory kept for reuse']}")

    print(f"\nforward + backward of a next-token loss, batch 1, {args.clock}-clock seconds "
          f"(fastest of {args.repeats} full / {args.token_repeats} token-by-token runs)")
    table = helpers.timing_sweep(model, lengths, repeats=args.repeats, token_repeats=args.token_repeats,
                                 threads=args.threads, clock=args.clock, progress=False)
    print(f"{'T':>5}{'full (s)':>11}{'token by token (s)':>20}{'ratio':>8}{'target':>8}")
    failed = []
    for n, row in table.iterrows():
        target = TARGETS.get(n)
        print(f"{n:>5}{row['full (s)']:>11.3f}{row['token by token (s)']:>20.2f}{row['ratio']:>7.1f}x"
              f"{f'>= {target:.0f}x' if target else '':>8}")
        if target and row["ratio"] < target:
            failed.append(f"ratio at T = {n}: {row['ratio']:.1f}x < {target:.0f}x")

    prompts = {"short": tokenizer(PROMPT, return_tensors="pt")["input_ids"]} if args.new_tokens > 0 else {}
    if args.long_prompt > 0 and args.new_tokens > 0:
        prompts["long"] = helpers.tokenize(tokenizer, helpers.load_corpus().test)[None, :args.long_prompt]
    identical = True
    for label, prompt in prompts.items():
        print(f"\ngreedy generation of {args.new_tokens} new tokens after a {label} {prompt.shape[1]}-token prompt")
        gen = helpers.generation_speed(model, prompt, args.new_tokens, threads=args.threads, clock=args.clock)
        print(f"  with cache:    {gen['cached tokens/s']:7.1f} tokens per {args.clock}-clock second")
        print(f"  without cache: {gen['uncached tokens/s']:7.1f} tokens per {args.clock}-clock second")
        print(f"  speed-up: {gen['speed-up']:.1f}x (target >= {GENERATION_TARGET:.0f}x); "
              f"identical ids: {gen['identical']}")
        identical &= gen["identical"]
        if not gen["identical"]:
            failed.append(f"cached and uncached generations differ after the {label} prompt")
        if gen["speed-up"] < GENERATION_TARGET:
            failed.append(f"generation speed-up after the {label} prompt "
                          f"{gen['speed-up']:.1f}x < {GENERATION_TARGET:.0f}x")

    # Timings depend on the machine and its load, so a missed target is reported, not an error; different
    # generations are a correctness failure.
    print("\n" + ("below target: " + "; ".join(failed) if failed else "all targets met"))
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
