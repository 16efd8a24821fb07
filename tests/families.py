"""Every causal-LM family of the installed transformers, built tiny from config: the shrinking rules and the lists."""
from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

from helpers import apply_strategy, count_parameters, find_layers, logits_full_sequence, logits_token_by_token  # noqa: E402
from helpers.lora import lora_parameter_count, lora_target_modules  # noqa: E402

MAPPING: dict[str, str] = dict(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
"""model_type -> causal-LM class name, as the installed transformers lists them."""

BLOCKS = 3
HIDDEN = 32
HEADS = 4
KV_HEADS = 2
HEAD_DIM = HIDDEN // HEADS
FFN = 64
VOCAB = 256
POSITIONS = 128

# Config keys by role. Only keys a family's default config already has are overridden.
_SIZES = {
    # blocks
    **dict.fromkeys(("num_hidden_layers", "n_layer", "num_layers", "n_layers", "num_blocks"), BLOCKS),
    # width
    **dict.fromkeys(("hidden_size", "n_embd", "d_model", "embedding_dim", "embedding_size", "embed_dim"), HIDDEN),
    **dict.fromkeys(("attention_hidden_size", "lru_width", "word_embed_proj_dim"), HIDDEN),
    # feed-forward
    **dict.fromkeys(("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size", "dense_intermediate_size",
                     "intermediate_size_mlp", "feed_forward_size", "dim_ff", "dff", "d_inner"), FFN),
    **dict.fromkeys(("moe_intermediate_size", "shared_expert_intermediate_size", "shared_intermediate_size",
                     "moe_shared_expert_intermediate_size", "shared_experts_intermediate_size",
                     "expert_ffn_hidden_size"), HIDDEN),
    # attention heads
    **dict.fromkeys(("num_attention_heads", "n_head", "num_heads", "n_heads", "attention_heads",
                     "swa_num_attention_heads"), HEADS),
    **dict.fromkeys(("num_key_value_heads", "num_kv_heads", "swa_num_key_value_heads", "num_query_groups"), KV_HEADS),
    **dict.fromkeys(("head_dim", "swa_head_dim", "attention_head_dim", "attention_head_size", "d_head", "dim_head",
                     "kv_channels"), HEAD_DIM),
    # multi-head latent attention (DeepSeek V2/V3 and their kin)
    "kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8,
    "qk_head_dim": 16, "index_head_dim": 8, "index_n_heads": 2, "index_topk": 4, "o_lora_rank": 16,
    # mixture of experts
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"), 4),
    **dict.fromkeys(("num_experts_per_tok", "moe_topk", "num_experts_per_token", "moe_k"), 2),
    **dict.fromkeys(("n_shared_experts", "num_shared_experts", "moe_num_shared_experts"), 1),
    **dict.fromkeys(("n_group", "topk_group", "num_expert_group"), 1),
    "first_k_dense_replace": 1, "num_dense_layers": 1,
    # linear attention and state-space layers
    "linear_key_head_dim": 8, "linear_value_head_dim": 8, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
    "linear_head_dim": 8, "linear_num_heads": 4,
    **dict.fromkeys(("mamba_d_state", "state_size", "ssm_state_size"), 8),
    **dict.fromkeys(("mamba_n_heads", "mamba_num_heads", "n_mamba_heads"), 4),
    **dict.fromkeys(("mamba_d_head", "mamba_head_dim", "mamba_headdim"), 16),
    **dict.fromkeys(("mamba_n_groups", "mamba_ngroups", "n_groups"), 1),
    **dict.fromkeys(("mamba_chunk_size", "chunk_size"), 16),
    **dict.fromkeys(("mamba_dt_rank", "time_step_rank"), 8),
    "mamba_d_ssm": 64,
    # vocabulary and positions
    **dict.fromkeys(("vocab_size", "unpadded_vocab_size", "pronunciation_vocab_size", "shape_vocab_size"), VOCAB),
    **dict.fromkeys(("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "context_length",
                     "max_target_positions"), POSITIONS),
    "num_nextn_predict_layers": 0,
}
_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "cls_token_id", "mask_token_id",
              "decoder_start_token_id", "forced_eos_token_id", "eod_token_id", "unk_index", "mask_index")

