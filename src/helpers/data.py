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
    """Return the folder of the bundled Rust-concepts corpus (data/rust_concepts in the repository)."""
    return Path(__file__).resolve().parents[2] / "data" / "rust_concepts"


@dataclass
class Corpus:
    """Documents split by document into train, validation and test; `names` maps each split to file names."""

    train: list[str]
    validation: list[str]
    test: list[str]
    names: dict[str, list[str]] = field(default_factory=dict)

    def summary(self) -> dict[str, dict[str, int]]:
        """Return documents and characters per split."""
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


def deterministic_split(names: list[str], *, fractions: tuple[float, float] = (0.8, 0.1)) -> dict[str, list[str]]:
    """Return file names split into train/validation/test by a hash of each name (stable as files are added)."""
    if len(names) < 3:
        raise ValueError(f"A corpus needs at least 3 documents to split into train/validation/test; found {len(names)}.")
    ordered = sorted(names, key=lambda n: hashlib.sha256(n.encode()).hexdigest())
    n_val = max(1, round(len(ordered) * fractions[1]))
    n_test = max(1, len(ordered) - round(len(ordered) * fractions[0]) - n_val)
    n_train = len(ordered) - n_val - n_test
    return {
        "train": sorted(ordered[:n_train]),
        "validation": sorted(ordered[n_train : n_train + n_val]),
        "test": sorted(ordered[n_train + n_val :]),
    }


def load_corpus(path: str | Path | None = None) -> Corpus:
    """Return the corpus at `path` (default: the Rust corpus) split by document, using splits.json when present."""
    folder = Path(path).expanduser() if path is not None else default_corpus_path()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"Corpus folder {folder} does not exist. Pass path= a folder of .txt/.md files, "
            "or path=None for the bundled Rust corpus (data/rust_concepts in a clone of the repository)."
        )
    files = sorted(p for p in folder.iterdir() if p.suffix in _SUFFIXES and p.is_file() and p.name.lower() != "readme.md")
    if not files:
        raise ValueError(f"Corpus folder {folder} holds no .txt or .md files. Add one document per file.")
    texts = {p.name: _read_utf8(p) for p in files}
    empty = [n for n, t in texts.items() if not t.strip()]
    if empty:
        raise ValueError(f"Corpus documents {empty} in {folder} are empty. Remove them or add text.")
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


def as_list(texts: str | list[str]) -> list[str]:
    """Return `texts` as a list of documents, rejecting an empty input."""
    docs = [texts] if isinstance(texts, str) else list(texts)
    if not docs or not any(d.strip() for d in docs):
        raise ValueError("No text given: pass a non-empty string or list of documents.")
    return docs


def tokenize(tokenizer: PreTrainedTokenizerBase, texts: str | list[str]) -> torch.Tensor:
    """Return one 1-D tensor of token ids: the documents concatenated, each followed by EOS."""
    docs = as_list(texts)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        ids.extend(eos)
    return torch.tensor(ids, dtype=torch.long)


def make_blocks(ids: torch.Tensor, block_size: int) -> torch.Tensor:
    """Return a [n_blocks, block_size] tensor of consecutive non-overlapping blocks (the tail is dropped)."""
    if block_size < 2:
        raise ValueError(f"block_size must be at least 2 (one input and one target); got {block_size}.")
    n = ids.numel() // block_size
    if n == 0:
        raise ValueError(
            f"The text has {ids.numel()} tokens, fewer than one block of {block_size}. "
            "Use a smaller block_size or more text."
        )
    return ids[: n * block_size].view(n, block_size)


def make_dataloader(
    tokenizer: PreTrainedTokenizerBase,
    texts: str | list[str],
    *,
    block_size: int = 128,
    batch_size: int = 4,
    shuffle: bool = True,
    seed: int = 0,
) -> DataLoader:
    """Return a DataLoader of [batch, block_size] token blocks made from `texts`, shuffled reproducibly."""
    blocks = make_blocks(tokenize(tokenizer, texts), block_size)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(blocks), batch_size=batch_size, shuffle=shuffle, generator=generator)
