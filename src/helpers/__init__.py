"""Helpers for the notebooks on transfer learning with pretrained causal language models.

Each public function's first docstring line says what it does and which notebook writes it out or first uses it.
The names below load on first use (PEP 562), so a notebook pays only for what it touches (pandas, peft cost seconds).
"""
from __future__ import annotations

import importlib
from pathlib import Path

_EXPORTS: dict[str, tuple[str, ...]] = {
    "chapter": ("StrategyRun", "prepare_run", "setup"),
    "data": ("DOCUMENT_SEPARATOR", "Corpus", "load_corpus", "load_general", "make_blocks", "make_dataloader",
             "special_prefix", "tokenize"),
    "device": ("available_devices", "device_report", "get_device", "keep_freed_memory", "matmul_gflops",
               "training_matmuls"),
    "evaluation": ("generate", "perplexity", "token_nll", "window_perplexities"),
    "experiment": ("baseline_perplexity", "choose_learning_rate", "complete", "evaluate_splits", "load_results",
                   "make_result", "recipe_config", "recipe_data", "results_dir", "save_result"),
    "kv_cache": ("StatefulLM", "cache_growth", "cache_nbytes", "cache_table", "fill_cache", "generation_speed",
                 "greedy_generate", "kv_bytes_per_token", "kv_geometry", "logits_frozen_position",
                 "logits_full_sequence", "logits_stale_cache", "logits_token_by_token", "next_token_perplexity",
                 "time_forward_backward", "timing_sweep"),
    "lora": ("LORA_DEFAULTS", "lora_parameter_count", "lora_target_modules", "merge_lora"),
    "memory": ("CUDA_CONTEXT_GIB", "training_memory"),
    "models": ("DEFAULT_MODEL", "cache_dir", "checkpoint_tensor_names", "default_model_name", "heads_are_tied",
               "is_default_model", "load_config", "load_model", "meta_model", "quiet_transformers",
               "qwen2_0_5b_config", "with_random_head"),
    "plotting": ("plot_history", "plot_timing", "plot_trainable_map", "plot_windows", "show_figure"),
    "recipe": ("LEARNING_RATES", "PROMPT", "RECIPE"),
    "registry": ("STRATEGIES", "apply_strategy", "register_strategy", "strategy_counts", "strategy_options"),
    "strategies": ("LayerMap", "StrategyInfo", "count_parameters", "count_tensors", "describe_layers", "find_layers",
                   "trainable_map"),
    "training": ("TrainConfig", "changed_tensors", "frozen_snapshot", "load_trained", "save_full", "save_trained",
                 "train", "train_strategy"),
    "unfreezing": ("UNFREEZING_DEFAULTS", "GradualUnfreezing", "unfreezing_stages"),
}
"""Module -> the names `helpers.<name>` gives; every other name is reached through its module, `helpers.compare.x`."""

_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = list(_WHERE)


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        if name.isidentifier() and Path(__file__).with_name(f"{name}.py").is_file():
            return importlib.import_module(f".{name}", __name__)  # `helpers.compare.main` with no import first
        raise AttributeError(f"module 'helpers' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
