"""helpers.sweep on tiny models: the grid's files, resuming, the report's protocol, refusals, data, command line."""
from __future__ import annotations

import importlib.metadata
import json
import math
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from unittest import mock

import pytest
import torch

from transformers import AutoModelForCausalLM

import helpers
from helpers import sweep as sweep_module
from helpers.data import Corpus
from helpers.sweep import (
    REPORT_STRATEGIES, Sweep, SweepSpec, blocks_read, choose_lr, code_hash, commit_results, main,
    plan_steps, subset,
)

from conftest import char_tokenizer, tiny_config, tiny_model

ROOT = Path(__file__).resolve().parents[1]
RUST = (
    "fn main() { let owner = String::from(\"value\"); let borrowed = &owner; println!(\"{borrowed}\"); }\n"
    "Ownership moves the value; borrowing lends it without moving. "
)
CORPUS = Corpus(train=[RUST * 4, RUST * 3], validation=[RUST * 2], test=[RUST])
GENERAL = ["The tide comes in twice a day, and the boats rest on the sand between. " * 3,
           "Bread rises while the dough rests in a warm kitchen. " * 3]
# Selection seed 0 chooses among three rates (one more beyond an edge, once); seeds 1 and 2 are scored; a depth
# variant of freeze_lower_layers (1 of the tiny model's 3 blocks frozen, against its default 2) runs at size 64.
SPEC = SweepSpec(sizes={"8": 8, "64": 64}, strategies=("full_fine_tuning", "freeze_lower_layers"), seeds=2,
                 lrs=(1e-4, 5e-4, 2.5e-3), edge_steps=1, depths={"freeze_lower_layers": (1,)}, depth_sizes=("64",),
                 block_size=32, val_blocks=2, max_tokens=512, eval_every=4, report_draws=2, eval_block_size=64)
CELLS = SPEC.cells()
TIMING = {"seconds", "train_seconds"}
TOKENIZER = char_tokenizer(bos=False)


def new_sweep(out: Path, spec: SweepSpec = SPEC, corpus: Corpus = CORPUS) -> Sweep:
    return Sweep(out, spec, model_and_tokenizer=(tiny_model("qwen2"), TOKENIZER), corpus_data=corpus,
                 general_data=GENERAL, progress=False)


def cell_counts(out: Path) -> dict[tuple[str, str], int]:
    return {(size, s): len(list((out / "runs" / size / s).glob("*.json"))) for size, s in CELLS}


def result_files(out: Path, part: str) -> dict[str, dict]:
    """Return {path relative to out: JSON} of every result file of `part` ('runs' or 'report')."""
    return {str(p.relative_to(out)): json.loads(p.read_text()) for p in sorted((out / part).rglob("*.json"))}


def assert_same_numbers(a, b, where: str = "") -> None:
    """Assert two JSON values are equal, numbers to rel 1e-6, timing fields ignored."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) - TIMING == set(b) - TIMING, where
        for key in set(a) - TIMING:
            assert_same_numbers(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_numbers(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and not isinstance(b, bool):
        assert b == pytest.approx(a, rel=1e-6), where
    else:
        assert a == b, where


@contextmanager
def killed_after(k: int):
    """Raise KeyboardInterrupt, as a kill would, when the sweep next saves a result after saving k new files."""
    write, new = sweep_module._write, []

    def killing_write(path: Path, data: dict) -> None:
        if path.name not in ("sweep.json", "baseline.json"):
            if len(new) == k:
                raise KeyboardInterrupt
            if not path.exists():
                new.append(path)
        write(path, data)

    with mock.patch.object(sweep_module, "_write", killing_write), pytest.raises(KeyboardInterrupt):
        yield


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny runs, one torch thread


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A sweep run from start to end without interruption: the grid, then the report's protocol."""
    out = tmp_path_factory.mktemp("sweep") / "ref"
    sweep = new_sweep(out)
    assert sweep.run_grid() == len(list((out / "runs").rglob("*.json")))
    assert sweep.run_report() == SPEC.report_draws
    return out


# --- 1. the grid's files ----------------------------------------------------------------------------------------------

