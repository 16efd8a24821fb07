"""The training loop of `helpers.train` on Hugging Face Accelerate: one process, data parallel over N, or FSDP.

`train_accelerated` is `helpers.train` with four changes, each marked `# engine:` below: the model and optimizer go
through `accelerator.prepare`, every rank keeps its slice of the global batch, `accelerator.backward` replaces
`loss.backward`, and validation sums its loss and token count over all ranks. In one process it computes the same
numbers as `helpers.train`. `python -m helpers.finetune --help` is the launchable command; it runs unchanged under
`torchrun --nproc_per_node N` and `accelerate launch`.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .training import (
    HISTORY_COLUMNS, TrainConfig, _batch_tensors, _batches, _checkpointing, _loss_sum, _optimizer_groups, _PeakMemory,
    batch_size_tokens, lr_factor, trained_state,
)
from .strategies import StrategyInfo

if TYPE_CHECKING:
    import pandas as pd
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

LAUNCH_ENV = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
"""Environment variables through which launchers (torchrun, accelerate launch, mpirun) tell a process how many ran."""


def launched_processes(environ: dict | None = None) -> int:
    """Return how many processes the launcher started (1 when none set a world size)."""
    environ = os.environ if environ is None else environ
    for name in LAUNCH_ENV:
        if environ.get(name, "").strip().isdigit():
            return int(environ[name])
    return 1


def check_launch(num_processes: int, environ: dict | None = None) -> None:
    """Raise RuntimeError if N processes were launched but this one trains alone: N duplicate runs, not one."""
    launched = launched_processes(environ)
    if launched > 1 and num_processes == 1:
        raise RuntimeError(
            f"{launched} processes were launched (WORLD_SIZE={launched}), but this one is not part of a distributed "
            f"run: each would train alone on the same data, {launched} duplicate runs instead of one. On a machine "
            "without a GPU, Accelerate needs its CPU setting to join the processes with gloo: build the Accelerator "
            "with helpers.finetune.make_accelerator() (it sets cpu=True when CUDA is absent), pass "
            "Accelerator(cpu=True), or set ACCELERATE_USE_CPU=1."
        )


def make_accelerator(*, mixed_precision: bool = False, fsdp: bool = False, cpu: bool | None = None) -> Accelerator:
    """Return an Accelerator for this launch: gloo on CPU-only machines, autocast on CUDA if asked, FSDP if asked.

    `cpu=None` decides by the hardware: the CPU when CUDA is absent, which is also what makes N CPU processes
    started by torchrun join one run instead of training N times side by side.
    """
    from accelerate import Accelerator

    cpu = (not torch.cuda.is_available()) if cpu is None else cpu
    # Autocast only where it pays: on CUDA, in bf16 where the card has it (fp16 with loss scaling on older cards, as
    # helpers.train does). On the CPU the run stays fp32.
    precision = "no"
    if mixed_precision and not cpu and torch.cuda.is_available():
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    plugin = None
    if fsdp:
        if cpu:
            # Accelerate's FSDP plugin needs an accelerator device: on a CPU it raises "There are currently no
            # available devices found". Say so before it does, with what works instead.
            raise ValueError("FSDP through Accelerate needs a GPU (CUDA) or another accelerator, and this run is on "
                             "the CPU. Drop --fsdp (fsdp=False): data parallelism over CPU processes works here.")
        from accelerate.utils import FullyShardedDataParallelPlugin

        # use_orig_params keeps frozen and trainable tensors side by side in one shard, which freezing strategies need.
        plugin = FullyShardedDataParallelPlugin(use_orig_params=True, sync_module_states=True)
    accelerator = Accelerator(cpu=cpu, mixed_precision=precision, fsdp_plugin=plugin)
    check_launch(accelerator.num_processes)
    return accelerator


def shard(batch, rank: int, world: int):
    """Return this rank's rows of a global batch (a tensor, a tuple/list of tensors, or a dict of tensors)."""
    if isinstance(batch, torch.Tensor):
        return torch.tensor_split(batch, world)[rank]
    if isinstance(batch, dict):
        return {k: shard(v, rank, world) for k, v in batch.items()}
    return type(batch)(shard(v, rank, world) for v in batch)


def _is_fsdp(accelerator: Accelerator) -> bool:
    return str(accelerator.distributed_type).endswith("FSDP")


