"""Tiny random models from configs (GPT-2, Qwen2, Llama) and a tiny tokenizer: every test runs offline in seconds."""
from __future__ import annotations

import os

# Before transformers comes in: huggingface_hub reads it once, at import. Without it an unknown model name waits
# on the network's timeouts (46 s measured) before the offline error the tests expect.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors  # noqa: E402

transformers.logging.set_verbosity_error()

VOCAB = 256


def pytest_configure(config: pytest.Config) -> None:
    # `make unit` runs the fast tier (-m "not slow"); `make unit-all` and `make test` run these too.
    config.addinivalue_line(
        "markers", "slow: loads the real default model, launches a subprocess, or builds every transformers family")


def tiny_config(family: str) -> transformers.PretrainedConfig:
    """Return a 2-to-4-block config of `family` ('gpt2', 'qwen2' or 'llama') small enough for a unit test."""
    if family == "gpt2":
        return transformers.GPT2Config(
            vocab_size=VOCAB, n_positions=128, n_embd=32, n_layer=3, n_head=4, tie_word_embeddings=True,
        )
    if family == "qwen2":
        return transformers.Qwen2Config(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
        )
    if family == "llama":
        # Untied, unlike the other two, so both cases are covered.
        return transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
        )
    raise ValueError(family)


FAMILIES = ("gpt2", "qwen2", "llama")


def tiny_model(family: str, seed: int = 0) -> transformers.PreTrainedModel:
    """Return a freshly initialised tiny causal LM of `family` in eval mode, fp32, on the CPU."""
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(family)).eval()


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def model(family) -> transformers.PreTrainedModel:
    return tiny_model(family)


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer with VOCAB ids, built locally (no Hub): one id per Latin-1 character, plus EOS."""
    return char_tokenizer(bos=False)


def char_tokenizer(*, bos: bool) -> PreTrainedTokenizerFast:
    """Return a character-level tokenizer with VOCAB ids; with `bos`, it puts <s> (id 1) in front of every text by
    default, as Llama-2/3, Gemma and Mistral tokenizers do."""
    vocab = {chr(i): i for i in range(2 if bos else 1, VOCAB - 1)}
    vocab["<unk>"], vocab["</s>"] = 0, VOCAB - 1
    if bos:
        vocab["<s>"] = 1
    # WordLevel over single characters keeps ids < VOCAB; characters above U+00FE map to <unk>.
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", 1)])
    special = {"bos_token": "<s>"} if bos else {}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", **special)
    fast.pad_token = fast.eos_token
    return fast


def save_reader_model(folder, family: str, *, bos: bool) -> str:
    """Save in `folder` a tiny model of `family` and a char tokenizer (with or without BOS), with the recipe's
    256-token context, as a reader's own model would be saved for TUTORIAL_MODEL; return the folder's path."""
    config = tiny_config(family)
    setattr(config, "n_positions" if family == "gpt2" else "max_position_embeddings", 512)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    char_tokenizer(bos=bos).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def bos_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer that adds a BOS token by default (id 1), like Llama's."""
    return char_tokenizer(bos=True)


@pytest.fixture
def text() -> str:
    return (
        "fn main() { let owner = String::from(\"value\"); let borrowed = &owner; println!(\"{borrowed}\"); }\n"
        "Ownership moves the value; borrowing lends it without moving. "
    ) * 6


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny training runs: on a busy 2-core machine a second thread mostly waits
    for the first (runs measured 40 to 100 times slower beside a training process)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
