"""Helpers for the notebooks on transfer learning with pretrained causal language models.

Every notebook imports this package; each public function has a one-line docstring saying what it returns.
"""
from .data import Corpus, load_corpus, make_blocks, make_dataloader, tokenize
from .device import CPU_MEMORY_KEPT, available_devices, device_report, get_device, keep_freed_memory, matmul_gflops
from .evaluation import generate, perplexity, token_nll, window_perplexities
from .memory import training_memory
from .models import (
    DEFAULT_MODEL,
    cache_dir,
    checkpoint_tensor_names,
    default_model_name,
    heads_are_tied,
    load_config,
    load_model,
    meta_model,
    quiet_transformers,
    qwen2_0_5b_config,
    with_random_head,
)
from .experiment import (
    PROMPT,
    RECIPE,
    baseline_perplexity,
    complete,
    evaluate_splits,
    load_results,
    make_result,
    recipe_config,
    recipe_data,
    results_dir,
    run_experiment,
    save_result,
)
from .plotting import plot_history, plot_timing, plot_trainable_map
from .strategies import (
    BASE_STRATEGIES,
    STRATEGIES,
    LayerMap,
    StrategyInfo,
    apply_strategy,
    count_parameters,
    count_tensors,
    describe_layers,
    find_layers,
    register_strategy,
    strategy_counts,
    trainable_map,
)
from .training import (
    TrainConfig,
    changed_tensors,
    frozen_snapshot,
    load_trained,
    save_full,
    save_trained,
    train,
)
from .lora import LORA_DEFAULTS, lora_parameter_count, lora_target_modules, merge_lora
from .unfreezing import UNFREEZING_DEFAULTS, GradualUnfreezing, unfreezing_stages
from .kv_cache import (
    StatefulLM,
    cache_growth,
    cache_nbytes,
    cache_table,
    fill_cache,
    generation_speed,
    greedy_generate,
    kv_bytes_per_token,
    kv_geometry,
    logits_frozen_position,
    logits_full_sequence,
    logits_stale_cache,
    logits_token_by_token,
    next_token_perplexity,
    time_forward_backward,
    timing_sweep,
)

__all__ = [
    "Corpus", "load_corpus", "make_blocks", "make_dataloader", "tokenize",
    "CPU_MEMORY_KEPT", "available_devices", "device_report", "get_device", "keep_freed_memory", "matmul_gflops",
    "generate", "perplexity", "token_nll", "window_perplexities",
    "training_memory",
    "DEFAULT_MODEL", "cache_dir", "checkpoint_tensor_names", "default_model_name", "heads_are_tied", "load_config",
    "load_model", "meta_model",
    "quiet_transformers", "qwen2_0_5b_config", "with_random_head",
    "PROMPT", "RECIPE", "baseline_perplexity", "load_results", "recipe_config", "recipe_data", "results_dir",
    "run_experiment", "save_result", "complete", "evaluate_splits", "make_result",
    "plot_history", "plot_timing", "plot_trainable_map",
    "STRATEGIES", "LayerMap", "StrategyInfo", "apply_strategy", "count_parameters", "count_tensors", "find_layers",
    "register_strategy", "trainable_map", "BASE_STRATEGIES", "describe_layers", "strategy_counts",
    "TrainConfig", "load_trained", "save_full", "save_trained", "train", "changed_tensors", "frozen_snapshot",
    "LORA_DEFAULTS", "lora_parameter_count", "lora_target_modules", "merge_lora",
    "UNFREEZING_DEFAULTS", "GradualUnfreezing", "unfreezing_stages",
    "StatefulLM", "cache_growth", "cache_nbytes", "cache_table", "fill_cache", "generation_speed", "greedy_generate",
    "kv_bytes_per_token", "kv_geometry", "logits_frozen_position", "logits_full_sequence", "logits_stale_cache",
    "logits_token_by_token", "next_token_perplexity", "time_forward_backward", "timing_sweep",
]