REQUIRED = ("strategy", "lr", "seed", "size", "train_tokens", "offset", "trainable_params", "max_steps", "steps_run",
            "best_step", "best_val_loss", "val_curve", "train_seconds")


def test_each_cell_chooses_its_rate_with_the_selection_seed_and_scores_other_seeds_there(finished):
    for size, strategy in CELLS:
        n_tokens = SPEC.sizes[size]
        folder = finished / "runs" / size / strategy
        records = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
        grid = {r["lr"]: r for r in records if r["seed"] == SPEC.selection_seed}
        chosen = choose_lr(grid)
        assert set(SPEC.rates(strategy)) <= set(grid) and all(r["phase"] == "grid" for r in grid.values())
        # One rate beyond the grid's edge exactly when the base grid's best sat there.
        base_best = choose_lr({lr: grid[lr] for lr in SPEC.rates(strategy)})
        beyond = sorted(set(grid) - set(SPEC.rates(strategy)))
        if base_best == max(SPEC.rates(strategy)):
            assert beyond == [float(f"{base_best * SPEC.edge_factor:.2g}")]
        elif base_best == min(SPEC.rates(strategy)):
            assert beyond == [float(f"{base_best / SPEC.edge_factor:.2g}")]
        else:
            assert beyond == []
        final = [r for r in records if r.get("final")]
        # The selection seed is never scored; the scored seeds ran only at the chosen rate.
        assert sorted(r["seed"] for r in final) == SPEC.scored_seeds() == [1, 2]
        assert len(records) == len(grid) + len(final)
        for r in final:
            assert r["lr"] == r["chosen_lr"] == chosen and r["phase"] == "seed"
            assert math.isfinite(r["test_ppl"]) and r["test_ppl"] > 1
            assert math.isfinite(r["general_ppl"]) and r["general_ppl"] > 1
        for r in grid.values():
            # Test and general text are read once per final model, never for a selection run.
            assert "test_ppl" not in r and "general_ppl" not in r and "final" not in r
        for r in records:
            assert all(key in r for key in REQUIRED), set(REQUIRED) - set(r)
            assert (r["size"], r["strategy"], r["train_tokens"]) == (size, strategy, n_tokens)
        # Every selection run of a size reads the same subset; another seed another one.
        assert len({r["offset"] for r in grid.values()}) == 1
        assert all(r["offset"] != grid[chosen]["offset"] for r in final)
        assert len({r["trainable_params"] for r in records}) == 1


def test_a_depth_variant_trains_its_own_depth(finished):
    def options_and_trainable(strategy: str) -> tuple[dict, int]:
        (first, *_) = sorted((finished / "runs" / "64" / strategy).glob("*.json"))
        record = json.loads(first.read_text())
        return record["options"], record["trainable_params"]

    default, deeper = options_and_trainable("freeze_lower_layers"), options_and_trainable("freeze_lower_layers@1")
    assert default[0] == {"n_frozen": 2} and deeper[0] == {"n_frozen": 1}
    assert default[1] < deeper[1]  # one block fewer frozen: one more block trains
    assert not (finished / "runs" / "8" / "freeze_lower_layers@1").exists()  # only at depth_sizes


def test_the_untrained_model_is_scored_once_by_the_same_rule(finished):
    baseline = json.loads((finished / "baseline.json").read_text())
    base = tiny_model("qwen2")
    assert baseline["test_ppl"] == pytest.approx(helpers.perplexity(base, TOKENIZER, CORPUS.test, block_size=64),
                                                 rel=1e-5)
    assert baseline["general_ppl"] == pytest.approx(helpers.perplexity(base, TOKENIZER, GENERAL, block_size=64),
                                                    rel=1e-5)


def test_tokens_read_counts_the_blocks_each_step_read():
    assert blocks_read(5, 10, 4) == 4 + 4 + 2 + 4 + 4  # an epoch of 10 blocks is batches of 4, 4 and 2
    assert blocks_read(3, 1, 4) == 3
    assert blocks_read(0, 10, 4) == 0


