"""Helpers for the notebooks on transfer learning with pretrained causal language models.

Every notebook imports this package; each public function has a one-line docstring saying what it returns.

The submodules load on first use (PEP 562): `import helpers` itself only tunes the CPU allocator, so `--help`,
`helpers.load_model()` and every notebook pay only for what they touch (peft, pandas and matplotlib cost seconds).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# First and eagerly: the allocator setting must be in place before the first large tensor is allocated.
from .device import CPU_MEMORY_KEPT, available_devices, device_report, get_device, keep_freed_memory, matmul_gflops

_EXPORTS: dict[str, tuple[str, ...]] = {
    "chapter": (
        "StrategyRun", "setup", "start_run",
    ),
    "data": (
        "DOCUMENT_SEPARATOR", "Corpus", "load_corpus", "make_blocks", "make_dataloader", "special_prefix", "tokenize",
    ),
    "evaluation": (
        "generate", "perplexity", "token_nll", "window_perplexities",
    ),
    "device": (
        "training_matmuls",
    ),
    "memory": (
        "CUDA_CONTEXT_GIB", "training_memory",
    ),
    "models": (
        "DEFAULT_MODEL", "cache_dir", "checkpoint_tensor_names", "default_model_name", "heads_are_tied",
        "load_config", "load_model", "meta_model", "quiet_transformers", "qwen2_0_5b_config",
        "with_random_head",
    ),
    "experiment": (
        "PROMPT", "RECIPE", "baseline_perplexity", "complete", "evaluate_splits", "load_results", "make_result",
        "recipe_config", "recipe_data", "results_dir", "run_experiment", "save_result",
    ),
    "plotting": (
        "plot_history", "plot_timing", "plot_trainable_map", "plot_windows",
    ),
    "strategies": (
        "BASE_STRATEGIES", "STRATEGIES", "LayerMap", "StrategyInfo", "apply_strategy", "count_parameters",
        "count_tensors", "describe_layers", "find_layers", "register_strategy", "strategy_counts",
        "trainable_map",
    ),
    "training": (
        "TrainConfig", "changed_tensors", "frozen_snapshot", "load_trained", "save_full", "save_trained", "train",
    ),
    "lora": (
        "LORA_DEFAULTS", "lora_parameter_count", "lora_target_modules", "merge_lora",
    ),
    "unfreezing": (
        "UNFREEZING_DEFAULTS", "GradualUnfreezing", "unfreezing_stages",
    ),
    "kv_cache": (
        "StatefulLM", "cache_growth", "cache_nbytes", "cache_table", "fill_cache", "generation_speed",
        "greedy_generate", "kv_bytes_per_token", "kv_geometry", "logits_frozen_position",
        "logits_full_sequence", "logits_stale_cache", "logits_token_by_token", "next_token_perplexity",
        "time_forward_backward", "timing_sweep",
    ),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = [
    "CPU_MEMORY_KEPT", "available_devices", "device_report", "get_device", "keep_freed_memory", "matmul_gflops",
    *_WHERE,
]


_SUBMODULES = {*_EXPORTS, "compare", "finetune", "recipe", "sweep", "sweep_results", "widgets"}


def __getattr__(name: str):
    if name in _SUBMODULES:  # `helpers.compare.main` works without importing helpers.compare first
        return importlib.import_module(f".{name}", __name__)
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'helpers' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # editors and type checkers see the plain imports
    from .chapter import (
        StrategyRun, setup, start_run,
    )
    from .data import (
        DOCUMENT_SEPARATOR, Corpus, load_corpus, make_blocks, make_dataloader, special_prefix, tokenize,
    )
    from .evaluation import (
        generate, perplexity, token_nll, window_perplexities,
    )
    from .device import (
        training_matmuls,
    )
    from .memory import (
        CUDA_CONTEXT_GIB, training_memory,
    )
    from .models import (
        DEFAULT_MODEL, cache_dir, checkpoint_tensor_names, default_model_name, heads_are_tied, load_config,
        load_model, meta_model, quiet_transformers, qwen2_0_5b_config, with_random_head,
    )
    from .experiment import (
        PROMPT, RECIPE, baseline_perplexity, complete, evaluate_splits, load_results, make_result, recipe_config,
        recipe_data, results_dir, run_experiment, save_result,
    )
    from .plotting import (
        plot_history, plot_timing, plot_trainable_map, plot_windows,
    )
    from .strategies import (
        BASE_STRATEGIES, STRATEGIES, LayerMap, StrategyInfo, apply_strategy, count_parameters, count_tensors,
        describe_layers, find_layers, register_strategy, strategy_counts, trainable_map,
    )
    from .training import (
        TrainConfig, changed_tensors, frozen_snapshot, load_trained, save_full, save_trained, train,
    )
    from .lora import (
        LORA_DEFAULTS, lora_parameter_count, lora_target_modules, merge_lora,
    )
    from .unfreezing import (
        UNFREEZING_DEFAULTS, GradualUnfreezing, unfreezing_stages,
    )
    from .kv_cache import (
        StatefulLM, cache_growth, cache_nbytes, cache_table, fill_cache, generation_speed, greedy_generate,
        kv_bytes_per_token, kv_geometry, logits_frozen_position, logits_full_sequence, logits_stale_cache,
        logits_token_by_token, next_token_perplexity, time_forward_backward, timing_sweep,
    )
