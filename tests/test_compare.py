"""The comparison table, the `helpers.compare` command on a tiny local model, and the widgets' static fallbacks."""
import math
import subprocess
import sys

import pandas as pd
import pytest
from matplotlib.figure import Figure

from helpers import STRATEGIES, apply_strategy, count_parameters, meta_model
from helpers.compare import (
    ORDER, collect_results, comparison_table, format_table, learning_rate, main, markdown_table, matches_recipe,
    plot_loss_curves, report_side_by_side,
)
from helpers.experiment import RECIPE, save_result
from helpers.models import DEFAULT_MODEL
from helpers.widgets import explorer_table, strategy_explorer, training_panel, widgets_available

from conftest import tiny_config, tiny_model

DOC = (
    "Ownership in Rust means every value has one owner; when the owner goes out of scope the value is dropped. "
    "Borrowing lends a reference without moving the value, and the borrow checker makes sure it never dangles. "
)


@pytest.fixture
def tiny_setup(tmp_path, tokenizer, monkeypatch):
    """A tiny Llama saved with the tiny tokenizer, and a corpus folder of a few Markdown documents."""
    monkeypatch.setenv("TUTORIAL_CACHE", str(tmp_path / "cache"))
    model_dir, corpus = tmp_path / "model", tmp_path / "corpus"
    model = tiny_model("llama")
    model.config.max_position_embeddings = 256  # the recipe evaluates 256-token windows (RoPE has no table to grow)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    corpus.mkdir()
    for i in range(5):
        (corpus / f"doc{i}.md").write_text(f"# Note {i}\n\n" + DOC * 4)
    return model_dir, corpus


def _fake(name, trainable, test_ppl, baseline=20.0, total=1000):
    history = [{"step": 0, "tokens": 0, "train_loss": None, "val_loss": 3.0},
               {"step": 1, "tokens": 512, "train_loss": 2.9, "val_loss": 2.8}]
    return {"strategy": name, "trainable_params": trainable, "total_params": total, "trainable_tensors": 3,
            "baseline_test_ppl": baseline, "val_ppl": test_ppl + 1, "test_ppl": test_ppl, "train_seconds": 2.0,
            "train_tokens": 512, "tokens_per_second": 256.0, "peak_memory_mb": 100.0, "config": {"lr": 1e-4},
            "model": DEFAULT_MODEL, "history": history}


def test_table_has_baseline_row_and_relative_change():
    table = comparison_table({"full_fine_tuning": _fake("full_fine_tuning", 1000, 10.0),
                              "lora": _fake("lora", 40, 11.0)})
    assert list(table.index) == ["baseline (no training)", "full_fine_tuning", "lora"]
    assert table.loc["lora", "trainable %"] == pytest.approx(4.0)
    assert table.loc["full_fine_tuning", "test / baseline"] == pytest.approx(0.5)
    assert table.loc["lora", "change %"] == pytest.approx(-45.0)
    assert table["general ppl"].isna().all()  # records written before the general set existed: blanks, not zeros
    forgot = dict(_fake("lora", 40, 11.0), baseline_general_ppl=30.0, general_ppl=33.0)
    both = comparison_table({"lora": forgot, "full_fine_tuning": _fake("full_fine_tuning", 1000, 10.0)})
    assert both.loc["baseline (no training)", "general ppl"] == 30.0
    assert both.loc["lora", "general / baseline"] == pytest.approx(1.1)
    assert math.isnan(both.loc["full_fine_tuning", "general ppl"])
    side = report_side_by_side({"full_fine_tuning": _fake("full_fine_tuning", 1000, 10.0)})
    assert list(side.index) == ["full_fine_tuning"]
    assert side.loc["full_fine_tuning", "improvement % (ours)"] == pytest.approx(50.0)


def test_table_refuses_results_from_different_baselines():
    with pytest.raises(ValueError, match="baseline"):
        comparison_table({"a": _fake("a", 1, 5.0, baseline=20.0), "b": _fake("b", 1, 5.0, baseline=30.0)})


def test_baselines_from_two_machines_share_one_table():
    # The same baseline computed on two machines differs in the sixth digit (18.221186 vs 18.221347 was seen).
    table = comparison_table({"a": _fake("a", 1, 10.0, baseline=18.221186),
                              "b": _fake("b", 1, 11.0, baseline=18.221347)})
    assert table.loc["baseline (no training)", "test ppl"] == pytest.approx(18.2212665)
    assert table.loc["a", "test / baseline"] == pytest.approx(10.0 / 18.2212665)


