"""helpers.sweep_results on a tiny finished sweep: tables, interval verdicts, figures, and live re-runs."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
from matplotlib.figure import Figure

from helpers.data import Corpus
from helpers.sweep import Sweep, SweepSpec
from helpers.sweep_results import (
    against_reference, baseline_test_ppl, chosen_rate, completeness, plot_report_draws,
    plot_size_curves, plot_val_curves, rank_counts, rate_table, relative_gap, report_draws, rerun, rerun_report_draw,
    plot_depth, plot_trade_off, summary_table, sweep_header, sweep_runs, sweep_spec, t_interval, trade_off_table,
)

from conftest import char_tokenizer, tiny_model

RUST = (
    "fn main() { let owner = String::from(\"value\"); let borrowed = &owner; println!(\"{borrowed}\"); }\n"
    "Ownership moves the value; borrowing lends it without moving. "
)
CORPUS = Corpus(train=[RUST * 4, RUST * 3], validation=[RUST * 2], test=[RUST])
GENERAL = ["The tide comes in twice a day, and the boats rest on the sand between. " * 3]
SPEC = SweepSpec(sizes={"8": 8, "64": 64}, strategies=("full_fine_tuning", "freeze_lower_layers", "lora"), seeds=3,
                 lrs=(1e-4, 5e-4, 2.5e-3), edge_steps=0, depths={"freeze_lower_layers": (1,)}, depth_sizes=("64",),
                 block_size=32, val_blocks=2, max_tokens=512,
                 eval_every=4, report_draws=3, eval_block_size=64)
TOKENIZER = char_tokenizer(bos=False)


def tiny() -> tuple:
    return tiny_model("qwen2"), TOKENIZER


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny runs, one torch thread


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sweep")
    sweep = Sweep(out, SPEC, model_and_tokenizer=tiny(), corpus_data=CORPUS, general_data=GENERAL, progress=False)
    sweep.run_report()
    sweep.run_grid()
    return out


def test_runs_table_has_every_run_in_order(folder):
    runs = sweep_runs(folder)
    assert len(runs) == (2 * 3 + 1) * (3 + 3)  # 3 rates with the selection seed, 3 scored seeds; a depth at 64
    assert list(runs["size"].cat.categories) == ["8", "64"]
    assert list(runs["strategy"].cat.categories) == ["full_fine_tuning", "freeze_lower_layers", "lora",
                                                     "freeze_lower_layers@1"]
    assert runs["final"].sum() == (2 * 3 + 1) * 3
    assert runs[~runs["final"]]["test_ppl"].isna().all() and (runs[runs["final"]]["test_ppl"] > 1).all()
    assert runs[~runs["final"]]["general_ppl"].isna().all() and (runs[runs["final"]]["general_ppl"] > 1).all()
    assert set(runs[runs["final"]]["seed"]) == {1, 2, 3} and set(runs[~runs["final"]]["seed"]) == {0}
    # What notebook 09's design table reads of each run: its blocks, steps an epoch, validation interval, offset.
    design = runs[["blocks", "tokens_per_block", "steps_per_epoch", "eval_every", "offset"]]
    assert design.notna().all().all() and (runs["steps_per_epoch"] >= 1).all()
    assert completeness(runs, sweep_spec(folder)) == {"cells": 7, "complete": 7}


def test_spec_reads_back_as_written(folder):
    assert sweep_spec(folder) == SPEC
    assert sweep_header(folder)["spec"] == SPEC.as_json()


def test_summary_is_the_mean_and_spread_of_the_final_seeds(folder):
    runs = sweep_runs(folder)
    table = summary_table(runs)
    assert len(table) == 7 and (table["seeds"] == 3).all()
    finals = runs[runs["final"] & (runs["size"] == "64") & (runs["strategy"] == "lora")]["test_ppl"]
    row = table.loc[("64", "lora")]
    assert row["test_mean"] == pytest.approx(finals.mean()) and row["test_std"] == pytest.approx(finals.std())
    assert row["test_min"] == finals.min() and row["test_max"] == finals.max()


def test_rate_table_shows_each_grid_loss_and_the_lowest_is_chosen(folder):
    rates = rate_table(sweep_runs(folder))
    losses = rates[[c for c in rates.columns if c.startswith("val loss @")]]
    assert losses.shape == (7, 3)
    for index, row in losses.iterrows():
        chosen = float(row.idxmin().split("@ ")[1])
        assert rates.loc[index, "chosen lr"] == pytest.approx(chosen)


def test_chosen_rate_is_the_rate_tables_choice(folder):
    rates = rate_table(sweep_runs(folder))
    for (size, strategy), row in rates.iterrows():
        assert chosen_rate(strategy, size, folder) == pytest.approx(row["chosen lr"])
        assert chosen_rate(strategy, size, folder) in SPEC.rates(strategy)


def test_chosen_rate_refuses_what_the_sweep_did_not_run(folder, tmp_path):
    with pytest.raises(ValueError, match="no training-set size 'full'.*8, 64"):
        chosen_rate("lora", "full", folder)
    with pytest.raises(ValueError, match="did not run strategy 'adapter_layers'"):
        chosen_rate("adapter_layers", "8", folder)
    # A sweep whose seed-0 grid is unfinished has chosen nothing yet: the grid runs are there, the final ones are not.
    unfinished = tmp_path / "unfinished"
    (unfinished / "runs" / "8" / "lora").mkdir(parents=True)
    (unfinished / "sweep.json").write_text((folder / "sweep.json").read_text())
    grid_run = json.loads(next((folder / "runs" / "8" / "lora").glob("*-seed0.json")).read_text())
    (unfinished / "runs" / "8" / "lora" / "lr1-seed0.json").write_text(json.dumps(grid_run))
    with pytest.raises(ValueError, match="not chosen a rate for lora at size '8' yet"):
        chosen_rate("lora", "8", unfinished)


def test_report_draws_rank_the_four_strategies_per_draw(folder):
    draws = report_draws(folder)
    assert len(draws) == 3 * 4
    for _, draw in draws.groupby("draw"):
        assert sorted(draw["rank_seq"]) == [1, 2, 3, 4] or draw["seq_ppl"].duplicated().any()
        assert draw.sort_values("seq_ppl")["rank_seq"].is_monotonic_increasing
    counts = rank_counts(draws)
    assert counts.to_numpy().sum() == 12 and (counts.sum(axis=1) == 3).all()
    assert baseline_test_ppl(folder) == draws["baseline_test_ppl"].iloc[0]


def test_trade_off_table_and_figures_hold_both_axes(folder):
    runs = sweep_runs(folder)
    table = trade_off_table(runs)
    finals = runs[runs["final"] & (runs["size"] == "64") & (runs["strategy"] == "lora")]
    for metric in ("test", "general"):
        mean, low, _ = t_interval(finals[f"{metric}_ppl"].tolist())
        assert table.loc[("64", "lora"), f"{metric}_mean"] == pytest.approx(mean)
        assert table.loc[("64", "lora"), f"{metric}_half"] == pytest.approx(mean - low)
    assert table.loc[("64", "freeze_lower_layers"), "depth"] == 2
    assert table.loc[("64", "freeze_lower_layers@1"), "depth"] == 1
    assert pd.isna(table.loc[("64", "lora"), "depth"]) and table.loc[("8", "lora"), "tokens_read"] > 0
    baseline = json.loads((folder / "baseline.json").read_text())
    trade_off = plot_trade_off(table, baseline)
    assert len(trade_off.axes) == 2 and trade_off.axes[0].get_xlabel().startswith("Rust test perplexity")
    labels = [text.get_text() for text in trade_off.legends[0].get_texts()]  # each strategy and depth once
    assert sorted(labels) == ["freeze lower layers", "freeze lower layers@1", "full fine tuning", "lora", "untrained"]
    depth = plot_depth(table, "freeze_lower_layers")
    assert [len(ax.containers) for ax in depth.axes] == [1, 1]  # one size with two depths: one line a panel


def test_figures_draw(folder):
    runs = sweep_runs(folder)
    for fig in (plot_size_curves(runs, baseline=10.0), plot_val_curves(runs, ["8", "64"]),
                plot_report_draws(report_draws(folder))):
        assert isinstance(fig, Figure) and fig.axes


def test_a_rerun_reproduces_the_committed_run(folder):
    again = rerun("64", "lora", 1, folder=folder, model_and_tokenizer=tiny(), corpus_data=CORPUS,
                  general_data=GENERAL)
    kept = again["committed"]
    assert again["chosen_lr"] == kept["chosen_lr"] and again["best_step"] == kept["best_step"]
    assert relative_gap(again["test_ppl"], kept["test_ppl"]) < 1e-6
    assert relative_gap(again["general_ppl"], kept["general_ppl"]) < 1e-6
    assert relative_gap(again["best_val_loss"], kept["best_val_loss"]) < 1e-6
    assert not list(Path(folder).rglob("*.tmp"))  # nothing written into the committed folder
    with pytest.raises(ValueError, match="no final run of lora at size 64 with seed 4"):
        rerun("64", "lora", 4, folder=folder, model_and_tokenizer=tiny(), corpus_data=CORPUS)
    with pytest.raises(ValueError, match="did not run strategy 'adapter_layers'"):
        rerun("64", "adapter_layers", 0, folder=folder, model_and_tokenizer=tiny(), corpus_data=CORPUS)


def test_a_rerun_draw_reproduces_the_committed_draw(folder):
    before = sorted(p.name for p in (folder / "report").iterdir())
    again = rerun_report_draw(1, folder=folder, model_and_tokenizer=tiny(), corpus_data=CORPUS)
    assert sorted(p.name for p in (folder / "report").iterdir()) == before
    kept = again["committed"]
    assert (again["train_offset"], again["test_offset"]) == (kept["train_offset"], kept["test_offset"])
    for strategy, run in again["runs"].items():
        assert relative_gap(run["seq_ppl"], kept["runs"][strategy]["seq_ppl"]) < 1e-6
        assert relative_gap(run["test_ppl"], kept["runs"][strategy]["test_ppl"]) < 1e-6
        assert "general_ppl" in kept["runs"][strategy] and "general_ppl" not in run  # not re-scored: half the time


def test_a_folder_without_a_sweep_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m helpers.sweep"):
        sweep_runs(tmp_path)


def test_relative_gap():
    assert relative_gap(1.0, 1.0) == 0 and relative_gap(1.1, 1.0) == pytest.approx(0.1)
    assert math.isinf(relative_gap(1.0, 0.0))


def test_verdicts_against_the_reference_on_a_hand_made_example():
    # Three seeds; the reference scores 20 on each. Gaps in %, chosen so that each verdict occurs once:
    #   a: -5, -4, -6  -> mean -5 %, sd 1 %, half-width 4.303 x 1 / sqrt(3) = 2.484 %: (-7.48, -2.52) -> better
    #   b: +0.1, -0.1, 0 -> (-0.248, +0.248) %, inside +-1 % -> equivalent
    #   c: +3, +2, +4  -> (+0.52, +5.48) % -> worse
    #   d: -2, +2, 0   -> (-4.97, +4.97) % -> undecided
    import pandas as pd

    gaps = {"a": (-5, -4, -6), "b": (0.1, -0.1, 0), "c": (3, 2, 4), "d": (-2, 2, 0)}
    rows = [{"size": "2k", "strategy": "full_fine_tuning", "seed": s, "final": True, "test_ppl": 20.0}
            for s in (1, 2, 3)]
    rows += [{"size": "2k", "strategy": name, "seed": s, "final": True, "test_ppl": 20.0 * (1 + g / 100)}
             for name, values in gaps.items() for s, g in zip((1, 2, 3), values)]
    rows.append({"size": "2k", "strategy": "a", "seed": 0, "final": False, "test_ppl": 1.0})  # a selection run
    runs = pd.DataFrame(rows).astype({"size": "category", "strategy": "category"})
    table = against_reference(runs)
    assert table["verdict"].to_dict() == {("2k", "a"): "better", ("2k", "b"): "equivalent", ("2k", "c"): "worse",
                                          ("2k", "d"): "undecided"}
    a = table.loc[("2k", "a")]
    assert a["seeds"] == 3 and a["gap"] == pytest.approx(-0.05)
    assert (a["low"], a["high"]) == pytest.approx((-0.05 - 4.303 * 0.01 / 3 ** 0.5, -0.05 + 4.303 * 0.01 / 3 ** 0.5))
    # A wider margin makes the worse one, whose interval stops at 5.48 %, equivalent.
    assert against_reference(runs, margin=0.06).loc[("2k", "c"), "verdict"] == "equivalent"


def test_an_interval_needs_two_seeds():
    with pytest.raises(ValueError, match="2 to 31 paired values"):
        t_interval([1.0])
    mean, low, high = t_interval([1.0, 3.0])  # sd sqrt(2), df 1: half-width 12.706 x sqrt(2) / sqrt(2)
    assert (mean, low, high) == pytest.approx((2.0, 2.0 - 12.706, 2.0 + 12.706))
