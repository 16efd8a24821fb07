"""The GGUF conversion cache behind `load_model`, keyed by content, safe for racing processes (README: "The cache")."""
from __future__ import annotations

import functools
import hashlib
import json
import secrets
import shutil
import sys
from pathlib import Path
from unittest import mock

import torch
import transformers

from .compat import require

try:
    import fcntl
except ImportError:  # Windows: no lock, and the rename into place still keeps the cache whole
    fcntl = None

FORMAT = 3  # bump when the conversion writes something different, so that every older folder counts as stale
_STAMP = "source.json"
_EDGE = 64 * 1024


def cache_key(gguf: Path, package: str | None = None) -> dict[str, object]:
    """Return what converting `gguf` depends on: its content (not its path) and transformers' version (notebook 00)."""
    key: dict[str, object] = {"format": FORMAT, "size": gguf.stat().st_size, "transformers": transformers.__version__}
    if package:  # "name==version" of the package that ships the file: that pins its content, no need to hash it
        key.update(package=package, file=gguf.name)
    else:
        with gguf.open("rb") as f:
            key["sha256"] = hashlib.file_digest(f, "sha256").hexdigest()
    return key


def _describe(path: Path) -> dict[str, object]:
    # Its size and a hash of its first and last 64 KiB: read in a millisecond, they catch a truncated or zeroed file.
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(_EDGE)
        f.seek(max(size - _EDGE, 0))
        return {"size": size, "edges": hashlib.sha256(head + f.read()).hexdigest()[:16]}


def _problem(folder: Path, key: dict[str, object]) -> str | None:
    """Return None if `folder` holds a complete conversion for `key`, "" if it does not exist, else what is wrong."""
    if not folder.is_dir():
        return ""
    try:
        stamp = json.loads((folder / _STAMP).read_text())
        old, files = dict(stamp["key"]), dict(stamp["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"is damaged ({_STAMP} is missing or unreadable)"
    if old != key:
        changed = [f"{name} {old.get(name)}, expected {value}" for name, value in key.items() if old.get(name) != value]
        return f"is stale ({'; '.join(changed) or f'its {_STAMP} has other fields'})"
    for name, recorded in files.items():
        if not (folder / name).is_file():
            return f"is damaged ({name} is missing)"
        if _describe(folder / name) != recorded:
            return f"is damaged ({name} changed after it was written)"
    return None


def entry_folder(gguf: Path, cache: Path, key: dict[str, object]) -> Path:
    """Return the folder in `cache` that holds `gguf` converted under `key` (notebook 00)."""
    return cache / f"{gguf.stem}-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]}"


def convert_gguf(gguf: Path, cache: Path, package: str | None = None) -> Path:
    """Return the folder in `cache` holding `gguf` as fp32 safetensors and tokenizer, converted once (notebook 00)."""
    key = cache_key(gguf, package)
    target = entry_folder(gguf, cache, key)
    if _problem(target, key) is None:
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / f".{target.name}.lock").open("a") as lock:  # closing it releases the lock
        locked = fcntl is not None
        try:
            if locked:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"Waiting for another process that is converting {gguf.name}...", file=sys.stderr, flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError:  # some network file systems refuse locks
            locked = False
        problem = _problem(target, key)  # another process may have converted it while this one waited
        if problem is None:
            return target
        if problem:
            print(f"The cache at {target} {problem}: converting again.", file=sys.stderr, flush=True)
        if locked:  # then no other process is writing here: clear what a killed conversion left behind
            for leftover in cache.glob(f".{target.name}.tmp*"):
                shutil.rmtree(leftover, ignore_errors=True)
        tmp = cache / f".{target.name}.tmp-{secrets.token_hex(4)}"
        old = tmp.with_name(f"{tmp.name}-old")
        try:
            tmp.mkdir()
            if target.exists():  # moved aside, not deleted in place: a process reading it keeps its open files
                target.rename(old)
            _convert(gguf, tmp)
            files = {path.name: _describe(path) for path in sorted(tmp.iterdir())}
            (tmp / _STAMP).write_text(json.dumps({"key": key, "files": files}, indent=1))
            try:
                tmp.rename(target)
            except OSError:  # only without a lock can another process have put a conversion there meanwhile
                if _problem(target, key) is not None:
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)
    return target


def _convert(gguf: Path, folder: Path) -> None:
    """Write the dequantized model and its tokenizer into `folder`, showing one progress bar and nothing else."""
    # It patches transformers' GGUF loader (its tqdm) and gguf's name map, and clears transformers' quantizer marker.
    require("transformers", "~=5.24.0", "helpers' GGUF conversion")
    require("gguf", "~=0.19.0", "helpers' GGUF conversion")
    import gguf as gguf_lib
    from transformers import modeling_gguf_pytorch_utils

    from .progress import tqdm

    bar_format = "{desc}: {percentage:3.0f}%|{bar}| [{elapsed}{postfix}]"
    bar = tqdm(total=100, desc=f"Converting {gguf.name}", bar_format=bar_format)

    def stage(name: str, start: float) -> None:
        # The bar's shares follow the time each stage takes for the default model.
        bar.set_postfix_str(name, refresh=False)
        bar.update(start - bar.n)

    def dequantizing(tensors: list, *args: object, **kwargs: object) -> list:
        # Stands in for the bar transformers draws over the tensors it dequantizes (a second one), and names the stage.
        stage("dequantize weights", 70)
        return tensors

    # transformers looks the GGUF name map up once per submodule (hundreds of times), and it is the same map.
    name_map = functools.lru_cache(maxsize=None)(gguf_lib.get_tensor_name_map)
    # Silence transformers' logs and its own bars for the duration, then restore what the caller had.
    verbosity, bars = transformers.logging.get_verbosity(), transformers.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        with (bar, mock.patch.object(modeling_gguf_pytorch_utils, "tqdm", dequantizing),
              mock.patch.object(gguf_lib, "get_tensor_name_map", name_map)):
            stage("read tokenizer", 0)
            tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            stage("read weights", 25)
            model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                                      dtype=torch.float32)
            # The weights are plain fp32 tensors now; drop the GGUF quantizer's marker so that they can be saved.
            model.hf_quantizer = None
            model.is_quantized = False
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            stage("write", 88)
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            stage("done", 100)
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.logging.enable_progress_bar()
