"""Peak memory of full fine-tuning steps of the default model on this CPU, per length and attention (notebook 10).

Usage: python benchmarks/memory_peaks.py [--lengths 128,512,1024] [--attention eager,sdpa] [--steps 2]
    [--max-gib 12] [--out results/benchmarks/memory_peaks.json]
Each configuration (batch 4 x length tokens, the batch halved where the peak would pass --max-gib; attention "eager"
or "sdpa"; with and without gradient checkpointing) runs in a fresh process, one after the other, so that each peak
is its own. A process loads the corpus, reads its resident set, loads the model, resets the kernel's record of its
peak resident set (Linux: /proc/self/clear_refs) and trains `--steps` optimizer steps with helpers.train; "peak
growth" is that peak (VmHWM, exact, where polling could miss a short-lived one) minus the resident set before the
model was loaded: weights, gradients, AdamW states, activations and whatever the allocator keeps, what
helpers.training_memory estimates. Memory, not time, is measured, so a shared machine's load does not change it.
Linux only.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BATCH = 4


def resident_mib(field: str = "VmRSS") -> float:
    """Return this process's resident set now (VmRSS) or its peak since the last reset (VmHWM), in MiB."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def measure(attention: str, seq: int, checkpointing: bool, steps: int, batch: int = BATCH) -> dict:
    """Return one configuration's peak growth (MiB), measured in this process."""
    import helpers

    helpers.setup()
    corpus = helpers.load_corpus()
    before = resident_mib()
    model, tokenizer = helpers.load_model()
    model.set_attn_implementation(attention)
    helpers.apply_strategy(model, "full_fine_tuning")
    train_data = helpers.make_dataloader(tokenizer, corpus.train, block_size=seq, batch_size=batch, shuffle=True,
                                         seed=0)
    val_data = helpers.make_dataloader(tokenizer, corpus.validation, block_size=seq, batch_size=batch)
    config = helpers.recipe_config("full_fine_tuning", steps=steps, warmup_steps=0, eval_every=0, eval_batches=1,
                                   eval_at_start=False, progress=False, gradient_checkpointing=checkpointing)
    Path("/proc/self/clear_refs").write_text("5")  # from here VmHWM is the peak of training alone
    helpers.train(model, train_data, val_data, config)
    return {"attention": model.config._attn_implementation, "batch": batch, "seq": seq,
            "checkpointing": checkpointing, "steps": steps, "resident before model (MiB)": round(before, 1),
            "peak growth (MiB)": round(resident_mib("VmHWM") - before, 1)}


def machine() -> dict:
    """Return the CPU model, cores, RAM and library versions of this machine."""
    import torch
    import transformers

    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), platform.machine())
    ram = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
               if line.startswith("MemTotal"))
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(ram / 2**20, 1),
            "cuda available": torch.cuda.is_available(), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="128,512,1024", help="comma-separated tokens per sequence")
    parser.add_argument("--attention", default="eager,sdpa", help="comma-separated attn_implementation names")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per configuration")
    parser.add_argument("--max-gib", type=float, default=12.0,
                        help="halve the batch of a configuration whose peak would pass this, by 1.25 x the calculator")
    parser.add_argument("--out", default="results/benchmarks/memory_peaks.json", help="the JSON file written")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # attention:seq:checkpointing:batch, in a child process
    args = parser.parse_args(argv)
    if args.one:
        attention, seq, checkpointing, batch = args.one.split(":")
        print(json.dumps(measure(attention, int(seq), checkpointing == "1", args.steps, int(batch))))
        return 0
    import helpers

    config, out = helpers.load_config(), Path(args.out)
    n_params = sum(p.numel() for p in helpers.meta_model(config).parameters())
    command = "python benchmarks/memory_peaks.py " + " ".join(argv if argv is not None else sys.argv[1:])
    # A configuration already in the file (same attention, length, checkpointing) is kept: a run can be resumed.
    runs = json.loads(out.read_text())["runs"] if out.exists() else []
    for seq in map(int, args.lengths.split(",")):
        for attention in args.attention.split(","):
            for checkpointing in (False, True):
                if any((r["attention"], r["seq"], r["checkpointing"]) == (attention, seq, checkpointing) for r in runs):
                    continue
                batch = BATCH
                while batch > 1 and 1.25 * helpers.training_memory(
                        n_params, config, batch=batch, seq=seq, checkpointing=checkpointing,
                        attention=attention)["total"] > args.max_gib:
                    batch //= 2
                child = [sys.executable, __file__, "--steps", str(args.steps), "--one",
                         f"{attention}:{seq}:{int(checkpointing)}:{batch}"]
                done = subprocess.run(child, capture_output=True, text=True, check=True)
                runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(runs[-1], flush=True)
                result = {"command": command.strip(), "machine": machine(),
                          "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                          "model": helpers.default_model_name(), "runs": runs}
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
