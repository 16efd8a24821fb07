"""Every strategy under one recipe: notebook 08's tables and figures, and `python -m helpers.compare` (see --help)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .recipe import LEARNING_RATES, ORDER, RECIPE

# pandas, matplotlib, torch and transformers load inside the functions that use them, so that the command's --help
# answers at once.
if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

    from .data import Corpus

REPORT_BASELINE_PPL = 737_879.38
"""The report's baseline perplexity of Qwen2-0.5B: worse than uniform guessing, the mark of a random head."""

REPORT_ROWS = [
    ("freeze_lower_layers", 291, 81_680.74, 88.9),
    ("freeze_embeddings", 291, 98_825.13, 86.6),
    ("full_fine_tuning", 291, 195_018.19, 73.6),
    ("adapter_layers", 0, 588_367.81, 20.3),
]
"""The report's strategy table, as printed: its 'trainable params' are tensor counts, its perplexity is on one
8-token test sequence."""


def learning_rate(strategy: str) -> float:
    """Return the rate `strategy` trains at under the shared recipe, from LEARNING_RATES (first used in notebook 03)."""
    if strategy not in LEARNING_RATES:
        raise ValueError(f"Unknown strategy {strategy!r}: the recipe has learning rates for "
                         f"{', '.join(LEARNING_RATES)} (helpers.recipe.LEARNING_RATES).")
    return LEARNING_RATES[strategy]


def run_strategy(strategy: str, *, model_name: str | None = None, corpus: Corpus | None = None,
                 steps: int | None = None, progress: bool = True) -> dict:
    """Return the result record of `strategy` trained under the shared recipe, unsaved (first used in notebook 08)."""
    from .chapter import prepare_run
    from .data import load_corpus
    from .experiment import choose_learning_rate, recipe_config
    from .models import is_default_model, load_model

    overrides: dict = {"progress": progress}
    if steps is not None:
        overrides |= {"steps": steps, "warmup_steps": min(RECIPE["warmup_steps"], steps)}
    loaded, corpus = None, corpus or load_corpus()
    if is_default_model(model_name=model_name):
        overrides["lr"] = learning_rate(strategy)
    else:  # the sweep tuned the rates for the default model only: another model's is chosen on validation
        loaded = load_model(model_name)
        overrides["lr"] = choose_learning_rate(strategy, *loaded, corpus, show=progress)
    run = prepare_run(strategy, show=False, model_name=model_name, model_and_tokenizer=loaded, corpus=corpus,
                      config=recipe_config(**overrides))
    return run.finish(save=False, show=False).result


def matches_recipe(result: dict, name: str) -> bool:
    """Return whether `result` is a run of the notebooks' model under today's RECIPE at its rate (notebook 08).

    The rate is the sweep's for the default model; another model's was chosen on validation, so any rate stands.
    """
    from .models import DEFAULT_MODEL, default_model_name

    recipe = json.loads(json.dumps(RECIPE))  # the JSON round trip a saved result went through
    config, model = result.get("config", {}), default_model_name()
    rate = model != DEFAULT_MODEL or config.get("lr") == learning_rate(name)
    return (result.get("model") == model and result.get("recipe") == recipe and rate
            and config.get("steps") == RECIPE["steps"])


def collect_results(names: list[str] | None = None, *, folder: str | Path | None = None,
                    compute_missing: bool = True) -> dict[str, dict]:
    """Return {strategy: result} of the notebooks' model, training and saving any missing or stale one (notebook 08).

    Only runs of one model compare: another model's files are left out, and what is missing is said.
    """
    from .experiment import load_results, save_result
    from .models import default_model_name

    names, model = names or list(ORDER), default_model_name()
    found = {name: r for name, r in load_results(folder).items() if r.get("model") == model}
    results: dict[str, dict] = {}
    for name in names:
        if name in found and (matches_recipe(found[name], name) or not compute_missing):
            results[name] = found[name]
        elif compute_missing:
            if name in found:
                print(f"results/{name}.json was trained under another recipe or learning rate; training {name} again")
            results[name] = run_strategy(name)
            save_result(results[name], Path(folder) / f"{name}.json" if folder else None)
    missing = [name for name in names if name not in results]
    if missing:
        print(f"No saved run of {model} for {', '.join(missing)}: left out (notebooks 03-07 train them).")
    return results