def test_the_whole_split_is_read_once_to_its_last_token(tmp_path):
    spec = SweepSpec(sizes={"all": None}, strategies=("adapter_layers",), lrs=(1e-3,), edge_steps=0, seeds=1,
                     depths={}, block_size=32, val_blocks=2, max_tokens=64, eval_every=2, patience=1,
                     report_draws=1, eval_block_size=64)
    sweep = new_sweep(tmp_path, spec)
    n_train = sweep.train_ids.numel()
    blocks, _ = sweep.data("all", 1)
    assert n_train % 32 and len(blocks) == n_train // 32 + 1  # a last block ends at the last token
    assert torch.equal(blocks[-1], sweep.train_ids[-32:])
    sweep.run_grid()
    for path in (tmp_path / "runs").rglob("*.json"):
        record = json.loads(path.read_text())
        # 64 tokens would cap it at one step; min_epochs makes it read every block once, and no early stop before.
        assert record["steps_run"] == record["max_steps"] == record["steps_per_epoch"] == math.ceil(len(blocks) / 4)
        assert record["tokens_read"] == len(blocks) * 32 >= n_train


def test_each_run_records_its_best_validation_and_where_it_stopped(finished):
    files = result_files(finished, "runs")
    start_losses = set()
    for name, r in files.items():
        steps = [s for s, _ in r["val_curve"]]
        losses = [v for _, v in r["val_curve"]]
        assert steps[0] == 0 and steps == sorted(steps) and steps[-1] == r["steps_run"], name
        assert r["best_val_loss"] == min(losses), name
        assert r["best_step"] == steps[losses.index(min(losses))], name
        assert r["start_val_loss"] == losses[0]
        start_losses.add(round(losses[0], 9))
        assert 1 <= r["steps_run"] <= r["max_steps"]
        assert r["steps_run"] == (r["stopped_early_at"] or r["max_steps"]), name
        if r["stopped_early_at"] is not None:
            # patience validations in a row without a new best, right before the stop
            assert r["best_step"] == steps[-1 - SPEC.patience], name
        assert [s for s, _ in r["train_curve"]] == list(range(1, r["steps_run"] + 1))
        assert r["tokens_read"] == blocks_read(r["steps_run"], r["blocks"], SPEC.batch_size) * r["tokens_per_block"]
    # These strategies train a copy of the same model, so every run starts from the same validation loss.
    assert len(start_losses) == 1
    # Size 8 is one block of 8 tokens (capped by 20 epochs); size 64 two blocks of 32 (capped by 512 tokens).
    small = files["runs/8/full_fine_tuning/lr0.0001-seed0.json"]
    big = files["runs/64/full_fine_tuning/lr0.0001-seed0.json"]
    assert (small["blocks"], small["tokens_per_block"], small["max_steps"]) == (1, 8, 20)
    assert (big["blocks"], big["tokens_per_block"], big["max_steps"]) == (2, 32, 512 // (2 * 32))
    assert any(r["stopped_early_at"] is not None for r in files.values())


def test_sweep_json_records_spec_model_corpus_code_and_machine(finished):
    header = json.loads((finished / "sweep.json").read_text())
    assert header["spec"] == SPEC.as_json() and header["spec"]["sizes"] == {"8": 8, "64": 64}
    assert header["spec"]["selection_seed"] == 0 and header["spec"]["depths"] == {"freeze_lower_layers": [1]}
    assert header["model"] == "Qwen2ForCausalLM"
    corpus = header["corpus"]
    train_tokens = len("\n\n".join(CORPUS.train))
    assert {k: corpus["train"][k] for k in ("documents", "tokens")} == {"documents": 2, "tokens": train_tokens}
    assert {k: corpus["test"][k] for k in ("documents", "tokens")} == {"documents": 1, "tokens": len(RUST)}
    assert corpus["validation"]["documents"] == 1
    assert len({corpus[split]["sha256"] for split in ("train", "validation", "test", "general")}) == 4
    assert corpus["general"] == corpus["general"] | {"documents": 2, "tokens": len("\n\n".join(GENERAL))}
    assert header["code_hash"] == code_hash() and len(code_hash()) == 16
    assert header["versions"]["torch"] == importlib.metadata.version("torch")
    assert header["versions"]["transformers"] == importlib.metadata.version("transformers")
    assert header["machine"]["cpus"] == os.cpu_count() and header["machine"]["device"] == "cpu"
    (session,) = header["sessions"]
    assert session["runs"] == sum(cell_counts(finished).values()) and session["draws"] == SPEC.report_draws
    assert session["seconds"] > 0 and session["load_mean"] >= 0


def test_a_tie_on_validation_chooses_the_lower_rate():
    grid = {5e-4: {"best_val_loss": 2.0}, 1e-4: {"best_val_loss": 2.0}, 2.5e-3: {"best_val_loss": 3.0}}
    assert choose_lr(grid) == 1e-4


# --- 2. resuming ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stops", [(2,), (3,), (2, 1, 6)], ids=["mid-grid", "after-grid", "three-sessions"])
def test_a_killed_sweep_resumes_to_the_same_files(finished, tmp_path, stops):
    out = tmp_path / "out"
    total = sum(cell_counts(finished).values())
    done = 0
    for k in stops:
        with killed_after(k):
            new_sweep(out).run_grid()
        done += k
        assert len(result_files(out, "runs")) == done
        if done <= len(SPEC.lrs):
            # Stopped inside or right after the first cell's selection runs: no final model is scored yet.
            assert not any("test_ppl" in r for r in result_files(out, "runs").values())
    unfinished = [cell for cell, n in cell_counts(out).items() if n < cell_counts(finished)[cell]]
    saved = []
    assert new_sweep(out).run_grid(on_saved=saved.append) == total - done
    assert_same_numbers(result_files(finished, "runs"), result_files(out, "runs"))
    # The hook behind --commit hears of each cell this session finished, once, in order.
    assert [m.split(" done")[0] for m in saved] == [f"sweep: {size} x {s}" for size, s in unfinished]
    sessions = json.loads((out / "sweep.json").read_text())["sessions"]
    assert [s["runs"] for s in sessions] == [*stops, total - done]


def test_a_finished_sweep_trains_nothing_again(finished, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(finished, out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("draw-*.json")} | {
        p.relative_to(out): p.read_bytes() for p in (out / "runs").rglob("*.json")}
    sweep = new_sweep(out)
    assert sweep.run_grid() == 0 and sweep.run_report() == 0
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("draw-*.json")} | {
        p.relative_to(out): p.read_bytes() for p in (out / "runs").rglob("*.json")}
    assert after == before
    sessions = json.loads((out / "sweep.json").read_text())["sessions"]
    assert [s["runs"] for s in sessions] == [sum(cell_counts(finished).values()), 0]


# --- 3. the report's protocol -----------------------------------------------------------------------------------------

def test_report_draws_hold_the_four_strategies_and_their_improvement(finished):
    files = result_files(finished, "report")
    assert sorted(files) == [f"report/draw-{d}.json" for d in range(SPEC.report_draws)]
    base = tiny_model("qwen2")
    train_text = "\n\n".join(CORPUS.train)
    total = helpers.count_parameters(base)[1]
    for d in range(SPEC.report_draws):
        r = files[f"report/draw-{d}.json"]
        assert r["draw"] == d and tuple(r["runs"]) == REPORT_STRATEGIES
        # The character tokenizer makes offsets character positions.
        assert r["train_text"] == train_text[r["train_offset"]: r["train_offset"] + SPEC.report_tokens]
        assert r["test_text"] == RUST[r["test_offset"]: r["test_offset"] + SPEC.report_tokens]
        assert r["baseline_seq_ppl"] == pytest.approx(helpers.perplexity(base, TOKENIZER, r["test_text"]), rel=1e-5)
        whole_test = helpers.perplexity(base, TOKENIZER, CORPUS.test, block_size=SPEC.eval_block_size)
        assert r["baseline_test_ppl"] == pytest.approx(whole_test, rel=1e-5)
        for strategy, run in r["runs"].items():
            assert (run["improvement_pct"] > 0) == (run["seq_ppl"] < r["baseline_seq_ppl"])
            assert math.isfinite(run["test_ppl"]) and run["test_ppl"] > 1
            assert math.isfinite(run["general_ppl"]) and run["general_ppl"] > 1
            assert run["seq_ppl"] != r["baseline_seq_ppl"]  # it trained
            assert run["train_loss_last"] < run["train_loss_first"]
        assert r["runs"]["full_fine_tuning"]["trainable_params"] == total
        assert r["runs"]["freeze_lower_layers"]["trainable_params"] < r["runs"]["full_fine_tuning"]["trainable_params"]
    offsets = {(r["train_offset"], r["test_offset"]) for r in files.values()}
    assert len(offsets) == SPEC.report_draws
    assert len({r["train_offset"] for r in files.values()}) == SPEC.report_draws


def test_report_resumes_to_the_same_draws(finished, tmp_path):
    out = tmp_path / "out"
    with killed_after(1):
        new_sweep(out).run_report()
    assert sorted(result_files(out, "report")) == ["report/draw-0.json"]
    saved = []
    assert new_sweep(out).run_report(on_saved=saved.append) == SPEC.report_draws - 1
    assert saved == [f"sweep: the report's protocol, {SPEC.report_draws - 1} more draw(s)"]
    assert_same_numbers(result_files(finished, "report"), result_files(out, "report"))
    assert not (out / "runs").exists()


def test_workers_claim_the_report_draws_one_at_a_time(tmp_path):
    # A worker once claimed every draw before running the first: killed after one, it left the rest to nobody.
    out, claims, spec = tmp_path / "out", tmp_path / "claims", replace(SPEC, report_draws=4)
    claims.mkdir()

    def worker() -> Sweep:
        return Sweep(out, spec, model_and_tokenizer=(tiny_model("qwen2"), TOKENIZER), corpus_data=CORPUS,
                     general_data=GENERAL, progress=False, claims=claims, session=False)

    with killed_after(1):
        worker().run_report()
    assert worker().run_report() == 2  # the first worker ran draw 0 and had claimed draw 1 when it was killed
    assert sorted(result_files(out, "report")) == ["report/draw-0.json", "report/draw-2.json", "report/draw-3.json"]


# --- 4. refusals ------------------------------------------------------------------------------------------------------

def test_another_spec_or_corpus_in_the_same_folder_is_refused(finished):
    before = (finished / "sweep.json").read_text()
    with pytest.raises(ValueError, match=r"another spec") as err:
        new_sweep(finished, replace(SPEC, lrs=(1e-3,)))
    assert "corpus" not in str(err.value) and "model" not in str(err.value)
    with pytest.raises(ValueError, match=r"another corpus"):
        new_sweep(finished, corpus=Corpus(train=[RUST * 5], validation=CORPUS.validation, test=CORPUS.test))
    assert (finished / "sweep.json").read_text() == before


def test_unknown_strategy_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"Unknown strategies \['nope'\]") as err:
        SweepSpec(strategies=("nope",)).check()
    assert all(name in str(err.value) for name in ("full_fine_tuning", "lora", "gradual_unfreezing"))