_NONE_SIZES = ("head_dim", "num_key_value_heads", "n_routed_experts", "num_experts", "num_experts_per_tok",
               "intermediate_size")
"""Keys whose default may be None (then the modeling code would fail on it) and that the generic rules still set."""

DROP = object()
"""An OVERRIDES value that removes a key from the generic overrides (the config then derives it)."""

# Per-family changes on top of the generic rules: extra keys, or keys whose generic value the family rejects.
OVERRIDES: dict[str, dict] = {
    # AXK2's sparse attention keeps index_topk keys per query, and its full-sequence and cached paths keep different
    # ones once a query has more candidates than that (transformers 5.24); above the test's 7 tokens both are dense.
    "axk2": {"index_topk": 16},
    # Hybrids whose default config has no attention layer at all (no KV cache works then): give them one.
    "bamba": {"attn_layer_indices": [1]},
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention", "linear_attention"]},
    # Rotary dimensions must fit in the 8-dimensional heads.
    "codegen": {"rotary_dim": 4},
    "gptj": {"rotary_dim": 4},
    # Rotary parameters per layer kind, with a multimodal rotary section that fits the heads.
    "cohere_compass_text": {"rope_parameters": {"full_attention": {
        "rope_type": "default", "rope_theta": 10_000.0, "mrope_section": [2, 1, 1]}}},
    # DBRX's sub-configs; its attention clamps q/k/v with clip_qkv and fails when that is None.
    "dbrx": {"attn_config": {"kv_n_heads": KV_HEADS, "rope_theta": 10_000.0, "clip_qkv": 8.0},
             "ffn_config": {"ffn_hidden_size": FFN, "moe_num_experts": 4, "moe_top_k": 2}},
    # One input, one looped and one output block; the layer kinds are derived from the count.
    "dory": {"n_input_layers": 1, "n_recurrent_layers": 1, "n_output_layers": 1, "layer_types": DROP},
    "dots1": {"n_shared_experts": 1},
    # One block with its own attention geometry, as the released model has: kept, tiny.
    "dots3_note_text": {"num_key_value_heads": HEADS, "per_layer_config": {"2": {
        "num_attention_heads": 2, "num_key_value_heads": 2, "q_lora_rank": 16, "kv_lora_rank": 16, "head_dim": 16,
        "qk_nope_head_dim": 8, "v_head_dim": 8, "qk_rope_head_dim": 8}}},
    # The last num_kv_shared_layers blocks reuse the caches of earlier blocks of the same kinds: four blocks, two of
    # each kind, the last two sharing.
    "gemma3n_text": {"num_hidden_layers": 4, "intermediate_size": [FFN] * 4, "num_kv_shared_layers": 2,
                     "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
                     "laurel_rank": 8, "vocab_size_per_layer_input": VOCAB, "hidden_size_per_layer_input": 8},
    "gemma4_text": {"vocab_size_per_layer_input": VOCAB, "hidden_size_per_layer_input": 8,
                    "per_layer_config": {"2": {"head_dim": 16}}},
    # One attention layer and one MoE layer among three (Jamba places them by period and offset).
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1},
    "lfm2_moe": {"layer_types": ["conv", "full_attention", "conv"]},
    # Mamba-2 needs hidden_size x expand == num_heads x head_dim.
    "mamba2": {"head_dim": 16},
    "qwen4_exp_text": {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 8, "indexer_budget": 8,
                       "indexer_compress_ratio": 2, "hc_lowrank": 8},
    # xLSTM sizes its cache from dimensions rounded up to multiples of 64 and its layers from the exact ones: make
    # them agree (32 x 2 = 64).
    "xlstm": {"qk_dim_factor": 2.0, "v_dim_factor": 2.0},
    # Zamba's shared attention reads the hidden state concatenated with the embeddings (twice as wide), and is
    # shared by at least two hybrid blocks.
    "zamba": {"attention_hidden_size": 2 * HIDDEN, "attention_head_dim": 2 * HEAD_DIM, "num_hidden_layers": 4,
              "layers_block_type": ["linear_attention", "hybrid", "linear_attention", "hybrid"]},
    "zamba2": {"attention_hidden_size": 2 * HIDDEN, "attention_head_dim": 2 * HEAD_DIM},
    "zaya": {"num_experts_per_tok": 1},
}