def test_formatted_tables_are_plain_strings_that_read_the_same_as_text_and_html():
    table = comparison_table({"full_fine_tuning": _fake("full_fine_tuning", 1000, 10.0),
                              "lora": _fake("lora", 40, 11.0)})
    text = format_table(table)
    assert list(text.index) == list(table.index) and list(text.columns) == list(table.columns)
    assert all(isinstance(v, str) for v in text.to_numpy().ravel())
    assert text.loc["full_fine_tuning", "trainable params"] == "1,000"
    assert text.loc["lora", "lr"] == "0.0001" and text.loc["baseline (no training)", "lr"] == ""  # NaN left blank
    assert text.loc["lora", "change %"] == "-45.0" and text.loc["full_fine_tuning", "test / baseline"] == "0.500"
    assert text.loc["lora", "test ppl"] == "11.00"
    # What a code host shows: the DataFrame's own text, never "<pandas.io.formats.style.Styler at 0x...>".
    assert "Styler" not in repr(text) and "1,000" in repr(text) and "1,000" in text._repr_html_()
    assert format_table(table[["lr"]], formats={"lr": ".1e"}).loc["lora", "lr"] == "1.0e-04"
    side = format_table(report_side_by_side({"full_fine_tuning": _fake("full_fine_tuning", 1000, 10.0)}))
    assert side.loc["full_fine_tuning", "perplexity (report)"] == "195,018.19"
    assert side.loc["full_fine_tuning", "improvement % (ours)"] == "50.0"


def _runs(n):
    names = list(STRATEGIES)[:n]
    return {name: _fake(name, 10 * (i + 1), 10.0 + i) for i, name in enumerate(names)}


def test_loss_curves_are_small_multiples_with_the_legend_outside_the_panels():
    results = _runs(5)
    fig = plot_loss_curves(results)
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == [name.replace("_", " ") for name in results]
    assert len(fig.axes) == 6 and not fig.axes[5].get_visible()  # a 2 x 3 grid, the sixth cell left empty
    # Shared axes: one scale to compare the panels by.
    assert all(ax.get_shared_y_axes().joined(panels[0], ax) and ax.get_shared_x_axes().joined(panels[0], ax)
               for ax in panels)
    # Each panel: the other runs' validation curves, its own training and validation loss.
    assert all(len(ax.lines) == len(results) + 1 for ax in panels)
    # One legend, the figure's, and none inside a panel where it could cover the curves.
    assert len(fig.legends) == 1 and all(ax.get_legend() is None for ax in fig.axes)
    fig.canvas.draw()
    legend_box = fig.legends[0].get_window_extent()
    assert all(not legend_box.overlaps(ax.get_window_extent()) for ax in panels)
    assert len(plot_loss_curves(results, columns=1).axes) == 5


def test_loss_curves_refuse_bad_input():
    with pytest.raises(ValueError, match="No results"):
        plot_loss_curves({})
    with pytest.raises(ValueError, match="columns"):
        plot_loss_curves(_runs(2), columns=0)


def _current(name):
    result = _fake(name, 10, 11.0)
    result["recipe"] = dict(RECIPE)
    result["config"] = {"lr": learning_rate(name), "steps": RECIPE["steps"]}
    return result


def test_every_strategy_trains_at_the_rate_the_committed_sweep_chose_on_the_whole_split():
    from helpers.experiment import recipe_config
    from helpers.recipe import LEARNING_RATES
    from helpers.sweep_results import chosen_rate, sweep_spec

    # The rates are data in recipe.py, so that no notebook reads the sweep to train; they must be the sweep's choice
    # on the whole train split (the size whose token count is None: "all").
    whole = [label for label, n in sweep_spec().sizes.items() if n is None]
    assert whole == ["all"]
    assert LEARNING_RATES == {name: chosen_rate(name, "all") for name in ORDER}
    assert chosen_rate("lora") == chosen_rate("lora", "all")  # the default size is the whole split
    for name in ORDER:
        assert recipe_config(name).lr == learning_rate(name) == LEARNING_RATES[name]
    assert recipe_config("lora", lr=1e-3).lr == 1e-3
    with pytest.raises(ValueError, match="Unknown strategy 'frozen'"):
        learning_rate("frozen")
    # The recipe holds no rate of its own, so a config without a strategy or an explicit rate is refused.
    assert "lr" not in RECIPE
    with pytest.raises(ValueError, match="needs the strategy"):
        recipe_config(steps=5)