def _rows(batch) -> int:
    ids = batch["input_ids"] if isinstance(batch, dict) else (batch[0] if isinstance(batch, (list, tuple)) else batch)
    return ids.shape[0]


@torch.no_grad()
def evaluate_loss_distributed(model: nn.Module, data: DataLoader, accelerator: Accelerator, *,
                              max_batches: int | None = None) -> float:
    """Return the token-weighted mean next-token NLL over `data`, each batch scored by one rank and summed over all."""
    world, rank = accelerator.num_processes, accelerator.process_index
    # A DDP wrapper may broadcast buffers in its forward, a collective that ranks scoring different batches would not
    # all join; the wrapped module computes the same. FSDP's shards only compute inside the wrapper.
    scorer = model if _is_fsdp(accelerator) else accelerator.unwrap_model(model)
    was_training = scorer.training
    scorer.eval()
    total, count = 0.0, 0
    batches = list(itertools.islice(data, max_batches))
    # Batch i goes to rank i mod world, so every token is scored exactly once. Under FSDP every rank must join every
    # forward pass, so a rank with no batch left in the last round runs one whose result it discards.
    rounds = math.ceil(len(batches) / world)
    for r in range(rounds):
        i = r * world + rank
        if i < len(batches):
            loss, n = _loss_sum(scorer, batches[i], accelerator.device, contextlib.nullcontext)
            total, count = total + loss.item(), count + n
        elif _is_fsdp(accelerator):
            _loss_sum(scorer, batches[0], accelerator.device, contextlib.nullcontext)
    scorer.train(was_training)
    sums = torch.tensor([total, float(count)], dtype=torch.float64, device=accelerator.device)
    total, count = accelerator.reduce(sums, reduction="sum").tolist()  # engine: loss and tokens summed over ranks
    if count == 0:
        raise ValueError("The validation data holds no tokens to predict; pass a non-empty DataLoader.")
    return total / count