def same_baseline(results: dict[str, dict], rtol: float = 1e-4) -> float:
    """Return the baseline test perplexity `results` share (their mean); two over `rtol` apart raise (notebook 08)."""
    values = sorted(float(r["baseline_test_ppl"]) for r in results.values())
    if values[-1] - values[0] > rtol * values[0]:
        raise ValueError(
            f"The results disagree on the baseline test perplexity ({values[0]:.6f} ... {values[-1]:.6f}, more than a "
            f"relative {rtol:g} apart): they come from different models, tokenizers or test texts and cannot share one "
            "table. Re-run them with the same model and corpus."
        )
    return sum(values) / len(values)


def comparison_table(results: dict[str, dict]) -> pd.DataFrame:
    """Return a row per strategy plus the untrained baseline: trainable parameters, cost, perplexities (notebook 08)."""
    import pandas as pd

    if not results:
        raise ValueError("No results to compare: run at least one strategy (helpers.compare.run_strategy).")
    baseline = same_baseline(results)
    nan = float("nan")
    # What a strategy forgot: its perplexity on general English (older records without it show a blank).
    measured = [r["baseline_general_ppl"] for r in results.values() if r.get("baseline_general_ppl")]
    general_base = sum(measured) / len(measured) if measured else nan
    rows = [{"strategy": "baseline (no training)", "trainable params": 0, "trainable %": 0.0, "trainable tensors": 0,
             "lr": nan, "train tokens": 0, "train s": nan, "tokens/s": nan, "peak memory MiB": nan, "val ppl": nan,
             "test ppl": baseline, "test / baseline": 1.0, "change %": 0.0, "general ppl": general_base,
             "general / baseline": 1.0}]
    for name, r in results.items():
        rows.append({
            "strategy": name, "trainable params": int(r["trainable_params"]),
            "trainable %": 100 * r["trainable_params"] / r["total_params"],
            "trainable tensors": int(r["trainable_tensors"]), "lr": (r.get("config") or {}).get("lr", nan),
            "train tokens": int(r.get("train_tokens") or 0), "train s": r["train_seconds"],
            "tokens/s": r["tokens_per_second"], "peak memory MiB": r["peak_memory_mb"], "val ppl": r["val_ppl"],
            "test ppl": r["test_ppl"], "test / baseline": r["test_ppl"] / baseline,
            "change %": 100 * (r["test_ppl"] / baseline - 1), "general ppl": r.get("general_ppl") or nan,
            "general / baseline": (r.get("general_ppl") or nan) / general_base,
        })
    return pd.DataFrame(rows).set_index("strategy")


def report_side_by_side(results: dict[str, dict]) -> pd.DataFrame:
    """Return the report's four strategies beside ours: trainable, perplexity, improvement (notebook 08)."""
    import pandas as pd

    ours = comparison_table(results)
    columns = ["strategy", "trainable (report)", "perplexity (report)", "improvement % (report)"]
    table = pd.DataFrame(REPORT_ROWS, columns=columns).set_index("strategy")
    names = [n for n in table.index if n in ours.index]
    table = table.loc[names]
    table["trainable tensors (ours)"] = ours.loc[names, "trainable tensors"]
    table["trainable params (ours)"] = ours.loc[names, "trainable params"]
    table["test ppl (ours)"] = ours.loc[names, "test ppl"]
    table["improvement % (ours)"] = -ours.loc[names, "change %"]
    return table


COLUMN_FORMATS: dict[str, str] = {
    "lr": "g", "train s": ".0f", "tokens/s": ".0f", "peak memory MiB": ",.0f", "test / baseline": ".3f",
    "general / baseline": ".3f", "change %": "+.1f", "improvement % (report)": ".1f", "improvement % (ours)": ".1f",
}
"""Number formats of the columns that the default two decimals would flatten (a learning rate of 2e-4 is not 0.00) or
clutter (seconds, mebibytes); every other float column gets two decimals, every integer a thousands separator."""


def format_table(table: pd.DataFrame, *, formats: dict[str, str] | None = None, floatfmt: str = ",.2f") -> pd.DataFrame:
    """Return a copy of `table` as display strings: COLUMN_FORMATS, then `formats`, NaN blank (notebook 08)."""
    import pandas as pd

    formats = {**COLUMN_FORMATS, **(formats or {})}

    def cell(v, column: str) -> str:
        # A DataFrame of strings shows the same in its text/plain and text/html forms, unlike a Styler, whose text
        # form on a code host is "<pandas.io.formats.style.Styler at 0x...>".
        if v is None or isinstance(v, (bool, str)):
            return "" if v is None else str(v)
        if isinstance(v, int) or (hasattr(v, "dtype") and "int" in str(v.dtype)):
            return format(int(v), formats.get(column, ","))
        if isinstance(v, float):
            return "" if v != v else format(v, formats.get(column, floatfmt))
        return str(v)

    return pd.DataFrame({c: [cell(v, c) for v in table[c]] for c in table.columns}, index=table.index)