MAX_PARAMETERS = 2_000_000
"""A tiny model holds fewer parameters; a family the rules fail to shrink is refused before it fills the memory."""


def _representative(values: list, n: int) -> list:
    """Return `n` entries of a per-layer list that keep every distinct kind of layer (first of each kind first)."""
    firsts = sorted({str(v): i for i, v in reversed(list(enumerate(values)))}.values())
    keep = sorted(firsts[:n] + [i for i in range(len(values)) if i not in firsts][: max(0, n - len(firsts))])
    return [values[i] for i in keep]


def _config(model_type: str, **kwargs) -> transformers.PretrainedConfig:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoConfig.for_model(model_type, **kwargs)


_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def small_overrides(model_type: str) -> dict:
    """Return the config keyword arguments that make `model_type` tiny: few blocks, narrow, small vocabulary."""
    extra = OVERRIDES.get(model_type, {})
    default = _config(model_type).to_dict()
    out: dict = {}
    for key, value in default.items():
        is_int = isinstance(value, int) and not isinstance(value, bool)
        if key in _SIZES and (is_int or (value is None and key in _NONE_SIZES)):
            out[key] = _SIZES[key]
    # Keep the attention kind: multi-head (as many key/value heads as query heads), multi-query, or grouped.
    heads, kv = default.get("num_attention_heads"), default.get("num_key_value_heads")
    if "num_key_value_heads" in out and isinstance(heads, int) and isinstance(kv, int):
        out["num_key_value_heads"] = HEADS if kv == heads else 1 if kv == 1 else KV_HEADS
    for key in _TOKEN_IDS:
        value = default.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value >= VOCAB:
            out[key] = VOCAB - 1
        elif isinstance(value, list):
            out[key] = [v if v < VOCAB else VOCAB - 1 for v in value if isinstance(v, int)]
    out.update({k: v for k, v in extra.items() if v is not DROP})
    n_before = next((default[k] for k in _LAYER_KEYS if isinstance(default.get(k), int)), None)
    n_after = next((out[k] for k in _LAYER_KEYS if k in out), BLOCKS)
    # Per-layer lists (layer_types, mlp_layer_types, ...) that the config does not derive from the layer count
    # by itself: keep one layer of each kind. Lists a family overrides, or drops, stay as it says.
    try:
        shrunk = _config(model_type, **out).to_dict()
    except Exception:  # noqa: BLE001 - a validator rejecting the old list length; trim every per-layer list
        shrunk = default
    for key, value in default.items():
        if key in extra or key in out or not isinstance(value, list) or not n_before or len(value) != n_before:
            continue
        derived = shrunk.get(key)
        # A list the config derived from the new layer count is kept if it still has every kind of layer (a
        # hybrid whose one attention layer in four would otherwise vanish from three blocks).
        if isinstance(derived, list) and len(derived) == n_after and set(map(str, derived)) == set(map(str, value)):
            continue
        out[key] = _representative(value, n_after)
    return out


def tiny_config(model_type: str) -> transformers.PretrainedConfig:
    """Return the tiny config of `model_type`, built offline from its defaults and the shrinking rules."""
    return _config(model_type, **small_overrides(model_type))


@functools.lru_cache(maxsize=None)
def tiny_size(model_type: str) -> int:
    """Return the parameter count of the tiny `model_type`, counted on the meta device (no memory used)."""
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(tiny_config(model_type))
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def tiny_model(model_type: str, seed: int = 0) -> transformers.PreTrainedModel:
    """Return a freshly initialised tiny causal LM of `model_type` in eval mode, fp32, on the CPU."""
    size = tiny_size(model_type)
    if size > MAX_PARAMETERS:
        raise ValueError(f"{model_type}: the shrinking rules leave {size:,} parameters; add an entry to OVERRIDES.")
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_config(tiny_config(model_type), dtype=torch.float32).eval()


# --- which entries are tested, and why the others are not --------------------------------------------------------