def train_accelerated(
    model: nn.Module,
    train_data: DataLoader,
    val_data: DataLoader,
    config: TrainConfig | None = None,
    *,
    accelerator: Accelerator | None = None,
) -> pd.DataFrame:
    """Return the training history of `helpers.train` (same columns and attrs), training `model` through Accelerate.

    Every rank reads the same global batches in the same order and trains on its slice of each, so N processes
    take the steps one process takes with the same global batch. attrs add world_size and distributed_type.
    """
    import pandas as pd

    config = config or TrainConfig()
    config.check()
    accelerator = accelerator or make_accelerator(mixed_precision=config.mixed_precision)
    check_launch(accelerator.num_processes)
    world, rank = accelerator.num_processes, accelerator.process_index
    info = getattr(model, "strategy_info", None)
    if world > 1 and info is not None and type(info).on_step is not StrategyInfo.on_step:
        raise ValueError(
            f"Strategy {info.name!r} changes which tensors train while training, which data parallelism cannot "
            "follow (DDP fixes the set of synchronised tensors when it wraps the model). Train it in one process."
        )
    # The loader's batch_size, not a batch drawn from it: drawing would advance its shuffling and change the run.
    rows = getattr(train_data, "batch_size", None)
    if rows is not None and rows < world:
        raise ValueError(
            f"A global batch of {rows} rows cannot be split over {world} processes: every rank needs at least "
            f"one row. Use a batch size of at least {world}, or fewer processes."
        )
    torch.manual_seed(config.seed)
    if config.gradient_checkpointing:
        if not hasattr(model, "gradient_checkpointing_enable"):
            raise ValueError(f"{type(model).__name__} does not support gradient checkpointing; set gradient_checkpointing=False.")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointing_before = _checkpointing(model)
    groups = _optimizer_groups(model, config.lr, config.weight_decay)
    tracked = [p for g in groups for p in g["params"]]
    fused = {"fused": True} if accelerator.device.type in ("cpu", "cuda") and not _is_fsdp(accelerator) else {}
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay, **fused)
    wrapped, optimizer = accelerator.prepare(model, optimizer)  # engine: DDP or FSDP wrapping, device placement
    # The schedule steps once per optimizer step; an Accelerate-prepared scheduler would step once per process.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer.optimizer, lambda s: lr_factor(s + 1, config))
    precision = {"bf16": "bf16", "fp16": "fp16"}.get(str(accelerator.mixed_precision), "fp32")
    wrapped.train()

    history: list[dict] = []
    tokens, train_seconds, stopped_at = 0, 0.0, None
    best = {"val": math.inf, "step": None, "weights": None, "misses": 0}

    def validate(step: int) -> tuple[float, float]:
        val = evaluate_loss_distributed(wrapped, val_data, accelerator, max_batches=config.eval_batches)
        if config.patience:
            if val < best["val"]:
                best.update(val=val, step=step, misses=0, weights=[p.detach().clone() for p in tracked])
            else:
                best["misses"] += 1
        return val, math.exp(min(val, 700.0))

    from .progress import tqdm

    bar = tqdm(total=config.steps, desc=f"train ({precision}, {world} process{'es' if world > 1 else ''})",
               disable=not (config.progress and accelerator.is_main_process))
    stream = _batches(train_data)
    memory = _PeakMemory(accelerator.device)
    # What the process held before training (weights included): the peak minus this is what training added.
    at_start = (torch.cuda.memory_allocated(accelerator.device) if accelerator.device.type == "cuda"
                else _PeakMemory.rss())
    try:
        with memory:
            if config.eval_at_start:
                val, ppl = validate(0)
                history.append({"step": 0, "tokens": 0, "train_loss": float("nan"), "val_loss": val, "val_ppl": ppl,
                                "lr": 0.0, "seconds": 0.0})
            for step in range(1, config.steps + 1):
                start = time.perf_counter()
                lr_now = optimizer.param_groups[0]["lr"]
                batches = [next(stream) for _ in range(config.grad_accum)]  # the global batches, alike on every rank
                short = [_rows(b) for b in batches if _rows(b) < world]
                if short:  # every rank sees the same batches, so every rank stops here together
                    raise ValueError(
                        f"Step {step} drew a batch of {short[0]} rows, fewer than the {world} processes: a rank would "
                        "have nothing to train on. Build the DataLoader with drop_last=True or a batch size that "
                        "leaves no short last batch."
                    )
                total_targets = max(sum(int((_batch_tensors(b, torch.device("cpu"))[2] != -100).sum()) for b in batches), 1)
                loss_sum = 0.0
                for i, batch in enumerate(batches):
                    mine = shard(batch, rank, world)  # engine: this rank's rows of the global batch
                    # Gradients are averaged over ranks once, after the last micro-batch of the step.
                    sync = accelerator.no_sync(wrapped) if i < len(batches) - 1 else contextlib.nullcontext()
                    with sync:
                        loss, _ = _loss_sum(wrapped, mine, accelerator.device, contextlib.nullcontext)
                        # DDP averages gradients over the ranks; times `world`, that is the global token-weighted mean.
                        accelerator.backward(loss * world / total_targets)  # engine: replaces loss.backward()
                    loss_sum += loss.item()
                    tokens += batch_size_tokens(batch)
                loss_sum = accelerator.reduce(torch.tensor(loss_sum, dtype=torch.float64, device=accelerator.device),
                                              reduction="sum").item()
                if not math.isfinite(loss_sum):
                    raise FloatingPointError(
                        f"The training loss became {loss_sum} at step {step} (learning rate {lr_now:.3g}). "
                        "Lower TrainConfig.lr, keep grad_clip on, or check the data for empty blocks."
                    )
                if config.grad_clip:
                    accelerator.clip_grad_norm_([p for p in tracked if p.grad is not None], config.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                train_seconds += time.perf_counter() - start
                if info is not None:
                    info.on_step(model, step)
                row = {"step": step, "tokens": tokens, "train_loss": loss_sum / total_targets,
                       "val_loss": float("nan"), "val_ppl": float("nan"), "lr": lr_now, "seconds": train_seconds}
                if (config.eval_every and step % config.eval_every == 0) or step == config.steps:
                    row["val_loss"], row["val_ppl"] = validate(step)
                history.append(row)
                bar.update(1)
                bar.set_postfix(loss=f"{row['train_loss']:.3f}")
                if config.patience and best["misses"] >= config.patience and step < config.steps:
                    stopped_at = step
                    break
    finally:
        bar.close()
        if best["weights"] is not None:
            with torch.no_grad():
                for p, saved in zip(tracked, best["weights"]):
                    p.copy_(saved)
        if config.gradient_checkpointing and not checkpointing_before:
            model.gradient_checkpointing_disable()

    peak = accelerator.reduce(torch.tensor(float(memory.peak), device=accelerator.device), reduction="max").item()
    frame = pd.DataFrame(history, columns=HISTORY_COLUMNS)
    frame.attrs.update({
        "precision": precision,
        "gradient_checkpointing": config.gradient_checkpointing,
        "interrupted": False,
        "train_seconds": train_seconds,
        "tokens": tokens,
        "tokens_per_second": tokens / train_seconds if train_seconds else float("nan"),
        "peak_memory_mb": peak / 2**20,
        "memory_at_start_mb": at_start / 2**20,
        "config": asdict(config),
        "stopped_early_at": stopped_at,
        "best_step": best["step"],
        "best_val_loss": best["val"] if best["step"] is not None else None,
        "world_size": world,
        "distributed_type": str(accelerator.distributed_type).split(".")[-1],
    })
    return frame


def _digest(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        digest.update(name.encode())
        digest.update(tensor.float().numpy().tobytes())
    return digest.hexdigest()


def weights_digest(model: nn.Module) -> str:
    """Return a sha256 of the trainable tensors' bytes: equal digests mean bit-identical trained weights."""
    return _digest(trained_state(model))


def _plain_name(name: str) -> str:
    """Return a parameter name without the prefixes FSDP and activation checkpointing insert."""
    for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(wrapper, "")
    return name


def command_line(out: str | Path, *, processes: int = 1, **options) -> list[str]:
    """Return the command that runs `python -m helpers.finetune` with `options` (--name value) in `processes` processes.

    More than one process goes through torchrun on this machine (`--standalone`: one node, a local rendezvous).
    A True option is a bare flag (bf16=True -> --bf16); None and False options are left out.
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
    """Return the result.json of `python -m helpers.finetune` run in a subprocess with `options` (see command_line).

    Each process gets `threads` torch threads (default: this machine's cores shared out), so that N processes do
    not fight over the same cores. A failing run raises RuntimeError with the end of its error output.
    """
    import subprocess

    threads = threads or max(1, (os.cpu_count() or 1) // processes)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    command = command_line(out, processes=processes, **options)
    done = subprocess.run(command, capture_output=True, text=True, env=env)
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
                        help="a registered strategy, e.g. full_fine_tuning, freeze_lower_layers, lora (default: %(default)s)")
    parser.add_argument("--model", default=None,
                        help="a local folder, a .gguf file or a Hub id (default: the tutorial's model, offline)")
    parser.add_argument("--corpus", default=None, help="a folder of .txt/.md documents (default: the Rust corpus)")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=None,
                        help="learning rate (default: the sweep's choice for the strategy, helpers.compare.learning_rate)")
    parser.add_argument("--batch-size", type=int, default=4,
                        help="blocks per global batch, split over the processes (default: %(default)s)")
    parser.add_argument("--block-size", type=int, default=128, help="tokens per block (default: %(default)s)")
    parser.add_argument("--grad-accum", type=int, default=1, help="global batches per optimizer step (default: %(default)s)")
    parser.add_argument("--eval-every", type=int, default=5, help="validate every N steps, 0 = only at the end (default: %(default)s)")
    parser.add_argument("--eval-batches", type=int, default=2, help="validation batches per check (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="data order and initialisation seed (default: %(default)s)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA only; the CPU stays fp32)")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing: less memory, more compute")
    parser.add_argument("--fsdp", action="store_true",
                        help="shard weights, gradients and optimizer states over the processes (FSDP; needs GPUs)")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even where a GPU is present (gloo)")
    parser.add_argument("--out", required=True, help="folder for result.json and trained.safetensors")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command; return its exit status (2 for bad input, with one message naming the problem)."""
    args = _parser().parse_args(argv)
    for name in ("steps", "batch_size", "block_size", "grad_accum"):
        if getattr(args, name) < 1:
            print(f"error: --{name.replace('_', '-')} must be at least 1; got {getattr(args, name)}.", file=sys.stderr)
            return 2
    try:
        accelerator = make_accelerator(mixed_precision=args.bf16, fsdp=args.fsdp, cpu=True if args.cpu else None)
    except (RuntimeError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from .data import load_corpus, make_dataloader
    from .models import load_model
    from .strategies import STRATEGIES, apply_strategy, count_parameters

    if args.strategy not in STRATEGIES:
        print(f"error: unknown strategy {args.strategy!r}. Valid strategies: {', '.join(sorted(STRATEGIES))}.",
              file=sys.stderr)
        return 2
    try:
        # The first load may convert the default model into the cache: one process does it, the others then read it.
        with accelerator.main_process_first():
            model, tokenizer = load_model(args.model, device="cpu")
        corpus = load_corpus(args.corpus)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.lr is None:
        from .compare import learning_rate

        args.lr = learning_rate(args.strategy)
    model = apply_strategy(model, args.strategy)
    train_data = make_dataloader(tokenizer, corpus.train, block_size=args.block_size, batch_size=args.batch_size,
                                 shuffle=True, seed=args.seed)
    val_data = make_dataloader(tokenizer, corpus.validation, block_size=args.block_size, batch_size=args.batch_size,
                               shuffle=False)
    config = TrainConfig(steps=args.steps, lr=args.lr, warmup_steps=min(3, args.steps), eval_every=args.eval_every,
                         eval_batches=args.eval_batches, seed=args.seed, grad_accum=args.grad_accum,
                         gradient_checkpointing=args.checkpointing, mixed_precision=args.bf16,
                         progress=not args.no_progress)
    try:
        history = train_accelerated(model, train_data, val_data, config, accelerator=accelerator)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from accelerate.utils import gather_object

    if _is_fsdp(accelerator):
        # Each rank holds a different shard: gather the full tensors on rank 0 and keep the trainable ones.
        trainable = {_plain_name(n) for n, p in model.named_parameters() if p.requires_grad}
        full = accelerator.get_state_dict(accelerator._models[-1])
        state = {n: t.detach().cpu().contiguous() for n, t in full.items() if _plain_name(n) in trainable}
        digests = [_digest(state)] if accelerator.is_main_process else []
    else:
        state = trained_state(model)
        digests = gather_object([_digest(state)])  # one per rank, in rank order
    identical = None if _is_fsdp(accelerator) else len(set(digests)) == 1
    if accelerator.is_main_process:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        from safetensors.torch import save_file

        save_file(state, str(out / "trained.safetensors"))
        trainable, total = count_parameters(model)
        attrs = history.attrs
        result = {
            "strategy": args.strategy, "model": args.model, "corpus": args.corpus, "world_size": attrs["world_size"],
            "distributed_type": attrs["distributed_type"], "precision": attrs["precision"],
            "trainable_params": trainable, "total_params": total, "config": asdict(config),
            "tokens": attrs["tokens"], "train_seconds": attrs["train_seconds"],
            "tokens_per_second": attrs["tokens_per_second"], "peak_memory_mb": attrs["peak_memory_mb"],
            "memory_at_start_mb": attrs["memory_at_start_mb"], "gradient_checkpointing": config.gradient_checkpointing,
            "batch_size": args.batch_size, "block_size": args.block_size,
            "rank_digests": digests, "identical_on_all_ranks": identical,
            "history": [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
                        for row in history.to_dict(orient="records")],
        }
        (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
        last = history.dropna(subset=["val_loss"]).iloc[-1]
        print(f"{args.strategy}: {attrs['world_size']} process(es), {attrs['distributed_type']}, {attrs['precision']}; "
              f"{config.steps} steps, {attrs['tokens']:,} tokens in {attrs['train_seconds']:.1f} s "
              f"({attrs['tokens_per_second']:.0f} tokens/s), peak memory {attrs['peak_memory_mb']:,.0f} MB per process")
        print(f"validation loss {last['val_loss']:.4f} (perplexity {last['val_ppl']:.2f}) at step {int(last['step'])}")
        if identical is None:
            print(f"weights sharded over {attrs['world_size']} ranks (FSDP), gathered on rank 0: sha256 {digests[0][:16]}")
        else:
            print(f"trained weights identical on all {len(digests)} ranks: {identical} (sha256 {digests[0][:16]})")
        print(f"wrote {out / 'result.json'} and {out / 'trained.safetensors'}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
