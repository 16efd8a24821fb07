"""The shared recipe of notebooks 03-08, its learning rates and the prompt: plain data, so --help can read it fast."""
from __future__ import annotations

RECIPE: dict = {
    "block_size": 128,        # tokens per training block
    "batch_size": 4,          # blocks per optimizer step
    "steps": 50,              # optimizer steps: 50 x 4 x 128 = 25,600 training tokens for every strategy
    # No "lr": each strategy trains at its own rate, LEARNING_RATES below.
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

RATE_GRID: tuple[float, ...] = (1e-4, 5e-4, 2.5e-3)
"""The rates the short check for another model tries (`helpers.choose_learning_rate`, notebooks 03-08): a factor of
5 apart, around the rates the sweep chose for the default model (2.2e-4 to 2.5e-3). The sweep itself tries a grid of
its own per strategy, `helpers.sweep.SWEEP_RATES` (notebook 09)."""

LEARNING_RATES: dict[str, float] = {
    "full_fine_tuning": 2.2e-4,
    "freeze_embeddings": 2.2e-4,
    "freeze_lower_layers": 5e-4,
    "adapter_layers": 2.5e-3,
    "lora": 2.5e-3,
    "gradual_unfreezing": 5e-4,
}
"""The rate each strategy trains the default model with under RECIPE: the one the committed sweep chose for it on the
whole train split (size "all", `results/sweep`, notebook 09), the lowest validation loss of its selection seed's runs
over the strategy's grid and any step beyond an edge; tests/test_compare.py checks them against it.
Another model gets its own (`helpers.choose_learning_rate`): these were never measured for it."""

ORDER: tuple[str, ...] = tuple(LEARNING_RATES)
"""Every strategy of the tutorial, in the order the notebooks introduce them."""

REPORT_STRATEGIES: tuple[str, ...] = ORDER[:4]
"""The report's four strategies (full fine-tuning and the three freezing ones), in the same order."""