def markdown_table(table: pd.DataFrame) -> str:
    """Return `table` as a GitHub Markdown table, numbers right-aligned (used by python -m helpers.compare)."""
    import pandas as pd

    frame = table.reset_index()
    numeric = [pd.api.types.is_numeric_dtype(frame[c]) for c in frame.columns]
    text = format_table(frame)
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |",
             "|" + "|".join("---:" if n else ":---" for n in numeric) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in text.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def _one_axes_figure() -> tuple[Figure, object]:
    """Return a new figure of one axes, for the comparison's bar and scatter plots."""
    from .plotting import new_figure

    fig = new_figure(6.5, 3.8)
    return fig, fig.add_subplot()


def legend_above(fig: Figure, styles: dict[str, dict]) -> None:
    """Give `fig` one legend above its axes, where it covers no data: {label: line style} (notebook 08's figures)."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], label=label, **style) for label, style in styles.items()]
    fig.legend(handles=handles, loc="outside upper center", ncols=len(handles), fontsize=8, frameon=False)


def plot_loss_curves(results: dict[str, dict], *, columns: int = 3) -> Figure:
    """Return a panel per strategy on shared axes of its training and validation loss (notebook 08)."""
    import math

    import pandas as pd

    from .plotting import new_figure

    if not results:
        raise ValueError("No results to plot: pass {strategy: result}, e.g. helpers.compare.collect_results().")
    if columns < 1:
        raise ValueError(f"columns must be at least 1; got {columns}.")
    histories = {name: pd.DataFrame(r["history"]) for name, r in results.items()}
    columns = min(columns, len(histories))
    rows = math.ceil(len(histories) / columns)
    fig = new_figure(3.1 * columns, 2.3 * rows + 0.9)
    fig.set_layout_engine("constrained")  # which keeps the legend above the panels
    axes = fig.subplots(rows, columns, sharex=True, sharey=True, squeeze=False).ravel()
    train, val = {"color": "#6baed6", "lw": 1}, {"color": "#d94801", "marker": "o", "ms": 3.5, "lw": 1.5}
    other = {"color": "#c8c8c8", "lw": 1}
    validation = {name: frame.dropna(subset=["val_loss"]) for name, frame in histories.items()}
    for ax, (name, frame) in zip(axes, histories.items()):
        # The other runs' validation curves, in grey behind, keep the strategies comparable across panels.
        for other_name, checked in validation.items():
            if other_name != name:
                ax.plot(checked["tokens"] / 1000, checked["val_loss"], **other, zorder=1)
        trained = frame.dropna(subset=["train_loss"])
        ax.plot(trained["tokens"] / 1000, trained["train_loss"], **train, zorder=2)
        ax.plot(validation[name]["tokens"] / 1000, validation[name]["val_loss"], **val, zorder=3)
        ax.set_title(name.replace("_", " "), fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3, lw=0.5)
    for ax in axes[len(histories):]:
        ax.set_visible(False)
    fig.supxlabel("training tokens seen (thousands)", fontsize=9)
    fig.supylabel("next-token loss (nats)", fontsize=9)
    legend_above(fig, {"training loss (each step's batch)": train, "validation loss": val,
                       "the other strategies' validation loss": other})
    return fig


def plot_perplexity_bars(table: pd.DataFrame) -> Figure:
    """Return a bar chart of test perplexity per row of `comparison_table`, the baseline drawn across (notebook 08)."""
    fig, ax = _one_axes_figure()
    ppl = table["test ppl"]
    colors = ["#969696" if name.startswith("baseline") else "#2b8cbe" for name in ppl.index]
    ax.bar(range(len(ppl)), ppl.values, color=colors)
    ax.axhline(ppl.iloc[0], color="#636363", lw=1, ls="--")
    for i, v in enumerate(ppl.values):
        ax.annotate(f"{v:.2f}", (i, v), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(ppl)), [n.replace("_", "\n").replace(" (", "\n(") for n in ppl.index], fontsize=8)
    ax.set_ylabel("test perplexity (lower is better)")
    ax.set_title("held-out test perplexity after the same training budget")
    fig.tight_layout()
    return fig


def plot_params_vs_perplexity(table: pd.DataFrame) -> Figure:
    """Return a scatter of trainable parameters (log scale) against test perplexity per strategy (notebook 08)."""
    fig, ax = _one_axes_figure()
    trained = table[table["trainable params"] > 0]
    ax.scatter(trained["trainable params"], trained["test ppl"], color="#2b8cbe")
    ax.axhline(table["test ppl"].iloc[0], color="#636363", lw=1, ls="--", label="baseline (no training)")
    ax.set_xscale("log")
    ax.margins(x=0.15, y=0.12)
    # Labels go left of the points in the right half, so the largest strategies' names stay inside the axes, and
    # alternate above and below, so two strategies of similar size and perplexity do not print over each other.
    middle = (trained["trainable params"].min() * trained["trainable params"].max()) ** 0.5
    for i, (name, row) in enumerate(trained.sort_values("trainable params").iterrows()):
        right = row["trainable params"] > middle
        ax.annotate(name, (row["trainable params"], row["test ppl"]), xytext=(-5 if right else 5, -11 if i % 2 else 6),
                    textcoords="offset points", ha="right" if right else "left", fontsize=8)
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel("test perplexity")
    ax.set_title("what each strategy trains against what it gains")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    return fig


def _parser() -> argparse.ArgumentParser:
    from .models import default_model_name

    parser = argparse.ArgumentParser(prog="python -m helpers.compare", description=(
        "Fine-tune one model with several transfer-learning strategies under the same recipe (data, seed, token "
        "budget) and write the comparison table as CSV and Markdown: trainable parameters, training time, tokens/s, "
        "peak memory, validation and test perplexity, change against the untrained baseline."))
    parser.add_argument("--strategies", nargs="+", metavar="NAME", default=None,
                        help=f"strategies to compare, space-separated; choose from: {', '.join(ORDER)} "
                             "(default: all of them)")
    parser.add_argument("--steps", type=int, default=RECIPE["steps"],
                        help=f"optimizer steps per strategy, each of {RECIPE['batch_size']} blocks of "
                             f"{RECIPE['block_size']} tokens (the same for every strategy; default: {RECIPE['steps']})")
    parser.add_argument("--model", default=None, metavar="NAME",
                        help="model: a local folder written by save_pretrained, a .gguf file, or a Hub id "
                             f"(default: $TUTORIAL_MODEL or {default_model_name()})")
    parser.add_argument("--corpus", default=None, metavar="PATH",
                        help="folder of .txt/.md documents, split by document into train/validation/test "
                             "(default: the bundled Rust corpus)")
    parser.add_argument("--out", default="comparison", metavar="DIR",
                        help="folder for comparison.csv, comparison.md and results/<strategy>.json "
                             "(default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars (for logs and scripts)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run python -m helpers.compare: train each strategy, write the table and results; return the exit status."""
    args = _parser().parse_args(argv)
    names = args.strategies or list(ORDER)
    unknown = [n for n in names if n not in LEARNING_RATES]
    if unknown or args.steps < 1:
        problem = (f"Unknown strategies {unknown}. Valid strategies: {', '.join(LEARNING_RATES)}." if unknown
                   else f"--steps must be at least 1; got {args.steps}.")
        print(f"helpers-compare: error: {problem}", file=sys.stderr)
        return 2
    import matplotlib

    matplotlib.use("Agg")  # no figures here, but a headless machine must never try to open a window
    from .data import load_corpus
    from .experiment import save_result
    from .models import quiet_transformers
    from .progress import tqdm

    quiet_transformers()
    start, out = time.perf_counter(), Path(args.out)
    results: dict[str, dict] = {}
    try:
        corpus = load_corpus(args.corpus)
        (out / "results").mkdir(parents=True, exist_ok=True)
        bar = tqdm(names, desc="strategies", unit="strategy", disable=args.no_progress)
        for name in bar:
            bar.set_postfix_str(name)
            results[name] = run_strategy(name, model_name=args.model, corpus=corpus, steps=args.steps,
                                         progress=not args.no_progress)
            save_result(results[name], out / "results" / f"{name}.json")
    except (ValueError, OSError) as err:  # e.g. a model or corpus that is not there, a context too short
        print(f"helpers-compare: error: {err}", file=sys.stderr)
        return 2
    table = comparison_table(results)
    table.to_csv(out / "comparison.csv")
    (out / "comparison.md").write_text(markdown_table(table))
    print(markdown_table(table[["trainable params", "trainable %", "train s", "val ppl", "test ppl", "change %"]]))
    print(f"Wrote {out / 'comparison.csv'} and {out / 'comparison.md'} in {time.perf_counter() - start:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
