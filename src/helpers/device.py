"""Which device to use, what it offers, and how fast it multiplies matrices."""
from __future__ import annotations

import ctypes
import os
import platform
import time

import torch


def get_device(prefer: str | torch.device | None = None) -> torch.device:
    """Return `prefer` if given, else the best available device: CUDA, then MPS, then CPU."""
    if prefer is not None:
        return torch.device(prefer)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def available_devices() -> list[torch.device]:
    """Return every device this machine can run on, CPU last."""
    devices = [torch.device(f"cuda:{i}") for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append(torch.device("mps"))
    return devices + [torch.device("cpu")]


def device_report() -> dict[str, object]:
    """Return versions, the chosen device and, per GPU, name, compute capability, memory and bf16 support."""
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
        "freed CPU memory kept for reuse": CPU_MEMORY_KEPT,
    }
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        report[f"cuda:{i} name"] = props.name
        report[f"cuda:{i} compute capability"] = f"{props.major}.{props.minor}"
        report[f"cuda:{i} memory (GiB)"] = round(props.total_memory / 2**30, 2)
        report[f"cuda:{i} bf16 supported"] = torch.cuda.is_bf16_supported()
    return report


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameter numbers from glibc's malloc.h


def keep_freed_memory(threshold: int = 2**30) -> bool:
    """Return True if glibc's malloc now keeps freed blocks below `threshold` bytes for reuse, else False.

    PyTorch's CPU tensors come from malloc. By default glibc serves every block above 32 MiB with a fresh mmap
    and hands it back to the system when freed, so each training step faults its logits, activations and
    gradients into memory page by page again: 10-30 % of a step of the default model on this CPU.
    Raising the mmap and trim thresholds keeps that memory in the process for the next step; the price is that
    the process's resident memory stays at its peak. Set TUTORIAL_MALLOC=system to keep glibc's defaults.
    """
    if os.environ.get("TUTORIAL_MALLOC", "").lower() == "system" or platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, for one): nothing to tune
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, threshold))


def synchronize(device: torch.device | str) -> None:
    """Wait for queued kernels on `device`, so wall-clock timings measure finished work."""
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
    """Return the measured throughput of n x n matrix products on `device`, in GFLOP/s."""
    device = torch.device(device)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):  # warm-up: first calls pay for allocation and kernel selection
        a @ b
    synchronize(device)
    runs, start = 0, time.perf_counter()
    while True:
        a @ b
        runs += 1
        synchronize(device)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            break
    return 2 * n**3 * runs / elapsed / 1e9


CPU_MEMORY_KEPT: bool = keep_freed_memory()
"""Whether importing helpers tuned glibc's malloc to keep freed memory (see `keep_freed_memory`)."""
