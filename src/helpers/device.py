"""Which device to use, what it offers, and how fast it multiplies matrices."""
from __future__ import annotations

import ctypes
import os
import platform
import time
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    import pandas as pd


def get_device(prefer: str | torch.device | None = None) -> torch.device:
    """Return `prefer` if given, else the best available device: CUDA, then MPS, then CPU (notebook 00)."""
    if prefer is not None:
        return torch.device(prefer)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def available_devices() -> list[torch.device]:
    """Return every device this machine can run on, CPU last (notebook 00)."""
    devices = [torch.device(f"cuda:{i}") for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append(torch.device("mps"))
    return devices + [torch.device("cpu")]


def device_report() -> dict[str, object]:
    """Return versions, the chosen device and, per GPU, name, compute capability, memory, bf16 (notebook 00)."""
    import transformers

    report: dict[str, object] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu threads": torch.get_num_threads(),
        "cuda available": torch.cuda.is_available(),
        "cuda version (torch build)": torch.version.cuda,
        "mps available": bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()),
        "chosen device": str(get_device()),
        "freed CPU memory kept for reuse": _memory_kept,
    }
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        report[f"cuda:{i} name"] = props.name
        report[f"cuda:{i} compute capability"] = f"{props.major}.{props.minor}"
        report[f"cuda:{i} memory (GiB)"] = round(props.total_memory / 2**30, 2)
        report[f"cuda:{i} bf16 supported"] = torch.cuda.is_bf16_supported()
    return report


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameter numbers from glibc's malloc.h
_memory_kept = False  # whether keep_freed_memory tuned malloc in this process; device_report shows it


def keep_freed_memory(threshold: int = 2**30) -> bool:
    """Return True if glibc's malloc now keeps freed blocks below `threshold` bytes for reuse (called by setup).

    PyTorch's CPU tensors come from malloc. By default glibc serves every block above 32 MiB with a fresh mmap
    and hands it back to the system when freed, so each training step faults its logits, activations and
    gradients into memory page by page again (`benchmarks/train_throughput.py` measures what that costs).
    Raising the mmap and trim thresholds keeps that memory in the process for the next step; the price is that
    the process's resident memory stays at its peak. Set TUTORIAL_MALLOC=system to keep glibc's defaults.
    `helpers.setup()`, every notebook's first call, calls it; importing helpers does not.
    """
    global _memory_kept
    if os.environ.get("TUTORIAL_MALLOC", "").lower() == "system" or platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, for one): nothing to tune
        return False
    _memory_kept = bool(mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, threshold))
    return _memory_kept


def synchronize(device: torch.device | str) -> None:
    """Wait for queued kernels on `device`, so wall-clock timings measure finished work (the timings of 00 and 02)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def matmul_gflops(
    device: torch.device | str = "cpu",
    *,
    n: int = 1024,
    dtype: torch.dtype = torch.float32,
    seconds: float = 1.0,
) -> float:
    """Return the GFLOP/s of the fastest n x n matrix product run on `device` for `seconds` (notebook 00).

    The fastest product, not the average: other work on the machine only ever adds time.
    """
    device = torch.device(device)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):  # warm-up: first calls pay for allocation and kernel selection
        a @ b
    synchronize(device)
    best, deadline = float("inf"), time.perf_counter() + seconds
    while True:
        start = time.perf_counter()
        a @ b
        synchronize(device)
        end = time.perf_counter()
        best = min(best, end - start)
        if end >= deadline:
            break
    return 2 * n**3 / best / 1e9


def training_matmuls(
    model: torch.nn.Module,
    *,
    tokens: int,
    device: torch.device | str = "cpu",
    repeats: int = 3,
    min_seconds: float = 0.25,
    dtype: torch.dtype = torch.float32,
) -> pd.DataFrame:
    """Return, per shape of `model`'s nn.Linear layers, the fastest time of one step's products (notebook 00).

    A training step multiplies by each weight W three times: the forward X @ W.T, the input gradient dY @ W
    and the weight gradient dY.T @ X, each 2 * tokens * in * out FLOPs. We time the three on random matrices of
    those shapes after one warm-up, at least `repeats` times and for at least `min_seconds` per shape, and keep
    the fastest: other work on the machine only ever adds time. The sum of "seconds per step" is the time one
    training step needs for these products alone, so `tokens` divided by it bounds the tokens/s a step can
    reach. `model` may live on the meta device: only the layers' shapes are read. Attention's own products
    (scores and their weighted sum) are not included.
    """
    import pandas as pd  # imported here: `import helpers` stays fast

    if tokens < 1 or repeats < 1 or min_seconds < 0:
        raise ValueError(
            f"tokens ({tokens}) and repeats ({repeats}) must be at least 1, min_seconds ({min_seconds}) at least 0."
        )
    groups: dict[tuple[int, int], list[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            groups.setdefault((module.in_features, module.out_features), []).append(name)
    if not groups:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layers to time; pass a model built from them.")
    device = torch.device(device)
    rows = []
    for (n_in, n_out), names in groups.items():
        x = torch.randn(tokens, n_in, device=device, dtype=dtype)
        w = torch.randn(n_out, n_in, device=device, dtype=dtype)
        dy = torch.randn(tokens, n_out, device=device, dtype=dtype)
        x @ w.T, dy @ w, dy.T @ x  # warm-up: the first call pays for allocation and kernel selection
        best, runs, deadline = float("inf"), 0, time.perf_counter() + min_seconds
        while runs < repeats or time.perf_counter() < deadline:
            synchronize(device)
            start = time.perf_counter()
            x @ w.T, dy @ w, dy.T @ x
            synchronize(device)
            best, runs = min(best, time.perf_counter() - start), runs + 1
        flops = 3 * 2 * tokens * n_in * n_out
        rows.append({
            "shape (in x out)": f"{n_in} x {n_out}",
            # The layer's own name, without the path: "up_proj" stands for the up_proj of every block.
            "layers": ", ".join(sorted({name.rsplit(".", 1)[-1] for name in names})),
            "count": len(names),
            "GFLOP per step": len(names) * flops / 1e9,
            "seconds per step": len(names) * best,
            "GFLOP/s": flops / best / 1e9,
        })
    return pd.DataFrame(rows).set_index("shape (in x out)")

