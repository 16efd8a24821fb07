"""Run by tests/test_finetune.py under `torchrun --nproc_per_node 2`: data-parallel training on tiny models, checked
against one process with the same global batch. Rank 0 writes what it saw as JSON to the path in argv[1]."""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # conftest's tiny models and tokenizer

from accelerate.utils import gather_object  # noqa: E402

from conftest import char_tokenizer, tiny_model  # noqa: E402
from helpers import apply_strategy, make_dataloader, train  # noqa: E402
from helpers.engine import make_accelerator  # noqa: E402
from helpers.finetune import weights_digest  # noqa: E402
from helpers.training import TrainConfig  # noqa: E402

TEXT = ("fn main() { let owner = String::from(\"value\"); let borrowed = &owner; println!(\"{borrowed}\"); }\n"
        "Ownership moves the value; borrowing lends it without moving. ") * 6
# One strategy per family: everything trains, the lower blocks frozen, and LoRA adapters on a peft-wrapped model.
CASES = [
    ("gpt2", "full_fine_tuning", {}),
    ("qwen2", "freeze_lower_layers", {"n_frozen": 1}),
    ("llama", "lora", {"r": 4, "dropout": 0.0}),
]


def no_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Return `model` with every dropout off: random masks would differ between one process and two."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def loaders(tokenizer, batch_size: int = 4):
    """Return (train, validation) loaders of 32-token blocks of TEXT: the same global batches wherever built."""
    train_data = make_dataloader(tokenizer, TEXT[:600], block_size=32, batch_size=batch_size, shuffle=True, seed=0)
    val_data = make_dataloader(tokenizer, TEXT[600:], block_size=32, batch_size=2, shuffle=False)
    return train_data, val_data


def main(out: str) -> None:
    torch.set_num_threads(1)
    accelerator = make_accelerator()
    tokenizer = char_tokenizer(bos=False)
    config = TrainConfig(steps=6, lr=3e-3, warmup_steps=1, eval_every=3, grad_accum=2, progress=False)
    report = {"world_size": accelerator.num_processes, "distributed_type": str(accelerator.distributed_type),
              "cases": {}}
    for family, strategy, options in CASES:
        model = apply_strategy(no_dropout(tiny_model(family)), strategy, **options)
        single = copy.deepcopy(model)
        history = train(model, *loaders(tokenizer), config, accelerator=accelerator)
        digests = gather_object([weights_digest(model)])
        if accelerator.is_main_process:
            reference = train(single, *loaders(tokenizer), config)  # one process, the same global batches
            pairs = [(a, b) for column in ("train_loss", "val_loss")
                     for a, b in zip(history[column], reference[column]) if a == a or b == b]
            diffs = [abs(a - b) for a, b in pairs]
            weight_diff = max((p - q).abs().max().item() for p, q in zip(model.parameters(), single.parameters()))
            report["cases"][family] = {"strategy": strategy, "digests": digests, "loss_pairs": len(pairs),
                                       "max_loss_diff": max(diffs), "max_weight_diff": weight_diff,
                                       "tokens": history.attrs["tokens"], "reference_tokens": reference.attrs["tokens"]}
        accelerator.wait_for_everyone()
    try:  # a strategy that changes what trains mid-run cannot be data parallel: refused before any step
        train(apply_strategy(tiny_model("llama"), "gradual_unfreezing"), *loaders(tokenizer), config,
                          accelerator=accelerator)
        report["gradual_refused"] = None
    except ValueError as error:
        report["gradual_refused"] = str(error)
    if accelerator.is_main_process:
        Path(out).write_text(json.dumps(report, indent=1))
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1])