def test_results_of_another_recipe_or_rate_are_stale(tmp_path):
    assert matches_recipe(_current("lora"), "lora")
    assert not matches_recipe(_current("lora"), "full_fine_tuning")  # LoRA trains at its own rate
    old_recipe = _current("adapter_layers")
    old_recipe["recipe"]["steps"] = RECIPE["steps"] // 2
    assert not matches_recipe(old_recipe, "adapter_layers")
    assert not matches_recipe(_fake("adapter_layers", 10, 11.0), "adapter_layers")  # no recipe recorded at all
    save_result(old_recipe, tmp_path / "adapter_layers.json")
    save_result(_current("lora"), tmp_path / "lora.json")
    # Without permission to train, stale files are still shown; what is missing stays missing.
    found = collect_results(["adapter_layers", "lora", "full_fine_tuning"], folder=tmp_path, compute_missing=False)
    assert set(found) == {"adapter_layers", "lora"}


def test_only_runs_of_the_notebooks_model_are_compared_and_the_missing_ones_are_named(tmp_path, capsys):
    save_result(_current("lora"), tmp_path / "lora.json")
    other = dict(_current("adapter_layers"), model="gpt2-tiny", baseline_test_ppl=31.0)
    save_result(other, tmp_path / "adapter_layers.json")
    found = collect_results(["lora", "adapter_layers"], folder=tmp_path, compute_missing=False)
    assert list(found) == ["lora"]  # the other model's run, with its other baseline, would break the table
    assert "No saved run of SmolLM2-135M-Instruct for adapter_layers: left out" in capsys.readouterr().out
    assert not matches_recipe(other, "adapter_layers")


def test_another_models_run_stands_at_whatever_rate_it_chose_on_validation(monkeypatch):
    monkeypatch.setenv("TUTORIAL_MODEL", "gpt2-tiny")
    chosen = dict(_current("lora"), model="gpt2-tiny", config={"lr": 5e-4, "steps": RECIPE["steps"]})
    assert matches_recipe(chosen, "lora") and not matches_recipe(_current("lora"), "lora")


def test_markdown_table_shape():
    md = markdown_table(pd.DataFrame({"n": [1234, 5], "ppl": [1.5, float("nan")]},
                                     index=pd.Index(["a", "b"], name="s")))
    lines = md.strip().splitlines()
    assert lines[0] == "| s | n | ppl |" and lines[1] == "|:---|---:|---:|"
    assert lines[2] == "| a | 1,234 | 1.50 |" and lines[3] == "| b | 5 |  |"


def test_markdown_table_keeps_small_learning_rates_readable():
    md = markdown_table(pd.DataFrame({"lr": [2e-4, 2e-3], "ppl": [10.7361, 11.1326]},
                                     index=pd.Index(["a", "b"], name="s")))
    assert md.strip().splitlines()[2:] == ["| a | 0.0002 | 10.74 |", "| b | 0.002 | 11.13 |"]


def test_command_on_tiny_model_writes_csv_and_markdown(tiny_setup, tmp_path, capsys):
    model_dir, corpus = tiny_setup
    out = tmp_path / "out"
    status = main(["--strategies", "lora", "gradual_unfreezing", "--steps", "2", "--model", str(model_dir),
                   "--corpus", str(corpus), "--out", str(out), "--no-progress"])
    assert status == 0
    table = pd.read_csv(out / "comparison.csv", index_col=0)
    assert list(table.index) == ["baseline (no training)", "lora", "gradual_unfreezing"]
    assert table.loc["lora", "train tokens"] == 2 * 4 * 128
    assert (table["test ppl"] > 1).all() and table.loc["lora", "trainable params"] > 0
    md = (out / "comparison.md").read_text()
    assert "| lora |" in md and "| gradual_unfreezing |" in md
    assert (out / "results" / "lora.json").is_file()
    assert "comparison.csv" in capsys.readouterr().out


def test_command_rejects_unknown_strategy(tiny_setup, tmp_path, capsys):
    model_dir, corpus = tiny_setup
    status = main(["--strategies", "nope", "--model", str(model_dir), "--corpus", str(corpus),
                   "--out", str(tmp_path / "o")])
    assert status == 2
    err = capsys.readouterr().err
    assert "Unknown strategies ['nope']" in err and "lora" in err


