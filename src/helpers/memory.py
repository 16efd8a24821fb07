"""Back-of-the-envelope memory needed to fine-tune a model: weights, gradients, optimizer, activations."""
from __future__ import annotations

import pandas as pd
from transformers import PretrainedConfig

_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "bf16-autocast": 2}
"""Bytes per activation value. 'bf16-autocast' (torch.autocast) keeps fp32 weights, gradients and optimizer states."""

CUDA_CONTEXT_GIB: tuple[float, float] = (0.25, 0.5)
"""A typical range, in GiB, of the GPU memory a process's CUDA context (driver state, loaded kernels) takes.

Not a measurement: PyTorch's maintainers quote about 300 MB (pytorch/pytorch#107667) and 400 MB (#109888) for
CUDA 11.7 and later, which load kernels lazily (over 1 GB before); the range rounds those outward. It varies with
the driver, the card and the libraries loaded.
"""


LOSS_COPIES = 3
"""b*s*V tensors of the loss alive at once, counted: the logits, the shifted copy cross-entropy reads and its
log-probabilities in the forward pass; the log-probabilities and their gradients in the backward pass."""

LOSS_HELD = 3
"""b*s*V tensors more that the allocator held at the peak on this project's CPU (glibc's malloc keeping freed memory,
helpers.setup): measured (results/benchmarks/memory_peaks.json, notebook 10), not a property of the model."""


def loss_bytes(config: PretrainedConfig, *, batch: int, seq: int) -> int:
    """Return the bytes of the loss's b*s*V tensors at the peak, in fp32 whatever the precision (notebook 10)."""
    return (LOSS_COPIES + LOSS_HELD) * batch * seq * config.vocab_size * 4


def activation_bytes(config: PretrainedConfig, *, batch: int, seq: int, precision: str = "fp32",
                     checkpointing: bool = False, attention: str | None = None) -> int:
    """Return an estimate of the activations kept for backward, in bytes (used by training_memory, notebooks 00, 10).

    attention=None: Korthikanti et al. (2022)'s count for a Megatron-style block, about 34*s*b*h + 5*a*s^2*b bytes in
    16-bit (scaled here by the element size), with 2*b*s*V values for the logits and their gradient (notebook 00).

    attention="eager" or "sdpa" (any other name counts as fused): the tensors a Hugging Face Llama-style block
    (Llama, Qwen2, SmolLM2) saves for backward, counted per token with torch.autograd.graph.saved_tensors_hooks
    (tests/test_device_memory.py): each of its two RMSNorms keeps its input, the normalised input and its output (3h);
    attention keeps q, k, v and its output; the SwiGLU MLP keeps gate, up, act(gate) and their product (4 x
    intermediate_size). Eager attention repeats K and V to all a query heads (grouped-query attention saves nothing
    there) and keeps the a*s*s softmax probabilities. Fused attention keeps K and V at num_key_value_heads and no
    s*s tensor: PyTorch's CPU kernel saves query, key, value, output and one logsumexp per head and token
    (`_scaled_dot_product_flash_attention_for_cpu` in PyTorch's tools/autograd/derivatives.yaml), as flash attention
    does on a GPU. The loss adds loss_bytes: LOSS_COPIES tensors of b*s*V values, counted, and LOSS_HELD, measured.
    With gradient checkpointing each block keeps only its input (s*b*h values), and backward recomputes one block's
    activations at a time.
    """
    size = _BYTES[precision]
    h, a, layers = config.hidden_size, config.num_attention_heads, config.num_hidden_layers
    if attention is None:
        per_block = (34 * seq * batch * h + 5 * a * seq * seq * batch) * size / 2
        logits = 2 * batch * seq * config.vocab_size * size
    else:
        d = getattr(config, "head_dim", None) or h // a
        q, kv = a * d, getattr(config, "num_key_value_heads", None) or a
        inter = getattr(config, "intermediate_size", None) or 4 * h
        attn = 4 * q + a * seq if attention == "eager" else 2 * q + 2 * kv * d + a
        per_block = (6 * h + attn + 4 * inter) * seq * batch * size
        logits = loss_bytes(config, batch=batch, seq=seq)
    if checkpointing:
        return int(layers * seq * batch * h * size + per_block + logits)
    return int(layers * per_block + logits)


def training_memory(n_params: int, config: PretrainedConfig | None = None, *, trainable: int | None = None,
                    batch: int = 1, seq: int = 512, precision: str = "fp32", checkpointing: bool = False,
                    cuda_context: float = 0.0, step_temporaries: int = 0, attention: str | None = None) -> pd.Series:
    """Return GiB for weights, gradients, AdamW states, activations and their total (written out in notebook 00).

    `precision`: 'fp32'; 'bf16'/'fp16', weights and gradients in 16 bits; 'bf16-autocast', fp32 weights plus a row for
    the bf16 copies autocast holds. Two rows appear only when not zero: `cuda_context` in GiB (`CUDA_CONTEXT_GIB`),
    and `step_temporaries`, the values the optimizer step allocates beyond its states while it updates a tensor (an
    unfused AdamW holds several copies of the tensor it updates). `attention`: see activation_bytes.
    """
    if precision not in _BYTES:
        raise ValueError(f"Unknown precision {precision!r}; use one of {sorted(_BYTES)}.")
    if cuda_context < 0 or step_temporaries < 0:
        raise ValueError(f"cuda_context ({cuda_context}) and step_temporaries ({step_temporaries}) are sizes; "
                         "pass 0 or more.")
    trainable = n_params if trainable is None else trainable
    autocast = precision == "bf16-autocast"
    size = 4 if autocast else _BYTES[precision]
    parts = {
        "weights": n_params * size,
        "gradients": trainable * size,
        # AdamW keeps two fp32 moments per trainable parameter whatever the weights' precision.
        "AdamW states": trainable * 4 * 2,
        "activations": activation_bytes(config, batch=batch, seq=seq, precision=precision,
                                         checkpointing=checkpointing, attention=attention) if config else 0,
    }
    if autocast:
        # Autocast caches the bf16 copy of every trainable weight it casts until the forward/backward region ends.
        parts["bf16 weight copies"] = trainable * 2
    if cuda_context:
        parts["CUDA context"] = cuda_context * 2**30
    if step_temporaries:
        # An optimizer computes its update in the weights' precision.
        parts["optimizer-step temporaries"] = step_temporaries * size
    parts["total"] = sum(parts.values())
    return pd.Series({k: v / 2**30 for k, v in parts.items()}, name="GiB")
