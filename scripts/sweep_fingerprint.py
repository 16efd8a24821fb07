"""Run the sweep (grid and report) on tiny GPT-2, Qwen2 and BOS Llama models; print a sha256 per file, timing left out.

Usage: PYTHONPATH=<checkout>/src:tests python scripts/sweep_fingerprint.py OUT (a new folder). Run it on two commits
(`git worktree add`) and diff the outputs: equal lines mean the two codes compute the same numbers for the protocol
the committed results/sweep was made with (a selection seed apart from the scored ones, per-strategy rate grids with
steps beyond an edge, a depth variant, the general-English score), on models small enough to run it in minutes.
"""
import hashlib
import json
import sys
from pathlib import Path

import torch
from conftest import char_tokenizer, tiny_model

from helpers.data import Corpus
from helpers.recipe import ORDER
from helpers.sweep import Sweep, SweepSpec

RUST = ("fn main() { let owner = String::from(\"value\"); let borrowed = &owner; println!(\"{borrowed}\"); }\n"
        "Ownership moves the value; borrowing lends it without moving. ")
CORPUS = Corpus(train=[RUST * 4, RUST * 3], validation=[RUST * 2], test=[RUST])
TIMING = {"seconds", "train_seconds", "tokens_per_second", "peak_memory_mb"}
GENERAL = ["The tide comes in twice a day, and the boats rest on the sand between. " * 3]


def strip(value):
    """Return `value` without its timing fields, which differ from run to run."""
    if isinstance(value, dict):
        return {k: strip(v) for k, v in value.items() if k not in TIMING}
    return [strip(v) for v in value] if isinstance(value, list) else value


def main(out: Path) -> None:
    torch.set_num_threads(1)
    spec = SweepSpec(sizes={"8": 8, "64": 64}, strategies=tuple(ORDER), seeds=2, block_size=32, val_blocks=2,
                     max_tokens=512, report_draws=2, eval_block_size=64, eval_every=4,
                     depths={"freeze_lower_layers": (1,)}, depth_sizes=("64",))
    for family in ("qwen2", "gpt2", "llama"):
        tokenizer = char_tokenizer(bos=family == "llama")
        sweep = Sweep(out / family, spec, model_and_tokenizer=(tiny_model(family), tokenizer), corpus_data=CORPUS,
                      general_data=GENERAL, progress=False)
        sweep.run_grid()
        sweep.run_report()
    files = [p for p in sorted(out.rglob("*.json")) if p.name not in ("sweep.json", "baseline.json")]
    for path in files:
        data = json.dumps(strip(json.loads(path.read_text())), sort_keys=True).encode()
        print(f"{hashlib.sha256(data).hexdigest()[:16]} {path.relative_to(out)}")
    print(len(files), "files")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
