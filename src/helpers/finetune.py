"""`python -m helpers.finetune`: one strategy trained by `helpers.train` on Accelerate, run by notebook 10.

The same command runs in one process, under `torchrun --nproc_per_node N` and `accelerate launch`; see --help.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from .compat import require
from .engine import is_fsdp, make_accelerator
from .training import TrainConfig, train_strategy, trained_state


def _digest(state: dict[str, torch.Tensor]) -> str:
    """Return a sha256 of the tensors' names and bytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        digest.update(name.encode())
        digest.update(tensor.float().numpy().tobytes())
    return digest.hexdigest()


def weights_digest(model: nn.Module) -> str:
    """Return a sha256 of the trainable tensors' bytes, equal for bit-identical weights (notebook 10)."""
    return _digest(trained_state(model))


def _plain_name(name: str) -> str:
    """Return a parameter name without the prefixes FSDP and activation checkpointing insert."""
    for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(wrapper, "")
    return name


def command_line(out: str | Path, *, processes: int = 1, **options) -> list[str]:
    """Return the command that runs `python -m helpers.finetune` with `options` in `processes` processes (notebook 10).

    More than one process goes through torchrun (`--standalone`: one node). A True option is a bare flag
    (bf16=True -> --bf16); None and False options are left out.
    """
    if processes < 1:
        raise ValueError(f"processes must be at least 1; got {processes}.")
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    args = ["-m", "helpers.finetune", "--out", str(out)]
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value not in (None, False):
            args += [flag, str(value)]
    return launcher + args