_ENCODER = "an encoder (bidirectional, masked-LM) model that the mapping also offers as a decoder through is_decoder"
_ENC_DEC = "the decoder half of an encoder-decoder model; it expects cross-attention to an encoder"
MULTIMODAL = "multimodal: its config nests text, vision or audio sub-configs"
NOT_BUILT: dict[str, str] = {
    # encoders used as decoders
    **dict.fromkeys(("bert", "bert-generation", "big_bird", "camembert", "data2vec-text", "electra", "ernie",
                     "megatron-bert", "rembert", "roberta", "roberta-prelayernorm", "roc_bert", "roformer",
                     "xlm-roberta", "xlm-roberta-xl", "xmod"), _ENCODER),
    "xlm": "a cross-lingual masked/causal LM with language embeddings (XLMWithLMHeadModel), not a decoder-only stack",
    "xlnet": "a permutation LM with two attention streams and memory (mems) rather than a causal KV cache",
    "reformer": "LSH / chunked attention: inputs must be multiples of its chunk length and its cache is its own",
    # decoders of encoder-decoders
    **dict.fromkeys(("bart", "bigbird_pegasus", "blenderbot", "blenderbot-small", "marian", "mbart", "mvp", "pegasus",
                     "plbart", "prophetnet", "trocr", "whisper"), _ENC_DEC),
    **dict.fromkeys(("musicgen", "musicgen_melody"), "an audio-codebook decoder of a text-to-music model; "
                    "its config nests text-encoder and audio-encoder sub-configs"),
    # multimodal
    **dict.fromkeys(("dots3_note", "emu3", "fuyu", "gemma3", "gemma3n", "gemma4", "gemma4_unified", "git", "got_ocr2",
                     "llama4", "mllama", "moss_transcribe_diarize", "phi4_multimodal", "qwen3_5", "qwen3_5_moe",
                     "qwen4_exp"), MULTIMODAL),
    "blt": "byte-level: a patcher and local encoder/decoder around a global transformer (four sub-configs)",
    **dict.fromkeys(("gemma4_assistant", "gemma4_unified_assistant"),
                    "a speculative-decoding assistant: every layer reads the KV cache of a target Gemma 4 model"),
}
"""model_type -> why it is not built tiny and tested: not a text-only decoder, or not runnable alone."""

TESTED: frozenset[str] = frozenset("""
    afmoe apertus apertus1p5_text arcee aria_text axk1 axk2 bailing_hybrid bamba beam biogpt bitnet bloom
    codegen cohere cohere2 cohere2_moe cohere_compass_text cpmant ctrl cwm dbrx deepseek_v2 deepseek_v3
    deepseek_v32 deepseek_v4 diffllama doge dory dots1 dots3_note_text ernie4_5 ernie4_5_moe exaone exaone4
    exaone_moe falcon falcon_h1 falcon_mamba flex_olmo flint gemma gemma2 gemma3_text gemma3n_text gemma4_text
    gemma4_unified_text glm glm4 glm4_moe glm4_moe_lite glm_moe_dsa gpt-sw3 gpt2 gpt_bigcode gpt_neo gpt_neox
    gpt_neox_japanese gpt_oss gptj granite granite_swa granitemoe granitemoe_swa granitemoehybrid
    granitemoeshared helium hrm_text hunyuan_v1_dense hunyuan_v1_moe hy_v3 hy_v4 hyperclovax inkling2_loop_text
    inkling2_text inkling_text internlm3 iquestcoder jais2 jamba jetmoe kimi_linear kolibri1 laguna lara_mini
    lfm2 lfm2_moe lfm3 llama llama4_text longcat_flash mamba mamba2 mellum mimo_v2_flash minicpm3 minimax
    minimax_m2 minimax_m3_vl_text ministral ministral3 mistral mixtral modernbert-decoder moshi mpt nanochat
    nemotron nemotron_h olmo olmo2 olmo3 olmo_hybrid olmoe openai-gpt opt persimmon phi phi3 phimoe qwen2
    qwen2_moe qwen3 qwen3_5_moe_text qwen3_5_text qwen3_moe qwen3_next qwen4_exp_text recurrent_gemma rwkv
    sarvam_mla sarvam_moe seed_oss smollm3 solar_open stablelm starcoder2 vaultgemma xglm xlstm youtu zamba
    zamba2 zaya
""".split())
"""The families these lists were written against (transformers 5.24): each is built tiny and checked."""

