"""What the report's token-by-token "fix" costs in training, and what the KV cache buys in generation.

Usage: python benchmarks/kv_cache.py [MODEL] [--lengths 16,32,64,128,256] [--repeats 3] [--token-repeats 1]
                                     [--new-tokens 200] [--long-prompt 64] [--threads N] [--clock wall|cpu]
                                     [--busy-loop] [--save NAME]
MODEL: anything helpers.load_model accepts. Per length T it times forward + backward of a next-token loss with one
full-sequence forward and with the report's loop (one forward per token). Then it generates greedily with and without
the cache after a short prompt and after --long-prompt tokens of test text (uncached, every step re-reads the whole
context), and checks that the ids agree. --threads and --clock are helpers.timing_sweep's (notebook 02: one thread,
CPU seconds). Prefix TUTORIAL_MALLOC=system to measure with glibc's default malloc (notebook 00). --busy-loop times
beside a process spinning on one core, as a browser would. --save NAME writes the figures to
results/benchmarks/NAME.json with the command and the machine (notebook 02 reads them).
Targets on a 2-core CPU, default model, fp32: ratio >= 15 at T = 64 and >= 50 at T = 256; cached generation >= 5x
the tokens/s of uncached generation at 200 new tokens.
"""
from __future__ import annotations

import argparse
import atexit
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import helpers  # noqa: E402
from helpers.kv_cache import CLOCKS  # noqa: E402
from record import save_record  # noqa: E402

TARGETS = {64: 15.0, 256: 50.0}
GENERATION_TARGET = 5.0
PROMPT = "Ownership in Rust means that"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=None, help="model name, folder, .gguf file or Hub id")
    parser.add_argument("--lengths", default="16,32,64,128,256", help="comma-separated sequence lengths T")
    parser.add_argument("--repeats", type=int, default=3, help="timed full-sequence passes per T (fastest counts)")
    parser.add_argument("--token-repeats", type=int, default=1, help="timed token-by-token passes per T")
    parser.add_argument("--new-tokens", type=int, default=200, help="greedy tokens to generate (0: no generation)")
    parser.add_argument("--long-prompt", type=int, default=64, help="tokens of test text as second prompt (0: none)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--clock", choices=CLOCKS, default="wall", help="what timings count (cpu: --threads 1)")
    parser.add_argument("--busy-loop", action="store_true", help="time beside a process spinning on one core")
    parser.add_argument("--save", metavar="NAME", help="also write results/benchmarks/NAME.json")
    args = parser.parse_args(argv)
    helpers.setup()
    if args.busy_loop:  # a Python loop holds one core, as another program would, until this script ends
        atexit.register(subprocess.Popen([sys.executable, "-c", "while True: pass"]).kill)
    model, tokenizer = helpers.load_model(args.model)
    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    print(f"{type(model).__name__} {args.model or helpers.default_model_name()}: {n_params / 1e6:.1f} M parameters, "
          f"{next(model.parameters()).dtype}, torch {torch.__version__}, {args.threads or torch.get_num_threads()} of "
          f"{os.cpu_count()} CPU threads, freed memory kept for reuse: "
          f"{helpers.device_report()['freed CPU memory kept for reuse']}")

    print(f"\nforward + backward of a next-token loss, batch 1, {args.clock}-clock seconds "
          f"(fastest of {args.repeats} full / {args.token_repeats} token-by-token runs)")
    table = helpers.timing_sweep(model, [int(n) for n in args.lengths.split(",")], repeats=args.repeats,
                                 token_repeats=args.token_repeats, threads=args.threads, clock=args.clock,
                                 progress=False)
    table["target"] = [f">= {TARGETS[n]:.0f}x" if n in TARGETS else "" for n in table.index]
    print(table.round({"full (s)": 3, "token by token (s)": 2, "ratio": 1}).to_string())
    failed = [f"ratio at T = {n}: {table.loc[n, 'ratio']:.1f}x < {target:.0f}x" for n, target in TARGETS.items()
              if n in table.index and table.loc[n, "ratio"] < target]

    prompts = {"short": tokenizer(PROMPT, return_tensors="pt")["input_ids"]} if args.new_tokens > 0 else {}
    if prompts and args.long_prompt > 0:
        prompts["long"] = helpers.tokenize(tokenizer, helpers.load_corpus().test)[None, :args.long_prompt]
    identical, generations = True, {}
    for label, prompt in prompts.items():
        gen = helpers.generation_speed(model, prompt, args.new_tokens, threads=args.threads, clock=args.clock)
        generations[label] = {"prompt tokens": prompt.shape[1], "new tokens": args.new_tokens,
                              **{k: gen[k] for k in ("cached tokens/s", "uncached tokens/s", "speed-up", "identical")}}
        print(f"\ngreedy generation of {args.new_tokens} new tokens after a {label} {prompt.shape[1]}-token prompt, "
              f"tokens per {args.clock}-clock second:\n  with cache {gen['cached tokens/s']:.1f}, without "
              f"{gen['uncached tokens/s']:.1f}: speed-up {gen['speed-up']:.1f}x (target >= {GENERATION_TARGET:.0f}x); "
              f"identical ids: {gen['identical']}")
        identical &= gen["identical"]
        if not gen["identical"]:
            failed.append(f"cached and uncached generations differ after the {label} prompt")
        if gen["speed-up"] < GENERATION_TARGET:
            failed.append(f"generation speed-up after the {label} prompt {gen['speed-up']:.1f}x "
                          f"< {GENERATION_TARGET:.0f}x")
    # Timings depend on the machine and its load, so a missed target is reported, not an error; different
    # generations are a correctness failure.
    print("\n" + ("below target: " + "; ".join(failed) if failed else "all targets met"))
    if args.save:
        save_record(args.save, {"model": args.model or helpers.default_model_name(), "clock": args.clock,
                                "threads": args.threads or torch.get_num_threads(), "repeats": args.repeats,
                                "token repeats": args.token_repeats, "timing": table.drop(columns="target")
                                .reset_index().to_dict(orient="records"), "generation": generations})
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
