"""Back-of-the-envelope memory needed to fine-tune a model: weights, gradients, optimizer, activations."""
from __future__ import annotations

import pandas as pd
from transformers import PretrainedConfig

_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def activation_bytes(config: PretrainedConfig, *, batch: int, seq: int, precision: str = "fp32") -> int:
    """Return an estimate of the activations kept for backward, in bytes.

    Per block, Korthikanti et al. (2022) count about 34*s*b*h + 5*a*s^2*b bytes in 16-bit;
    we scale that by the element size and add the logits and their gradient (2*b*s*V values).
    """
    scale = _BYTES[precision] / 2
    h, a, layers = config.hidden_size, config.num_attention_heads, config.num_hidden_layers
    per_block = (34 * seq * batch * h + 5 * a * seq * seq * batch) * scale
    logits = 2 * batch * seq * config.vocab_size * _BYTES[precision]
    return int(layers * per_block + logits)


def training_memory(
    n_params: int,
    config: PretrainedConfig | None = None,
    *,
    trainable: int | None = None,
    batch: int = 1,
    seq: int = 512,
    precision: str = "fp32",
) -> pd.Series:
    """Return GiB needed for weights, gradients, the two AdamW states and activations, and their total."""
    if precision not in _BYTES:
        raise ValueError(f"Unknown precision {precision!r}; use one of {sorted(_BYTES)}.")
    trainable = n_params if trainable is None else trainable
    size = _BYTES[precision]
    parts = {
        "weights": n_params * size,
        "gradients": trainable * size,
        # AdamW keeps two fp32 moments per trainable parameter whatever the weights' precision.
        "AdamW states": trainable * 4 * 2,
        "activations": activation_bytes(config, batch=batch, seq=seq, precision=precision) if config else 0,
    }
    parts["total"] = sum(parts.values())
    return pd.Series({k: v / 2**30 for k, v in parts.items()}, name="GiB")