def run_command(out: str | Path, *, processes: int = 1, threads: int | None = None, **options) -> dict:
    """Return the result.json of `command_line(out, ...)` run in a subprocess, its output as "stdout" (notebook 10).

    Each process gets `threads` torch threads (default: the cores shared out); a failed run raises RuntimeError.
    """
    import subprocess

    threads = threads or max(1, (os.cpu_count() or 1) // processes)
    command = command_line(out, processes=processes, **options)
    done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed with exit status {done.returncode}:\n{done.stderr[-3000:]}")
    result = json.loads((Path(out) / "result.json").read_text())
    result["stdout"] = done.stdout
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m helpers.finetune",
        description="Fine-tune a causal LM under one strategy, in one process or many: the same command runs under "
                    "`torchrun --nproc_per_node N` and `accelerate launch`. Rank 0 alone writes DIR/result.json and "
                    "DIR/trained.safetensors (the trainable tensors).",
        epilog="Two CPU processes (gloo): torchrun --nproc_per_node 2 -m helpers.finetune --steps 4 --out runs/ddp",
    )
    parser.add_argument("--strategy", default="full_fine_tuning",
                        help="a registered strategy, e.g. freeze_lower_layers or lora (default: %(default)s)")
    parser.add_argument("--model", default=None,
                        help="a local folder, a .gguf file or a Hub id (default: the tutorial's model, offline)")
    parser.add_argument("--corpus", default=None, help="a folder of .txt/.md documents (default: the Rust corpus)")
    parser.add_argument("--lr", type=float, default=None,
                        help="learning rate (default: the recipe's rate for the strategy)")
    for flag, default, text in (
            ("--steps", 10, "optimizer steps"),
            ("--batch-size", 4, "blocks per global batch, split over the processes"),
            ("--block-size", 128, "tokens per block"),
            ("--grad-accum", 1, "global batches per optimizer step"),
            ("--eval-every", 5, "validate every N steps, 0 = only at the end"),
            ("--eval-batches", 2, "validation batches per check"),
            ("--seed", 0, "data order and initialisation seed")):
        parser.add_argument(flag, type=int, default=default, help=f"{text} (default: %(default)s)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA only; the CPU stays fp32)")
    parser.add_argument("--checkpointing", action="store_true",
                        help="gradient checkpointing: less memory, more compute")
    parser.add_argument("--fsdp", action="store_true",
                        help="shard weights, gradients and optimizer states over the processes (FSDP; needs GPUs)")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even where a GPU is present (gloo)")
    parser.add_argument("--out", required=True, help="folder for result.json and trained.safetensors")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _trained_tensors(model: nn.Module, accelerator) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Return (the trainable tensors, their sha256 per rank; under FSDP rank 0's digest of the gathered tensors)."""
    from accelerate.utils import gather_object

    if not is_fsdp(accelerator):
        state = trained_state(model)
        return state, gather_object([_digest(state)])  # one per rank, in rank order
    # Each rank holds a different shard: gather the full tensors on rank 0 and keep the trainable ones.
    trainable = {_plain_name(n) for n, p in model.named_parameters() if p.requires_grad}
    require("accelerate", "~=1.15", "helpers.finetune (it reads Accelerator._models under FSDP)")
    full = accelerator.get_state_dict(accelerator._models[-1])  # the FSDP-wrapped model that train() prepared
    state = {n: t.detach().cpu().contiguous() for n, t in full.items() if _plain_name(n) in trainable}
    return state, [_digest(state)] if accelerator.is_main_process else []


def _write_result(args: argparse.Namespace, model: nn.Module, config: TrainConfig, history, state: dict,
                  digests: list[str]) -> None:
    """Write DIR/result.json and DIR/trained.safetensors, and print what the run did."""
    from safetensors.torch import save_file

    from .experiment import history_records
    from .strategies import count_parameters

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "trained.safetensors"))
    trainable, total = count_parameters(model)
    attrs = history.attrs
    identical = None if attrs["distributed_type"].endswith("FSDP") else len(set(digests)) == 1
    result = {
        "strategy": args.strategy, "model": args.model, "corpus": args.corpus, "world_size": attrs["world_size"],
        "distributed_type": attrs["distributed_type"], "precision": attrs["precision"],
        "trainable_params": trainable, "total_params": total, "config": asdict(config),
        "tokens": attrs["tokens"], "train_seconds": attrs["train_seconds"],
        "tokens_per_second": attrs["tokens_per_second"], "peak_memory_mb": attrs["peak_memory_mb"],
        "memory_at_start_mb": attrs["memory_at_start_mb"], "gradient_checkpointing": config.gradient_checkpointing,
        "batch_size": args.batch_size, "block_size": args.block_size,
        "rank_digests": digests, "identical_on_all_ranks": identical,
        "history": history_records(history),
    }
    (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    last = history.dropna(subset=["val_loss"]).iloc[-1]
    print(f"{args.strategy}: {attrs['world_size']} process(es), {attrs['distributed_type']}, {attrs['precision']}; "
          f"{config.steps} steps, {attrs['tokens']:,} tokens in {attrs['train_seconds']:.1f} s "
          f"({attrs['tokens_per_second']:.0f} tokens/s), peak memory {attrs['peak_memory_mb']:,.0f} MiB per process")
    print(f"validation loss {last['val_loss']:.4f} (perplexity {last['val_ppl']:.2f}) at step {int(last['step'])}")
    if identical is None:
        print(f"weights sharded over {attrs['world_size']} ranks (FSDP), gathered on rank 0: sha256 {digests[0][:16]}")
    else:
        print(f"trained weights identical on all {len(digests)} ranks: {identical} (sha256 {digests[0][:16]})")
    print(f"wrote {out / 'result.json'} and {out / 'trained.safetensors'}")


def _prepare_training(args: argparse.Namespace) -> tuple:
    """Return (accelerator, model, config, train_data, val_data) for the command's `args`.

    Bad input raises ValueError, OSError or RuntimeError, with one message naming the problem.
    """
    for name in ("steps", "batch_size", "block_size", "grad_accum"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1; got {getattr(args, name)}.")
    accelerator = make_accelerator(mixed_precision=args.bf16, fsdp=args.fsdp, cpu=True if args.cpu else None)
    from .data import load_corpus, make_dataloader
    from .models import DEFAULT_MODEL, default_model_name, is_default_model, load_model
    from .recipe import LEARNING_RATES
    from .registry import STRATEGIES, apply_strategy

    if args.strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {args.strategy!r}. Valid strategies: {', '.join(sorted(STRATEGIES))}.")
    if args.lr is None and not is_default_model(model_name=args.model):
        raise ValueError(f"the recipe's learning rates were tuned for {DEFAULT_MODEL} only: pass --lr for "
                         f"{args.model or default_model_name()} (helpers.choose_learning_rate picks one on validation)")
    # The first load may convert the default model into the cache: one process does it, the others then read it.
    with accelerator.main_process_first():
        model, tokenizer = load_model(args.model, device="cpu")
    corpus = load_corpus(args.corpus)
    args.lr = LEARNING_RATES[args.strategy] if args.lr is None else args.lr
    model = apply_strategy(model, args.strategy)
    train_data = make_dataloader(tokenizer, corpus.train, block_size=args.block_size, batch_size=args.batch_size,
                                 shuffle=True, seed=args.seed)
    val_data = make_dataloader(tokenizer, corpus.validation, block_size=args.block_size, batch_size=args.batch_size,
                               shuffle=False)
    config = TrainConfig(steps=args.steps, lr=args.lr, warmup_steps=min(3, args.steps), eval_every=args.eval_every,
                         eval_batches=args.eval_batches, seed=args.seed, grad_accum=args.grad_accum,
                         gradient_checkpointing=args.checkpointing, mixed_precision=args.bf16,
                         progress=not args.no_progress)
    return accelerator, model, config, train_data, val_data


def main(argv: list[str] | None = None) -> int:
    """Run python -m helpers.finetune; return its exit status, 2 for bad input with one message (notebook 10)."""
    args = _parser().parse_args(argv)
    try:
        accelerator, model, config, train_data, val_data = _prepare_training(args)
    except (RuntimeError, ValueError, OSError) as error:  # RuntimeError: N processes launched, this one alone
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        history = train_strategy(model, train_data, val_data, config, accelerator=accelerator)
    except ValueError as error:  # what data parallelism cannot train (helpers.engine.check_engine), before any step
        print(f"error: {error}", file=sys.stderr)
        return 2
    state, digests = _trained_tensors(model, accelerator)
    if accelerator.is_main_process:
        _write_result(args, model, config, history, state, digests)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