BUILT: tuple[str, ...] = tuple(t for t in MAPPING if t in TESTED)
"""The model types built tiny and checked: the TESTED families the installed transformers still has."""

NEW: tuple[str, ...] = tuple(t for t in MAPPING if t not in TESTED and t not in NOT_BUILT)
"""Families a newer transformers added that these lists do not know yet: run and reported, never failing the suite."""

EXPECTED_FAILURES: dict[str, tuple[str, str]] = {
    "hrm_text": ("find_layers", "two stacks of blocks (L_module and H_module) run in nested reasoning cycles, "
                                "not one list of num_hidden_layers blocks"),
    "openai-gpt": ("kv_cache", "GPT-1 has no KV cache: its forward takes no cache"),
    "cpmant": ("kv_cache", "CPM-Ant keeps its prompt in the cache and returns no logits for a second single token"),
    "recurrent_gemma": ("kv_cache", "keeps its recurrent state inside its modules and returns no cache to pass on"),
}
"""model_type -> (the check it fails, why): built, but refused by our code with a ValueError naming the class."""


# --- an independent reading of each model: parameter names and one traced forward ---------------------------------

INPUT = torch.randint(3, VOCAB - 2, (1, 7), generator=torch.Generator().manual_seed(0))
"""The token ids every check feeds: one sequence of 7 tokens, clear of the special ids at both ends."""


@dataclass
class Oracle:
    """Where each tensor of a model sits, read from parameter names and a traced forward (not from find_layers)."""

    block_prefix: str
    n_blocks: int
    embeddings: set[str]
    final_norm: str | None
    head: str
    # id(tensor) -> every part it belongs to: 'embeddings', ('block', i), 'final norm', 'head' or 'other'
    parts: dict[int, set]
    tensors: dict[int, torch.nn.Parameter]


def _is_norm_class(module: torch.nn.Module) -> bool:
    return isinstance(module, (torch.nn.LayerNorm, torch.nn.RMSNorm)) or "norm" in type(module).__name__.lower()