@pytest.mark.slow
def test_help_documents_every_option():
    done = subprocess.run([sys.executable, "-m", "helpers.compare", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0
    for option in ("--strategies", "--steps", "--model", "--corpus", "--out", "--no-progress"):
        assert option in done.stdout
    for name in STRATEGIES:
        assert name in done.stdout


def test_widgets_fall_back_to_static_output_outside_a_frontend():
    assert widgets_available() is False
    config = tiny_config("qwen2")
    table = strategy_explorer(config)
    assert isinstance(table, pd.DataFrame) and set(STRATEGIES) <= set(table.index)
    full = count_parameters(meta_model(config))[1]
    assert table.loc["full_fine_tuning", "trainable"] == table.loc["full_fine_tuning", "total"] == full
    assert 0 < table.loc["lora", "trainable"] < full
    assert table.equals(explorer_table(config))
    saved = {"full_fine_tuning": _fake("full_fine_tuning", 1000, 10.0), "lora": _fake("lora", 40, 11.0)}
    figure = training_panel(saved, interactive=False)
    # The static view draws the run the live panel starts on (LoRA): its train and validation loss, legend outside.
    assert isinstance(figure, Figure) and len(figure.axes) == 1 and len(figure.axes[0].lines) == 2
    assert figure.axes[0].get_title().startswith("lora") and figure.axes[0].get_legend() is None and figure.legends
    figure.canvas.draw()
    assert not figure.legends[0].get_window_extent().overlaps(figure.axes[0].get_window_extent())
    only = training_panel({"adapter_layers": _fake("adapter_layers", 40, 11.0)}, interactive=False)
    assert only.axes[0].get_title().startswith("adapter_layers")
    with pytest.raises(ValueError, match="No saved runs"):
        training_panel({}, interactive=False)


def test_live_explorer_builds_and_follows_the_dropdown():
    ipywidgets = pytest.importorskip("ipywidgets")
    panel = strategy_explorer(tiny_config("llama"), interactive=True)
    assert isinstance(panel, ipywidgets.VBox)
    choice, controls, _ = panel.children
    choice.value = "adapter_layers"
    assert [c.description for c in controls.children] == ["n_top"]
    choice.value = "lora"
    assert [c.description for c in controls.children] == ["r", "alpha", "dropout"]


def test_explorer_takes_n_frozen_as_the_block_count_its_summary_speaks_of(capsys):
    ipywidgets = pytest.importorskip("ipywidgets")
    config = tiny_config("llama")
    n_blocks = config.num_hidden_layers
    panel = strategy_explorer(config, interactive=True)
    choice, controls, _ = panel.children
    choice.value = "freeze_lower_layers"
    (control,) = controls.children
    assert isinstance(control, ipywidgets.BoundedIntText)
    assert control.description == f"n_frozen (of {n_blocks} blocks)"
    assert control.value == round(2 / 3 * n_blocks) and (control.min, control.max) == (0, n_blocks)
    capsys.readouterr()
    control.value = 1  # a count, which the float control refused ("as a fraction must lie in [0, 1]")
    shown = capsys.readouterr().out  # outside a kernel the Output widget lets prints through
    frozen = apply_strategy(meta_model(config), "freeze_lower_layers", n_frozen=1)
    trainable, total = count_parameters(frozen)
    assert f"{trainable:,} of {total:,} parameters trainable" in shown
    assert f"(1 of {n_blocks})" in shown and "must lie" not in shown


def test_live_training_panel_trains_on_click(tiny_setup):
    ipywidgets = pytest.importorskip("ipywidgets")
    model_dir, corpus = tiny_setup
    panel = training_panel(model_name=str(model_dir), corpus=corpus, interactive=True)
    assert isinstance(panel, ipywidgets.VBox)
    (choice, steps, button), progress, status = panel.children[0].children, panel.children[1], panel.children[2]
    choice.value, steps.value = "gradual_unfreezing", 2
    button.click()
    assert status.value.startswith("done: step 2/2, validation loss"), status.value
    assert progress.value == progress.max == 2
    assert not button.disabled


def test_the_panel_figure_shows_the_first_step_inside_the_whole_runs_frame():
    from helpers.widgets import _loss_figure

    first = pd.DataFrame([{"step": 1, "tokens": 512, "train_loss": 3.0, "val_loss": float("nan")}])
    figure = _loss_figure(first, "live", total_tokens=5120)
    ax = figure.axes[0]
    train_line = ax.lines[0]
    assert len(train_line.get_xdata()) == 1 and train_line.get_marker() not in (None, "None", "")  # one point, visible
    left, right = ax.get_xlim()
    assert left <= 0 and right >= 5120  # not the 490-540 axis a lone point gets by default


def test_figures_are_made_through_pyplot_but_left_closed():
    import matplotlib.pyplot as plt

    from helpers.plotting import new_figure

    before = plt.get_fignums()
    fig = new_figure(4, 3)
    # pyplot made it (so Jupyter's inline backend is loaded and can draw it) and forgot it (so it is drawn once).
    assert plt.get_fignums() == before
    assert isinstance(fig, Figure) and tuple(fig.get_size_inches()) == (4, 3)
