"""The corpus, its fixed splits, and the path from text to token blocks."""
import json

import pytest
import torch

import helpers
from helpers.data import SPLITS, default_corpus_path, default_general_path, deterministic_split


def test_rust_corpus_size_and_splits():
    corpus = helpers.load_corpus()
    docs = {s: len(getattr(corpus, s)) for s in SPLITS}
    assert docs == {"train": 29, "validation": 4, "test": 3}
    assert sum(len(d.encode()) for s in SPLITS for d in getattr(corpus, s)) >= 150_000
    names = [n for s in SPLITS for n in corpus.names[s]]
    assert len(names) == len(set(names)) >= 30, "a document sits in two splits"


def test_split_sizes_match_data_readme():
    corpus = helpers.load_corpus()
    readme = (default_corpus_path().parent / "README.md").read_text()
    for split in SPLITS:
        n_bytes = sum(len(d.encode()) for d in getattr(corpus, split))
        assert f"| {split} | {len(getattr(corpus, split))} | {n_bytes:,} |" in readme


def test_splits_json_lists_every_file_once():
    folder = default_corpus_path()
    listed = json.loads((folder / "splits.json").read_text())
    files = sorted(p.name for p in folder.glob("*.md"))
    assert sorted(n for s in SPLITS for n in listed[s]) == files


def test_other_folder_splits_deterministically_by_document(tmp_path):
    for i in range(10):
        (tmp_path / f"doc{i}.txt").write_text(f"document number {i} " * 5)
    a, b = helpers.load_corpus(tmp_path), helpers.load_corpus(tmp_path)
    assert a.names == b.names
    assert [len(a.names[s]) for s in SPLITS] == [8, 1, 1]
    assert not set(a.names["train"]) & set(a.names["test"])


def test_split_is_stable_when_files_are_added():
    before = deterministic_split([f"d{i}.md" for i in range(20)])
    after = deterministic_split([f"d{i}.md" for i in range(21)])
    moved = [n for n in before["train"] if n not in after["train"]]
    assert len(moved) <= 2


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: p / "missing", "does not exist"),
        (lambda p: p, "holds no .txt or .md files"),
    ],
)
def test_missing_or_empty_corpus_folder_is_named(tmp_path, setup, message):
    with pytest.raises((FileNotFoundError, ValueError), match=message):
        helpers.load_corpus(setup(tmp_path))


def test_non_utf8_file_is_named_with_a_fix(tmp_path):
    for i in range(3):
        (tmp_path / f"ok{i}.md").write_text("fine text")
    (tmp_path / "latin1.md").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.md is not UTF-8.*iconv"):
        helpers.load_corpus(tmp_path)


def test_empty_document_is_named(tmp_path):
    for i in range(3):
        (tmp_path / f"ok{i}.md").write_text("fine text")
    (tmp_path / "blank.md").write_text("  \n")
    with pytest.raises(ValueError, match="blank.md"):
        helpers.load_corpus(tmp_path)


def test_general_set_is_every_document_of_its_folder_in_name_order_and_its_readme_lists_them():
    folder = default_general_path()
    general = helpers.load_general()
    files = sorted(p for p in folder.glob("*.md") if p.name != "README.md")
    assert len(general) == len(files) >= 15 and general == [p.read_text() for p in files]
    readme = (folder / "README.md").read_text()
    for path in files:  # each document's row gives its UTF-8 bytes
        assert f"| `{path.name}` |" in readme and f"| {len(path.read_bytes()):,} |" in readme
    assert not any("fn main" in doc or "```" in doc for doc in general), "no code: prose outside programming"


def test_general_set_folder_problems_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="General-text folder .* does not exist"):
        helpers.load_general(tmp_path / "missing")
    (tmp_path / "README.md").write_text("not a document")
    with pytest.raises(ValueError, match="General-text folder .* holds no .txt or .md files"):
        helpers.load_general(tmp_path)


def test_tokenize_joins_documents_with_a_blank_line_and_no_special_tokens(tokenizer):
    ids = helpers.tokenize(tokenizer, ["ab", "cde"])
    assert ids.tolist() == [ord(c) for c in "ab\n\ncde"]
    assert tokenizer.eos_token_id not in ids.tolist()


def test_special_prefix_is_what_the_tokenizer_puts_in_front(tokenizer, bos_tokenizer):
    assert helpers.special_prefix(tokenizer) == []
    assert helpers.special_prefix(bos_tokenizer) == [bos_tokenizer.bos_token_id]
    assert bos_tokenizer("ab").input_ids == [bos_tokenizer.bos_token_id, ord("a"), ord("b")]


def test_blocks_start_with_the_prefix_and_hold_the_rest_of_the_text():
    blocks = helpers.make_blocks(torch.arange(10, 20), 4, prefix=[1])
    assert blocks.tolist() == [[1, 10, 11, 12], [1, 13, 14, 15], [1, 16, 17, 18]]
    with pytest.raises(ValueError, match="longer than the 1-token prefix"):
        helpers.make_blocks(torch.arange(10), 1, prefix=[1])


def test_training_blocks_follow_the_evaluation_rule(bos_tokenizer, text):
    batch = next(iter(helpers.make_dataloader(bos_tokenizer, text, block_size=16, batch_size=4, shuffle=False)))[0]
    bos = bos_tokenizer.bos_token_id
    assert (batch[:, 0] == bos).all() and not (batch[:, 1:] == bos).any()
    assert bos_tokenizer.eos_token_id not in batch.tolist()
    text_ids = helpers.tokenize(bos_tokenizer, text)
    assert batch[0, 1:].tolist() == text_ids[:15].tolist()


def test_make_blocks_drops_the_tail():
    blocks = helpers.make_blocks(torch.arange(10), 4)
    assert blocks.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_text_shorter_than_one_block_is_a_clear_error():
    with pytest.raises(ValueError, match="fewer than one block of 16.*smaller block_size"):
        helpers.make_blocks(torch.arange(10), 16)


def test_empty_text_is_a_clear_error(tokenizer):
    with pytest.raises(ValueError, match="No text given"):
        helpers.tokenize(tokenizer, ["", "  "])


def test_dataloader_is_reproducible(tokenizer, text):
    def first_batch():
        return next(iter(helpers.make_dataloader(tokenizer, text, block_size=16, batch_size=4, seed=3)))[0]

    a, b = first_batch(), first_batch()
    assert a.shape == (4, 16)
    assert torch.equal(a, b)
