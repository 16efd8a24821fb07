"""The corpus, its fixed splits, and the path from text to fixed-length token blocks."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset
from transformers import PreTrainedTokenizerBase

SPLITS = ("train", "validation", "test")
_SUFFIXES = {".txt", ".md"}


def default_corpus_path() -> Path:
    """Return the folder of the bundled Rust-concepts corpus, data/rust_concepts (notebook 01)."""
    return Path(__file__).resolve().parents[2] / "data" / "rust_concepts"


def default_general_path() -> Path:
    """Return the folder of the general-English held-out set, data/general_english (notebook 01)."""
    return Path(__file__).resolve().parents[2] / "data" / "general_english"


@dataclass
class Corpus:
    """Documents split by document into train, validation and test; `names` maps splits to files (notebook 01)."""

    train: list[str]
    validation: list[str]
    test: list[str]
    names: dict[str, list[str]] = field(default_factory=dict)

    def summary(self) -> dict[str, dict[str, int]]:
        """Return documents and characters per split (first used in notebook 03)."""
        return {s: {"documents": len(getattr(self, s)), "characters": sum(map(len, getattr(self, s)))} for s in SPLITS}


def _read_utf8(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path} is not UTF-8 (bad byte at offset {err.start}). Re-save it as UTF-8, "
            "for example with `iconv -f latin1 -t utf-8`, or remove it from the corpus folder."
        ) from None


def deterministic_split(names: list[str]) -> dict[str, list[str]]:
    """Return file names split 80/10/10 into train/validation/test by a hash of each name (load_corpus, notebook 01)."""
    if len(names) < 3:
        raise ValueError("A corpus needs at least 3 documents to split into train/validation/test; "
                         f"found {len(names)}.")
    ordered = sorted(names, key=lambda n: hashlib.sha256(n.encode()).hexdigest())
    n_val = max(1, round(len(ordered) * 0.1))
    n_test = max(1, len(ordered) - round(len(ordered) * 0.8) - n_val)
    n_train = len(ordered) - n_val - n_test
    return {
        "train": sorted(ordered[:n_train]),
        "validation": sorted(ordered[n_train : n_train + n_val]),
        "test": sorted(ordered[n_train + n_val :]),
    }


def _read_documents(folder: Path, what: str) -> dict[str, str]:
    """Return {file name: text} of the .txt/.md documents in `folder` (README.md aside), in name order."""
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{what} folder {folder} does not exist. Pass path= a folder of .txt/.md files, "
            f"or path=None for the bundled one (under data/ in a clone of the repository)."
        )
    files = sorted(p for p in folder.iterdir()
                   if p.suffix in _SUFFIXES and p.is_file() and p.name.lower() != "readme.md")
    if not files:
        raise ValueError(f"{what} folder {folder} holds no .txt or .md files. Add one document per file.")
    texts = {p.name: _read_utf8(p) for p in files}
    empty = [n for n, t in texts.items() if not t.strip()]
    if empty:
        raise ValueError(f"{what} documents {empty} in {folder} are empty. Remove them or add text.")
    return texts


def load_general(path: str | Path | None = None) -> list[str]:
    """Return the documents of the general-English held-out set (default: data/general_english) (notebook 01).

    Scored whole, never trained on and never used for a choice: it measures what fine-tuning forgets.
    """
    folder = Path(path).expanduser() if path is not None else default_general_path()
    return list(_read_documents(folder, "General-text").values())


def load_corpus(path: str | Path | None = None) -> Corpus:
    """Return the corpus at `path` (default: the Rust corpus) split by document (first used in notebook 01)."""
    folder = Path(path).expanduser() if path is not None else default_corpus_path()
    texts = _read_documents(folder, "Corpus")
    split_file = folder / "splits.json"
    if split_file.is_file():
        splits = json.loads(split_file.read_text())
        listed = [n for s in SPLITS for n in splits.get(s, [])]
        if sorted(listed) != sorted(texts):
            missing, extra = set(texts) - set(listed), set(listed) - set(texts)
            raise ValueError(
                f"{split_file} does not match the files in {folder}: not listed {sorted(missing)}, "
                f"listed but missing or listed twice {sorted(extra) or 'duplicates'}. Fix splits.json or delete it "
                "to split by the deterministic rule."
            )
    else:
        splits = deterministic_split(list(texts))
    return Corpus(*[[texts[n] for n in splits[s]] for s in SPLITS], names={s: list(splits[s]) for s in SPLITS})


DOCUMENT_SEPARATOR = "\n\n"
"""What joins documents into one text: a blank line, as the transformers perplexity guide joins its test set."""


def special_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Return the special-token ids the tokenizer puts before every text, [BOS] or nothing (written out in notebook 01).

    Llama-2/3, Gemma and Mistral tokenizers add a BOS; GPT-2, Qwen2 and SmolLM2 nothing. The one rule of every helper,
    in evaluation and training alike: the text is tokenized without special tokens (no chat turn-end such as
    ``<|im_end|>``, no appended EOS), documents joined by DOCUMENT_SEPARATOR, and every window or block starts with
    this prefix as unscored context, as in pre-training.
    """
    probe = "a b"
    with_special = list(tokenizer(probe)["input_ids"])
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start : start + len(plain)] == plain:
            return with_special[:start]
    # A tokenizer whose special tokens change how the text itself splits: fall back on its declared BOS.
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and with_special[:1] == [bos] and plain[:1] != [bos] else []


def tokenize(tokenizer: PreTrainedTokenizerBase, texts: str | list[str]) -> torch.Tensor:
    """Return the 1-D token ids of `texts`, documents joined by a blank line, no special tokens (notebook 01)."""
    docs = [texts] if isinstance(texts, str) else list(texts)
    if not any(d.strip() for d in docs):
        raise ValueError("No text given: pass a non-empty string or list of documents.")
    # verbose=False: the whole corpus is longer than a model's window on purpose; it is cut into windows later.
    ids = tokenizer(DOCUMENT_SEPARATOR.join(docs), add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def make_blocks(ids: torch.Tensor, block_size: int, prefix: list[int] | tuple[int, ...] = ()) -> torch.Tensor:
    """Return [n_blocks, block_size] rows of `prefix` then consecutive text tokens, tail dropped (notebook 02)."""
    n_text = block_size - len(prefix)
    if block_size < 2 or n_text < 1:
        raise ValueError(
            f"block_size must be at least 2 (one input and one target) and longer than the {len(prefix)}-token "
            f"prefix; got {block_size}."
        )
    n = ids.numel() // n_text
    if n == 0:
        raise ValueError(f"The text has {ids.numel()} tokens, fewer than one block of {block_size}. "
                         "Use a smaller block_size or more text.")
    blocks = ids[: n * n_text].view(n, n_text)
    if prefix:
        blocks = torch.cat([torch.tensor(list(prefix), dtype=ids.dtype).expand(n, -1), blocks], dim=1)
    return blocks


def make_dataloader(tokenizer: PreTrainedTokenizerBase, texts: str | list[str], *, block_size: int = 128,
                    batch_size: int = 4, shuffle: bool = True, seed: int = 0) -> DataLoader:
    """Return a DataLoader of [batch, block_size] blocks of `texts`, each led by the special prefix (notebook 03)."""
    blocks = make_blocks(tokenize(tokenizer, texts), block_size, special_prefix(tokenizer))
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(blocks), batch_size=batch_size, shuffle=shuffle, generator=generator)
