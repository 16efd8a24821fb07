"""The shared recipe of notebooks 03-08 and the prompt they complete: plain data, so a command's --help can read it fast."""
from __future__ import annotations

RECIPE: dict = {
    "block_size": 128,        # tokens per training block
    "batch_size": 4,          # blocks per optimizer step
    "steps": 50,              # optimizer steps: 50 x 4 x 128 = 25,600 training tokens for every strategy
    # No "lr": each strategy trains at the rate the sweep chose for it on validation (helpers.compare.learning_rate).
    "warmup_steps": 3,
    "min_lr_ratio": 0.1,
    "grad_clip": 1.0,
    "weight_decay": 0.0,
    "eval_every": 10,         # validation on a few fixed blocks during training ...
    "eval_batches": 2,        # ... (2 x 4 x 128 tokens); full validation and test perplexity once at the end
    "eval_block_size": 256,   # window of the final perplexity
    "seed": 0,
    "max_new_tokens": 40,
    # How text becomes tokens (helpers.data.special_prefix); results made under an older rule are stale.
    "text_rule": "v2: documents joined by a blank line, the tokenizer's BOS as unscored context, no chat tokens",
}
"""The one training recipe shared by every strategy, so their results compare at an equal token budget."""

PROMPT = "In Rust, a borrowed reference"
"""The prompt every notebook completes before and after training."""