@pytest.mark.parametrize("field, value, match", [
    ("sizes", {"x": 1}, "Size 'x'"), ("sizes", {}, "at least one"), ("lrs", (0.0,), "positive"),
    ("seeds", 0, "seeds"), ("val_blocks", 0, "val_blocks"), ("block_size", 1, "block_size"),
])
def test_impossible_spec_is_refused(field, value, match):
    with pytest.raises(ValueError, match=match):
        SweepSpec(**{field: value}).check()


def test_size_larger_than_the_train_split_is_refused(tmp_path):
    n_train = len("\n\n".join(CORPUS.train))
    with pytest.raises(ValueError, match=rf"asks for {n_train + 1} training tokens; the train split has {n_train}"):
        new_sweep(tmp_path / "out", replace(SPEC, sizes={"big": n_train + 1}))
    assert not (tmp_path / "out").exists()  # refused before claiming the folder
    with pytest.raises(ValueError, match="fewer than"):
        subset(torch.arange(10), 11, 0)


def test_too_few_validation_blocks_is_refused(tmp_path):
    with pytest.raises(ValueError, match="--val-blocks"):
        new_sweep(tmp_path / "out", replace(SPEC, val_blocks=11))


def test_bad_sizes_on_the_command_line_exit_2(tmp_path, capsys):
    assert main(["--sizes", "bad", "--model", str(tmp_path / "none"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("helpers.sweep: error: --sizes takes LABEL=TOKENS") and "'bad'" in err


@pytest.mark.slow
def test_help_names_the_parts():
    done = subprocess.run([sys.executable, "-m", "helpers.sweep", "--help"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert done.returncode == 0
    for option in ("--part", "--sizes", "--strategies", "--lrs", "--seeds", "--val-blocks", "--out", "--commit",
                   "--no-progress", "--workers"):
        assert option in done.stdout


# --- 5. data ----------------------------------------------------------------------------------------------------------

def test_subset_offset_depends_on_the_seed_only():
    ids = torch.arange(1000)
    spans = {seed: subset(ids, 8, seed) for seed in range(5)}
    assert len({offset for _, offset in spans.values()}) == 5
    for seed, (span, offset) in spans.items():
        assert torch.equal(span, torch.arange(offset, offset + 8)) and 0 <= offset <= 992
        again, same = subset(ids, 8, seed)
        assert same == offset and torch.equal(again, span)
    whole, offset = subset(ids, None, 3)
    assert offset == 0 and torch.equal(whole, ids)
    assert subset(ids, 1000, 3)[1] == 0


def test_training_blocks_are_the_prefix_and_the_subset(tmp_path):
    sweep = Sweep(tmp_path, SPEC, model_and_tokenizer=(tiny_model("llama"), char_tokenizer(bos=True)),
                  corpus_data=CORPUS, progress=False)
    (bos,) = sweep.prefix
    small, offset = sweep.data("8", 0)  # shorter than block_size: one block of its own length
    assert small.shape == (1, 9) and small[0, 0] == bos
    assert torch.equal(small[0, 1:], sweep.train_ids[offset: offset + 8])
    big, offset = sweep.data("64", 1)  # block_size (32) text tokens a block
    assert big.shape == (2, 33) and (big[:, 0] == bos).all()
    assert torch.equal(big[:, 1:].flatten(), sweep.train_ids[offset: offset + 64])


def test_plan_caps_tiny_subsets_by_epochs_and_big_ones_by_tokens():
    spec = SweepSpec(eval_every=4)  # batch 4, 20 epochs, 8,192 tokens but one epoch at least, validate every 4
    # One 9-token block: 1 step an epoch, 20 epochs = 20 steps (8192 // 9 = 910 would allow more); validate every step.
    assert plan_steps(1, spec, 9) == (20, 1, 1)
    # Two 128-token blocks: one batch of 2 an epoch; 20 epochs (20 steps) come before 8192 // 256 = 32 steps.
    assert plan_steps(2, spec, 128) == (20, 1, 1)
    # Six blocks: 2 steps an epoch (4 + 2); 8192 // (4 * 128) = 16 steps before 40; validate every epoch.
    assert plan_steps(6, spec, 128) == (16, 2, 2)
    # 64 blocks: 16 steps an epoch, 16 steps by tokens; validate every 4 steps.
    assert plan_steps(64, spec, 128) == (16, 16, 4)
    # A token cap smaller than one batch still allows one step.
    assert plan_steps(4, SweepSpec(max_tokens=10), 128) == (1, 1, 1)
    # The whole 52,018-token split, 407 blocks with the tail: one epoch of 102 steps, over the 16 the tokens allow.
    assert plan_steps(407, SweepSpec(), 128) == (102, 102, 8)
    assert plan_steps(407, SweepSpec(min_epochs=0), 128) == (16, 102, 8)


# --- 6. the command line ----------------------------------------------------------------------------------------------

def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout


@pytest.fixture
def git_identity(monkeypatch):
    """A committer name and address for `git commit` in a fresh repository."""
    for key in ("AUTHOR", "COMMITTER"):
        monkeypatch.setenv(f"GIT_{key}_NAME", "test")
        monkeypatch.setenv(f"GIT_{key}_EMAIL", "test@example.com")

@pytest.fixture
def tiny_setup(tmp_path, monkeypatch):
    """A tiny Llama saved with a BOS-adding character tokenizer, and a corpus folder of five Rust-like documents."""
    monkeypatch.setenv("TUTORIAL_CACHE", str(tmp_path / "cache"))
    model_dir, corpus = tmp_path / "model", tmp_path / "corpus"
    # The default spec feeds 129-token blocks and 256-token test windows: give the model room for them.
    config = tiny_config("llama")
    config.max_position_embeddings = 512
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    char_tokenizer(bos=True).save_pretrained(model_dir)
    corpus.mkdir()
    for i in range(5):
        (corpus / f"doc{i}.md").write_text(f"# Note {i}\n\n" + RUST * 6)
    return model_dir, corpus


def test_command_runs_the_grid_on_a_tiny_model_and_commits_each_cell(tiny_setup, tmp_path, capsys, git_identity):
    model_dir, corpus = tiny_setup
    out = tmp_path / "out"
    git(tmp_path, "init", "-q")
    status = main(["--part", "grid", "--model", str(model_dir), "--corpus", str(corpus), "--out", str(out),
                   "--sizes", "8=8", "32=32", "--strategies", "full_fine_tuning", "lora", "--seeds", "2",
                   "--val-blocks", "1", "--no-progress", "--commit"])
    assert status == 0, capsys.readouterr().err
    cells = [f"sweep: {size} x {s} done" for size in ("8", "32") for s in ("full_fine_tuning", "lora")]
    messages = [m.split(" (")[0] for m in reversed(git(tmp_path, "log", "--format=%s").splitlines())]
    # One commit per cell, then the session's final time when it moved after the last cell's commit.
    assert messages in (cells, cells + ["sweep: the session's time"]), messages
    assert not git(tmp_path, "status", "--porcelain", "--", "out")  # everything the sweep wrote is committed
    assert "Sweep finished" in capsys.readouterr().out
    header = json.loads((out / "sweep.json").read_text())
    assert header["model"] == str(model_dir)
    assert header["spec"]["sizes"] == {"8": 8, "32": 32}
    assert header["spec"]["strategies"] == ["full_fine_tuning", "lora"]
    assert (header["spec"]["seeds"], header["spec"]["val_blocks"], header["spec"]["block_size"]) == (2, 1, 128)
    assert not (out / "report").exists()  # --part grid only
    files = result_files(out, "runs")
    for size in ("8", "32"):
        trainable = {}
        for strategy in ("full_fine_tuning", "lora"):
            cell = [r for name, r in files.items() if name.startswith(f"runs/{size}/{strategy}/")]
            final = [r for r in cell if r.get("final")]
            assert len(final) == 2 and all(r["test_ppl"] > 1 and r["general_ppl"] > 1 for r in final)
            assert len(cell) - 2 >= len(SweepSpec().rates(strategy))  # the selection runs
            # The BOS tokenizer's prefix leads every block: one block of size + 1 tokens.
            assert {(r["blocks"], r["tokens_per_block"]) for r in cell} == {(1, int(size) + 1)}
            trainable[strategy] = cell[0]["trainable_params"]
        assert 0 < trainable["lora"] < trainable["full_fine_tuning"]


@pytest.mark.slow
def test_two_workers_share_the_cells_and_write_what_one_process_writes(tiny_setup, tmp_path):
    model_dir, corpus = tiny_setup
    args = ["--model", str(model_dir), "--corpus", str(corpus), "--sizes", "8=8", "32=32", "--strategies",
            "full_fine_tuning", "lora", "--seeds", "2", "--val-blocks", "1", "--draws", "2", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    assert main([*args, "--out", str(tmp_path / "two"), "--workers", "2"]) == 0
    one, two = tmp_path / "one", tmp_path / "two"
    files = {part: (result_files(one, part), result_files(two, part)) for part in ("runs", "report")}
    for alone, shared in files.values():
        assert sorted(alone) == sorted(shared) and alone  # each cell and draw once, none lost, none twice
        for name in alone:  # one torch thread a worker here, as in the single process above
            for key in ("best_val_loss", "test_ppl", "general_ppl"):
                if key in alone[name]:
                    assert shared[name][key] == pytest.approx(alone[name][key], rel=1e-4), (name, key)
    (session,) = json.loads((two / "sweep.json").read_text())["sessions"]  # the parent's alone
    assert (session["runs"], session["draws"], session["workers"]) == (len(files["runs"][1]), 2, 2)
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())  # no claims left behind


def test_a_model_too_short_for_the_windows_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match="reads at most 128 positions.*256-token windows"):
        Sweep(tmp_path, SweepSpec(val_blocks=1), model_and_tokenizer=(tiny_model("gpt2"), TOKENIZER),
              corpus_data=CORPUS)
    assert not (tmp_path / "sweep.json").exists()


def test_a_model_that_cannot_be_read_exits_2(tmp_path, capsys):
    status = main(["--model", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "out"), "--no-progress"])
    assert status == 2
    assert "helpers.sweep: error:" in capsys.readouterr().err


def test_other_validation_text_of_the_same_size_is_refused(finished):
    out = finished
    changed = Corpus(train=CORPUS.train, validation=[RUST.replace("value", "VALUE") * 2], test=CORPUS.test)
    with pytest.raises(ValueError, match="corpus"):
        new_sweep(out, corpus=changed)


def test_gradual_unfreezing_records_what_trains_at_the_start_and_at_the_stop(tmp_path):
    spec = SweepSpec(sizes={"64": 64}, strategies=("gradual_unfreezing",), seeds=1, block_size=32, val_blocks=2,
                     max_tokens=2048, eval_block_size=64, lrs=(1e-3,), edge_steps=0)
    new_sweep(tmp_path, spec).run_grid()
    records = [json.loads(p.read_text()) for p in (tmp_path / "runs").rglob("*.json")]
    assert len(records) == 2  # the selection run and one scored seed
    for record in records:
        assert record["trainable_params"] < record["trainable_params_at_stop"] <= record["total_params"]


@pytest.mark.slow
def test_commit_results_commits_the_folder_and_tolerates_nothing_new(tmp_path, capsys, git_identity, monkeypatch):
    git(tmp_path, "init", "-q")
    out = tmp_path / "results" / "sweep"
    (out / "runs").mkdir(parents=True)
    (out / "runs" / "a.json").write_text("{}\n")
    (tmp_path / "elsewhere.txt").write_text("not the sweep's\n")
    commit_results(out, "sweep: 8 x lora done")
    assert git(tmp_path, "log", "--format=%s").splitlines() == ["sweep: 8 x lora done"]
    assert git(tmp_path, "ls-files").split() == ["results/sweep/runs/a.json"]  # only the results folder
    commit_results(out, "sweep: nothing new")  # returns at once instead of retrying
    assert len(git(tmp_path, "log", "--format=%s").splitlines()) == 1
    # --out given relative to the checkout, as `python -m helpers.sweep --out results/sweep` passes it
    (out / "runs" / "b.json").write_text("{}\n")
    monkeypatch.chdir(tmp_path)
    commit_results(Path("results/sweep"), "sweep: 8 x full_fine_tuning done")
    assert git(tmp_path, "log", "-1", "--format=%s").strip() == "sweep: 8 x full_fine_tuning done"
    assert git(tmp_path, "ls-files").split() == ["results/sweep/runs/a.json", "results/sweep/runs/b.json"]
    assert capsys.readouterr().err == ""  # no "could not commit" warning


def test_a_recorded_code_change_carries_a_sweep_over_only_along_its_chain(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep_module, "code_hash", lambda: "c")
    assert sweep_module.same_numbers_as("c", tmp_path) == ""
    assert sweep_module.same_numbers_as("a", tmp_path) is None  # nothing recorded
    changes = [{"from": "a", "to": "b", "evidence": "refactor 1"}, {"from": "x", "to": "c", "evidence": "other"}]
    (tmp_path / sweep_module.CODE_CHANGES).write_text(json.dumps(changes))
    assert sweep_module.same_numbers_as("a", tmp_path) is None  # a -> b, but b never led to c
    changes.append({"from": "b", "to": "c", "evidence": "refactor 2"})
    (tmp_path / sweep_module.CODE_CHANGES).write_text(json.dumps(changes))
    assert sweep_module.same_numbers_as("a", tmp_path) == "refactor 1; refactor 2"
    assert sweep_module.same_numbers_as("b", tmp_path) == "refactor 2"
