"""What the training loop needs from Accelerate, for one process, N data-parallel processes or FSDP (notebook 10).

`helpers.train(..., accelerator=make_accelerator())` trains through Accelerate; the loop's lines that differ for it
are marked `# engine:` in `helpers.training`.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from accelerate import Accelerator

LAUNCH_ENV = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
"""Environment variables through which launchers (torchrun, accelerate launch, mpirun) tell a process how many ran."""


def launched_processes(environ: dict | None = None) -> int:
    """Return how many processes the launcher started, 1 when none set a world size (first used in notebook 10)."""
    environ = os.environ if environ is None else environ
    for name in LAUNCH_ENV:
        if environ.get(name, "").strip().isdigit():
            return int(environ[name])
    return 1


def check_launch(num_processes: int, environ: dict | None = None) -> None:
    """Raise RuntimeError if N processes were launched but this one trains alone (explained in notebook 10)."""
    launched = launched_processes(environ)
    if launched > 1 and num_processes == 1:
        raise RuntimeError(
            f"{launched} processes were launched (WORLD_SIZE={launched}), but this one is not part of a distributed "
            f"run: each would train alone on the same data, {launched} duplicate runs instead of one. On a machine "
            "without a GPU, Accelerate needs its CPU setting to join the processes with gloo: build the Accelerator "
            "with helpers.engine.make_accelerator() (it sets cpu=True when CUDA is absent), pass "
            "Accelerator(cpu=True), or set ACCELERATE_USE_CPU=1."
        )


def make_accelerator(*, mixed_precision: bool = False, fsdp: bool = False, cpu: bool | None = None) -> Accelerator:
    """Return an Accelerator for this launch: gloo without CUDA, autocast on CUDA if asked, FSDP if asked (notebook 10).

    `cpu=None` means the CPU when CUDA is absent, which is also what makes N CPU processes started by torchrun join
    one run instead of training N times side by side.
    """
    from accelerate import Accelerator

    cpu = (not torch.cuda.is_available()) if cpu is None else cpu
    # Autocast only on CUDA: bf16 where the card has it, else fp16 with loss scaling, as the plain loop does.
    precision = "no"
    if mixed_precision and not cpu and torch.cuda.is_available():
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    plugin = None
    if fsdp:
        if cpu:
            # Said before Accelerate's own "There are currently no available devices found", with what works instead.
            raise ValueError("FSDP through Accelerate needs a GPU (CUDA) or another accelerator, and this run is on "
                             "the CPU. Drop --fsdp (fsdp=False): data parallelism over CPU processes works here.")
        from accelerate.utils import FullyShardedDataParallelPlugin

        # use_orig_params keeps frozen and trainable tensors side by side in one shard, which freezing strategies need.
        plugin = FullyShardedDataParallelPlugin(use_orig_params=True, sync_module_states=True)
    accelerator = Accelerator(cpu=cpu, mixed_precision=precision, fsdp_plugin=plugin)
    check_launch(accelerator.num_processes)
    return accelerator


def world_and_rank(accelerator: Accelerator | None) -> tuple[int, int]:
    """Return (number of processes, this one's index), (1, 0) without an engine (used by train, notebook 10)."""
    return (accelerator.num_processes, accelerator.process_index) if accelerator else (1, 0)


def is_fsdp(accelerator: Accelerator | None) -> bool:
    """Return whether the engine shards the model (FSDP): every rank joins every forward (notebook 10)."""
    return accelerator is not None and str(accelerator.distributed_type).endswith("FSDP")


def shard(batch, rank: int, world: int):
    """Return this rank's rows of a global batch: a tensor, a tuple/list or a dict of tensors (notebook 10)."""
    if isinstance(batch, torch.Tensor):
        return torch.tensor_split(batch, world)[rank]
    if isinstance(batch, dict):
        return {k: shard(v, rank, world) for k, v in batch.items()}
    return type(batch)(shard(v, rank, world) for v in batch)


def check_engine(model: torch.nn.Module, train_data, accelerator: Accelerator | None) -> None:
    """Raise ValueError, before any step, for what data parallelism cannot train (used by train, notebook 10)."""
    from .strategies import StrategyInfo

    if accelerator is None:
        return
    check_launch(accelerator.num_processes)  # an Accelerator built by hand has not been checked yet
    world = accelerator.num_processes
    info = getattr(model, "strategy_info", None)
    if world > 1 and info is not None and type(info).on_step is not StrategyInfo.on_step:
        raise ValueError(
            f"Strategy {info.name!r} changes which tensors train while training, which data parallelism cannot "
            "follow (DDP fixes the set of synchronised tensors when it wraps the model). Train it in one process."
        )
    # The loader's batch_size, not a batch drawn from it: drawing would advance its shuffling and change the run.
    size = getattr(train_data, "batch_size", None)
    if size is not None and size < world:
        raise ValueError(
            f"A global batch of {size} rows cannot be split over {world} processes: every rank needs at least "
            f"one row. Use a batch size of at least {world}, or fewer processes."
        )


def check_rows(batches: list, world: int, step: int) -> None:
    """Raise ValueError if a global batch has fewer rows than processes, on every rank (used by train, notebook 10)."""
    for batch in batches:
        ids = batch["input_ids"] if isinstance(batch, dict) else batch[0] if isinstance(batch, (list, tuple)) else batch
        if ids.shape[0] < world:
            raise ValueError(
                f"Step {step} drew a batch of {ids.shape[0]} rows, fewer than the {world} processes: a rank would "
                "have nothing to train on. Build the DataLoader with drop_last=True or a batch size that leaves no "
                "short last batch."
            )
