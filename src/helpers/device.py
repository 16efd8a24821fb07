"""Which device to use, what it offers, and how fast it multiplies matrices."""
from __future__ import annotations

import ctypes
import os
import platform
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    import pandas as pd


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def available_devices() -> list[torch.device]:
    """Return every device this machine can run on: each GPU, then MPS, then the CPU (notebook 00)."""
    devices = [torch.device(f"cuda:{i}") for i in range(torch.cuda.device_count())]
    if _mps_available():
        devices.append(torch.device("mps"))
    return devices + [torch.device("cpu")]


def get_device(prefer: str | torch.device | None = None) -> torch.device:
    """Return `prefer` if given, else the best available device: CUDA, then MPS, then CPU (notebook 00)."""
    # The type alone: "cuda" means the current GPU.
    return torch.device(prefer if prefer is not None else available_devices()[0].type)


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
        "mps available": _mps_available(),
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
    """Return True if glibc's malloc now keeps freed blocks under `threshold` bytes (setup calls it, notebook 00).

    glibc's default returns every freed block above 32 MiB to the system, so each training step faults its tensors
    into memory again (`benchmarks/train_throughput.py` measures it). The price: the process keeps its peak memory.
    TUTORIAL_MALLOC=system keeps glibc's defaults.
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
    """Wait for queued kernels on `device`, so wall-clock timings time finished work (notebooks 00 and 02)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _fastest(run: Callable[[], object], device: torch.device, *, repeats: int, seconds: float) -> float:
    """Return the fastest time (s) of `run` over at least `repeats` runs and `seconds`, after a warm-up."""
    run()  # the first call pays for allocation and kernel selection
    # The fastest, not the average: other work on the machine only ever adds time.
    best, runs, deadline = float("inf"), 0, time.perf_counter() + seconds
    while runs < repeats or time.perf_counter() < deadline:
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        best, runs = min(best, time.perf_counter() - start), runs + 1
    return best


def matmul_gflops(device: torch.device | str = "cpu", *, n: int = 1024, seconds: float = 1.0) -> float:
    """Return the GFLOP/s of the fastest fp32 n x n matrix product run on `device` for `seconds` (notebook 00)."""
    device = torch.device(device)
    a = torch.randn(n, n, device=device, dtype=torch.float32)
    b = torch.randn(n, n, device=device, dtype=torch.float32)
    return 2 * n**3 / _fastest(lambda: a @ b, device, repeats=1, seconds=seconds) / 1e9


def training_matmuls(model: torch.nn.Module, *, tokens: int, device: torch.device | str = "cpu", repeats: int = 3,
                     min_seconds: float = 0.25) -> pd.DataFrame:
    """Return, per shape of `model`'s nn.Linear layers, the fastest time of one step's fp32 products (notebook 00).

    A step multiplies by each weight W three times, 2 * tokens * in * out FLOPs each: X @ W.T forward, dY @ W and
    dY.T @ X backward. `tokens` over the sum of "seconds per step" bounds a step's tokens/s (attention's own products
    left out). `model` may live on the meta device: only shapes are read.
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
        x = torch.randn(tokens, n_in, device=device, dtype=torch.float32)
        w = torch.randn(n_out, n_in, device=device, dtype=torch.float32)
        dy = torch.randn(tokens, n_out, device=device, dtype=torch.float32)
        best = _fastest(lambda: (x @ w.T, dy @ w, dy.T @ x), device, repeats=repeats, seconds=min_seconds)
        flops = 3 * 2 * tokens * n_in * n_out
        # The layer's own name, without the path: "up_proj" stands for the up_proj of every block.
        layers = ", ".join(sorted({name.rsplit(".", 1)[-1] for name in names}))
        rows.append({"shape (in x out)": f"{n_in} x {n_out}", "layers": layers, "count": len(names),
                     "GFLOP per step": len(names) * flops / 1e9, "seconds per step": len(names) * best,
                     "GFLOP/s": flops / best / 1e9})
    return pd.DataFrame(rows).set_index("shape (in x out)")