def oracle(model: torch.nn.Module) -> Oracle:
    """Return the Oracle of a plain transformers causal LM."""
    named = list(model.named_parameters(remove_duplicate=False))
    # Blocks: the dotted prefix followed by indices 0..n-1 that holds the most parameters.
    indices: dict[str, set[int]] = {}
    sizes: dict[str, int] = {}
    for name, p in named:
        parts = name.split(".")
        for j, part in enumerate(parts[:-1]):
            if part.isdigit():
                prefix = ".".join(parts[:j])
                indices.setdefault(prefix, set()).add(int(part))
                sizes[prefix] = sizes.get(prefix, 0) + p.numel()
    contiguous = [k for k, v in indices.items() if v == set(range(len(v))) and len(v) >= 2]
    block_prefix = max(contiguous, key=lambda k: sizes[k])
    n_blocks = len(indices[block_prefix])
    modules = dict(model.named_modules())
    head_module = model.get_output_embeddings()
    head = next(n for n, m in modules.items() if m is head_module)
    token = model.get_input_embeddings()

    # The final norm: the first norm (outside blocks and head) whose forward ends after the last block's forward.
    events: list[str] = []
    hooks = []
    for name, module in modules.items():
        if name.startswith(block_prefix + ".") and name.count(".") == block_prefix.count(".") + 1:
            hooks.append(module.register_forward_hook(lambda *_: events.append("BLOCK")))
        elif (_is_norm_class(module) and not name.startswith(block_prefix + ".") and module is not token
              and not name.startswith(head + ".") and name != head):
            hooks.append(module.register_forward_hook(lambda *_, n=name: events.append(n)))
    try:
        with torch.no_grad():
            model(input_ids=INPUT, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    last_block = max(i for i, e in enumerate(events) if e == "BLOCK")
    after = [e for e in events[last_block + 1:] if e != "BLOCK"]
    # The model's own final norm sits beside the blocks; a norm inside a later module (a hyper-connection head's
    # input norm) counts only when there is none beside them.
    parent = block_prefix.rpartition(".")[0]
    beside = [e for e in after if e.rpartition(".")[0] == parent]
    final_norm = (beside or after or [None])[0]

    embedding_names = {n for n, m in modules.items() if isinstance(m, torch.nn.Embedding) and m.weight is not None
                       and not n.startswith(block_prefix + ".") and not n.startswith(head + ".") and n != head}
    result: dict[int, set] = {}
    tensors = {}
    for name, p in named:
        owner = name.rpartition(".")[0]
        tensors[id(p)] = p
        where = result.setdefault(id(p), set())
        if name.startswith(block_prefix + "."):
            where.add(("block", int(name[len(block_prefix) + 1:].split(".")[0])))
        elif owner in embedding_names or any(p is q for q in token.parameters()):
            where.add("embeddings")
        elif final_norm is not None and (owner == final_norm or owner.startswith(final_norm + ".")):
            where.add("final norm")
        elif owner == head or owner.startswith(head + "."):
            where.add("head")
        else:
            where.add("other")
    for p in head_module.parameters():
        result[id(p)].add("head")
    return Oracle(block_prefix, n_blocks, embedding_names | {next(n for n, m in modules.items() if m is token)},
                  final_norm, head, result, tensors)


# --- the checks, shared by tests/test_families.py and scripts/family_table.py ------------------------------------

STRATEGY_NAMES = ("full_fine_tuning", "freeze_embeddings", "freeze_lower_layers", "adapter_layers",
                  "gradual_unfreezing")
CHECKS = ("find_layers", "strategies", "lora", "kv_cache")
"""What each built family must pass, in the order the table reports the first failure."""


def families_for(check: str) -> list[str]:
    """Return the built model types that must pass `check`: all but those expected to fail it or an earlier check."""
    at = CHECKS.index(check)
    return [t for t in BUILT if t not in EXPECTED_FAILURES or CHECKS.index(EXPECTED_FAILURES[t][0]) > at]


def expected_trainable(o: Oracle, strategy: str) -> dict[int, bool]:
    """Return id(tensor) -> whether it trains under `strategy` with default options, by the rules the strategies state.

    A tensor shared by a frozen and a trained part stays frozen (a tied head with frozen embeddings), except under
    gradual unfreezing, whose first stage trains everything it holds (a tied embedding with the head).
    """
    n = o.n_blocks
    top = {"head", "final norm"}
    trains = {
        "full_fine_tuning": lambda part: True,
        "freeze_embeddings": lambda part: part != "embeddings",
        "freeze_lower_layers": lambda part: part in top or (isinstance(part, tuple) and part[1] >= round(n * 2 / 3)),
        "adapter_layers": lambda part: part in top or (isinstance(part, tuple) and part[1] >= n - 2),
        "gradual_unfreezing": lambda part: part in top or part == ("block", n - 1),
    }[strategy]
    combine = any if strategy == "gradual_unfreezing" else all
    return {i: combine(trains(part) for part in where) for i, where in o.parts.items()}


def check_find_layers(model: torch.nn.Module, o: Oracle | None = None) -> None:
    """Raise AssertionError unless find_layers reads `model` as the oracle does."""
    o = o or oracle(model)
    layers = find_layers(model)
    names = {id(m): n for n, m in model.named_modules()}
    token = model.get_input_embeddings()
    assert layers.embeddings[0] is token, "the first embedding is not get_input_embeddings()"
    assert {names[id(m)] for m in layers.embeddings} == o.embeddings, (
        f"embeddings {sorted(names[id(m)] for m in layers.embeddings)} != {sorted(o.embeddings)}")
    assert names[id(layers.blocks)] == o.block_prefix, f"blocks at {names[id(layers.blocks)]}, not {o.block_prefix}"
    assert len(layers.blocks) == o.n_blocks, f"{len(layers.blocks)} blocks, not {o.n_blocks}"
    found = names[id(layers.final_norm)] if layers.final_norm is not None else None
    assert found == o.final_norm, f"final norm {found}, not {o.final_norm}"
    assert layers.head is model.get_output_embeddings(), "head is not get_output_embeddings()"
    assert layers.tied == (model.get_output_embeddings().weight is token.weight), "tied flag wrong"


def _unique(model: torch.nn.Module) -> dict[int, torch.nn.Parameter]:
    return {id(p): p for _, p in model.named_parameters(remove_duplicate=False)}


def check_strategies(model_type: str) -> None:
    """Raise AssertionError unless every strategy sets requires_grad, and counts, as the oracle expects."""
    model = tiny_model(model_type)
    o = oracle(model)
    by_name = {id(p): n for n, p in model.named_parameters()}
    total = sum(p.numel() for p in {p.data_ptr(): p for p in _unique(model).values()}.values())
    for strategy in STRATEGY_NAMES:
        apply_strategy(model, strategy)
        expected = expected_trainable(o, strategy)
        wrong = [by_name[i] for i, p in o.tensors.items() if p.requires_grad != expected[i]]
        assert not wrong, f"{strategy}: requires_grad wrong on {wrong[:4]}{' ...' if len(wrong) > 4 else ''}"
        trainable = sum(o.tensors[i].numel() for i, flag in expected.items() if flag)
        assert count_parameters(model) == (trainable, total), (
            f"{strategy}: count_parameters {count_parameters(model)} != {(trainable, total)}")
    # Gradual unfreezing's optimizer groups hold every tensor exactly once.
    groups = model.strategy_info.param_groups(model, 1e-3)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(o.tensors), "gradual unfreezing's groups do not cover every tensor once"


def check_lora(model_type: str) -> None:
    """Raise AssertionError unless LoRA targets block projections only, trains only adapters and starts as identity."""
    model = tiny_model(model_type)
    o = oracle(model)
    targets = lora_target_modules(model)
    assert targets, "no LoRA targets"
    # Each target names (by peft's rule: the end of a qualified name) Linear / Conv1D modules inside the blocks.
    inside = [n for n, m in model.named_modules()
              if n.startswith(o.block_prefix + ".") and isinstance(m, (torch.nn.Linear, Conv1D))]
    missing = [t for t in targets if not any(n.endswith("." + t) for n in inside)]
    assert not missing, f"targets {missing} are not Linear/Conv1D inside the blocks"
    with torch.no_grad():
        before = model(input_ids=INPUT, use_cache=False).logits
    expected = lora_parameter_count(model, r=2)
    wrapped = apply_strategy(model, "lora", r=2, dropout=0.0)
    adapted = [n for n, m in wrapped.named_modules() if hasattr(m, "lora_A")]
    assert adapted, "peft adapted no module"
    outside = [n for n in adapted if f".{o.block_prefix}." not in f".{n}"]
    assert not outside, f"LoRA adapted modules outside the blocks: {outside[:3]}"
    wrong = [n for n, p in wrapped.named_parameters() if p.requires_grad != ("lora_" in n)]
    assert not wrong, f"requires_grad wrong under LoRA on {wrong[:4]}"
    assert count_parameters(wrapped)[0] == expected, f"LoRA trains {count_parameters(wrapped)[0]}, not {expected}"
    with torch.no_grad():
        after = wrapped(input_ids=INPUT, use_cache=False).logits
    assert (after - before).abs().max().item() <= 1e-5, "fresh LoRA adapters changed the logits"


def check_kv_cache(model_type: str) -> None:
    """Raise AssertionError unless token-by-token logits (with the KV cache) equal full-sequence logits."""
    model = tiny_model(model_type)
    with torch.no_grad():
        full = logits_full_sequence(model, INPUT)
        steps = logits_token_by_token(model, INPUT)
    assert full.shape == steps.shape, f"shapes {list(full.shape)} and {list(steps.shape)}"
    diff = (full - steps).abs().max().item()
    assert diff <= 1e-4, f"token-by-token logits differ from full-sequence ones by {diff:.2g}"


def run_checks(model_type: str) -> tuple[str, str]:
    """Return (result, detail) for the table: 'pass', or the first failing check and its error."""
    try:
        model = tiny_model(model_type)
    except Exception as e:  # noqa: BLE001 - reported, not raised
        return "not built", f"{type(e).__name__}: {e}"
    steps = {
        "find_layers": lambda: check_find_layers(model),
        "strategies": lambda: check_strategies(model_type),
        "lora": lambda: check_lora(model_type),
        "kv_cache": lambda: check_kv_cache(model_type),
    }
    for name in CHECKS:
        try:
            steps[name]()
        except Exception as e:  # noqa: BLE001 - reported, not raised
            return f"fails {name}", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return "pass", ""
