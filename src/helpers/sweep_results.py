"""Reading the sweep's results (results/sweep): tables, paired seed comparisons, figures, re-running one run live."""
from __future__ import annotations

import dataclasses
import json
import math
import statistics
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from .compare import REPORT_ROWS
from .recipe import ORDER, REPORT_STRATEGIES
from .sweep import DEPTH_OPTIONS, Sweep, SweepSpec, default_out, run_path

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

    from .data import Corpus

RUN_COLUMNS = ["size", "train_tokens", "tokens_read", "strategy", "options", "lr", "seed", "phase", "final",
               "chosen_lr", "best_val_loss", "start_val_loss", "best_step", "steps_run", "max_steps", "epochs_run",
               "stopped_early_at", "test_ppl", "general_ppl", "trainable_params", "trainable_params_at_stop",
               "train_seconds", "seconds", "blocks", "tokens_per_block", "steps_per_epoch", "eval_every", "offset"]

DRAW_COLUMNS = ["draw", "strategy", "baseline_seq_ppl", "seq_ppl", "improvement_pct", "baseline_test_ppl", "test_ppl",
                "trainable_params", "train_text", "test_text"]

REPORT_FINDINGS = {strategy: improvement for strategy, _, _, improvement in REPORT_ROWS}
"""The report's 'improvement %' per strategy, as printed in its table (helpers.compare.REPORT_ROWS)."""

_COLORS = {"full_fine_tuning": "#1b9e77", "freeze_embeddings": "#d95f02", "freeze_lower_layers": "#7570b3",
           "adapter_layers": "#e7298a", "lora": "#66a61e", "gradual_unfreezing": "#a6761d"}


def _folder(folder: str | Path | None) -> Path:
    path = Path(folder) if folder is not None else default_out()
    if not (path / "sweep.json").is_file():
        raise FileNotFoundError(f"{path} holds no sweep (no sweep.json). Run `python -m helpers.sweep` to make one.")
    return path


def sweep_header(folder: str | Path | None = None) -> dict:
    """Return sweep.json: the spec, model, corpus, code hash, versions, machine and sessions (notebook 09)."""
    return json.loads((_folder(folder) / "sweep.json").read_text())


def sweep_spec(folder: str | Path | None = None) -> SweepSpec:
    """Return the SweepSpec a sweep was run with (first used in notebook 03)."""
    spec = sweep_header(folder)["spec"]
    lrs = {s: tuple(r) for s, r in spec["lrs"].items()} if isinstance(spec["lrs"], dict) else tuple(spec["lrs"])
    return SweepSpec(**spec | {"strategies": tuple(spec["strategies"]), "lrs": lrs,
                               "depths": {s: tuple(d) for s, d in spec["depths"].items()},
                               "depth_sizes": tuple(spec["depth_sizes"])})


def sweep_runs(folder: str | Path | None = None) -> pd.DataFrame:
    """Return a row per finished run of the grid (RUN_COLUMNS), in the spec's and ORDER's order (notebook 08)."""
    import pandas as pd

    path = _folder(folder)
    rows = [json.loads(file.read_text()) for file in sorted((path / "runs").glob("*/*/*.json"))]
    frame = pd.DataFrame(rows, columns=RUN_COLUMNS + ["val_curve"])
    sizes = list(sweep_header(path)["spec"]["sizes"])
    frame["size"] = pd.Categorical(frame["size"], categories=sizes, ordered=True)
    frame["strategy"] = pd.Categorical(frame["strategy"], categories=[s for s in ORDER if s in set(frame["strategy"])]
                                       + sorted(set(frame["strategy"]) - set(ORDER)), ordered=True)
    frame["final"] = frame["final"].fillna(False).astype(bool)
    return frame.sort_values(["size", "strategy", "lr", "seed"]).reset_index(drop=True)


def chosen_rate(strategy: str, size: str = "all", folder: str | Path | None = None) -> float:
    """Return the rate the sweep chose for `strategy` at `size` (default "all", the whole train split): the selection
    seed's lowest validation loss (notebook 08)."""
    path = _folder(folder)
    spec = sweep_spec(path)
    if size not in spec.sizes:
        raise ValueError(f"The sweep in {path} has no training-set size {size!r}. "
                         f"Its sizes: {', '.join(spec.sizes)}.")
    if (size, strategy) not in spec.cells():
        raise ValueError(f"The sweep in {path} did not run strategy {strategy!r} at size {size!r}, so it chose no "
                         f"rate for it. Its strategies there: {', '.join(s for z, s in spec.cells() if z == size)}.")
    records = [json.loads(p.read_text()) for p in sorted((path / "runs" / size / strategy).glob("*.json"))]
    rates = {r["chosen_lr"] for r in records if r.get("final") and r.get("chosen_lr") is not None}
    if not rates:
        raise ValueError(f"The sweep in {path} has not chosen a rate for {strategy} at size {size!r} yet (its seed-0 "
                         "grid there is unfinished). Run `python -m helpers.sweep` to finish it.")
    if len(rates) > 1:
        raise ValueError(f"The final runs of {strategy} at size {size!r} in {path} disagree on the chosen rate "
                         f"({sorted(rates)}): the folder mixes two sweeps. Re-run the sweep into an empty folder.")
    return float(rates.pop())


def baseline_test_ppl(folder: str | Path | None = None) -> float:
    """Return the untrained model's test perplexity, as the sweep's report part measured it (notebook 03)."""
    return float(report_draws(folder)["baseline_test_ppl"].iloc[0])


def completeness(runs: pd.DataFrame, spec: SweepSpec) -> dict[str, int]:
    """Return {'cells': planned (size, strategy) cells, 'complete': cells with all scored seeds} (notebook 09)."""
    complete = int((summary_table(runs)["seeds"] >= spec.seeds).sum())
    return {"cells": len(spec.cells()), "complete": complete}


def summary_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Return per (size, strategy): chosen rate, seeds, test perplexity mean/std/min/max, epochs (notebook 08)."""
    return runs[runs["final"]].groupby(["size", "strategy"], observed=True).agg(
        train_tokens=("train_tokens", "first"), lr=("chosen_lr", "first"), seeds=("seed", "count"),
        test_mean=("test_ppl", "mean"), test_std=("test_ppl", "std"), test_min=("test_ppl", "min"),
        test_max=("test_ppl", "max"), val_loss=("best_val_loss", "mean"), epochs_run=("epochs_run", "mean"),
        best_step=("best_step", "mean"), trainable_params=("trainable_params", "first"),
    )


def rate_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Return each selection run's best validation loss: (size, strategy) by rate, and the choice (notebook 08)."""
    grid = runs[runs["phase"] == "grid"].pivot_table(index=["size", "strategy"], columns="lr",
                                                    values="best_val_loss", observed=True)
    grid.columns = [f"val loss @ {lr:g}" for lr in grid.columns]
    grid["chosen lr"] = runs[runs["final"]].groupby(["size", "strategy"], observed=True)["chosen_lr"].first()
    return grid


# --- verdicts against the reference, fixed before the sweep ran -------------------------------------------------------

REFERENCE = "full_fine_tuning"
"""Every strategy is compared with this one alone, chosen in advance, so no correction for many comparisons is due."""

MARGIN = 0.01
"""Practical equivalence: perplexities within 1 % of each other are as good as equal, fixed in advance."""

T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
"""Student's t, 97.5th percentile, for 1 to 30 degrees of freedom: the half-width of a 95 % two-sided interval."""


def t_interval(values: list[float]) -> tuple[float, float, float]:
    """Return (mean, low, high): the 95 % t-interval of the mean of `values`, one per seed (notebook 09)."""
    n = len(values)
    if not 2 <= n <= len(T_975) + 1:
        raise ValueError(f"A t-interval needs 2 to {len(T_975) + 1} paired values (seeds); got {n}.")
    mean = statistics.fmean(values)
    half = T_975[n - 2] * statistics.stdev(values) / math.sqrt(n)
    return mean, mean - half, mean + half


def verdict(low: float, high: float, margin: float = MARGIN) -> str:
    """Return 'equivalent' (interval inside +-margin), 'better' (below 0), 'worse' or 'undecided' (notebook 09)."""
    if -margin < low and high < margin:
        return "equivalent"
    return "better" if high < 0 else "worse" if low > 0 else "undecided"


def against_reference(runs: pd.DataFrame, metric: str = "test_ppl", reference: str = REFERENCE,
                      margin: float = MARGIN) -> pd.DataFrame:
    """Return per (size, strategy) the relative paired gap to `reference` on `metric`, its 95 % interval and the
    verdict (notebook 09): strategy / reference - 1 seed by seed, negative = lower perplexity than the reference."""
    import pandas as pd

    finals = runs[runs["final"]]
    rows = []
    for (size, strategy), cell in finals.groupby(["size", "strategy"], observed=True):
        if strategy == reference:
            continue
        ref = finals[(finals["size"] == size) & (finals["strategy"] == reference)].set_index("seed")[metric]
        mine = cell.set_index("seed")[metric]
        seeds = sorted(set(ref.index) & set(mine.index))
        if len(seeds) < 2:
            raise ValueError(f"{strategy} and {reference} at size {size} share {len(seeds)} scored seed(s); a paired "
                             "interval needs 2 or more. Finish the sweep first.")
        mean, low, high = t_interval([mine[s] / ref[s] - 1 for s in seeds])
        rows.append({"size": size, "strategy": strategy, "seeds": len(seeds), "gap": mean, "low": low, "high": high,
                     "verdict": verdict(low, high, margin)})
    return pd.DataFrame(rows).set_index(["size", "strategy"])


def trade_off_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Return per (size, strategy) the tokens read and, on both axes, the seeds' mean and 95 % half-width
    (notebook 09): test_* is what a strategy learned of Rust, general_* what it kept of general English."""
    import pandas as pd

    rows = []
    for (size, strategy), cell in runs[runs["final"]].groupby(["size", "strategy"], observed=True):
        options = cell["options"].iloc[0] if isinstance(cell["options"].iloc[0], dict) else {}
        depth = options.get(DEPTH_OPTIONS.get(str(strategy).partition("@")[0], ""))  # blocks frozen or trained
        row = {"size": size, "strategy": strategy, "depth": depth, "seeds": len(cell),
               "tokens_read": cell["tokens_read"].mean()}
        for metric in ("test", "general"):
            mean, low, _ = t_interval(cell[f"{metric}_ppl"].tolist())
            row |= {f"{metric}_mean": mean, f"{metric}_half": mean - low}
        rows.append(row)
    return pd.DataFrame(rows).set_index(["size", "strategy"])


def report_draws(folder: str | Path | None = None) -> pd.DataFrame:
    """Return the report's protocol redone: per (draw, strategy), 8-token and test perplexities, ranks (notebook 09)."""
    import pandas as pd

    rows = []
    for file in sorted((_folder(folder) / "report").glob("draw-*.json")):  # sorted by draw below
        draw = json.loads(file.read_text())
        rows += [draw | run | {"strategy": strategy} for strategy, run in draw["runs"].items()]
    frame = pd.DataFrame(rows, columns=DRAW_COLUMNS)
    if frame.empty:
        raise FileNotFoundError("The sweep's report part has not run yet: no report/draw-*.json.")
    frame["rank_seq"] = frame.groupby("draw")["seq_ppl"].rank(method="min").astype(int)
    frame["rank_test"] = frame.groupby("draw")["test_ppl"].rank(method="min").astype(int)
    frame["strategy"] = pd.Categorical(frame["strategy"], categories=REPORT_STRATEGIES, ordered=True)
    return frame.sort_values(["draw", "strategy"]).reset_index(drop=True)


def rank_counts(draws: pd.DataFrame, column: str = "rank_seq") -> pd.DataFrame:
    """Return how many draws put each strategy at each rank (1 = best) by `column` (notebook 09)."""
    counts = draws.pivot_table(index="strategy", columns=column, values="draw", aggfunc="count", fill_value=0,
                               observed=True)
    counts.columns = [f"rank {c}" for c in counts.columns]
    return counts


# --- figures -------------------------------------------------------------------------------------------------------

def plot_size_curves(runs: pd.DataFrame, *, baseline: float | None = None) -> Figure:
    """Return test perplexity against the training tokens read (log x), a line per strategy at its default depth, a
    band from the lowest to the highest seed, each size's available text as a dotted line (notebook 09)."""
    from .plotting import new_figure

    finals = runs[runs["final"] & ~runs["strategy"].astype(str).str.contains("@")]
    table = finals.groupby(["size", "strategy"], observed=True).agg(
        read=("tokens_read", "mean"), text=("train_tokens", "first"), mean=("test_ppl", "mean"),
        low=("test_ppl", "min"), high=("test_ppl", "max")).reset_index()
    fig = new_figure(7.5, 4.4)
    ax = fig.add_subplot()
    for strategy, rows in table.groupby("strategy", observed=True):
        color = _COLORS.get(strategy)
        ax.plot(rows["read"], rows["mean"], "o-", color=color, lw=1.6, ms=4, label=strategy.replace("_", " "))
        ax.fill_between(rows["read"], rows["low"], rows["high"], color=color, alpha=0.15, lw=0)
    for size, text in table.groupby("size", observed=True)["text"].first().items():
        ax.axvline(text, color="#bdbdbd", ls=":", lw=1)
        ax.annotate(f"{size}: {text:,} text tokens", (text, 1), xycoords=("data", "axes fraction"), rotation=90,
                    va="top", ha="right", fontsize=7, color="#636363")
    if baseline is not None:
        ax.axhline(baseline, color="#636363", ls="--", lw=1, label=f"no training ({baseline:.2f})")
    ax.set_xscale("log")
    ax.set_xlabel("training tokens read (mean of seeds; a token read twice counts twice)")
    ax.set_ylabel("Rust test perplexity (lower is better)")
    ax.set_title("what each strategy learned, by tokens read; band: lowest to highest seed", fontsize=10)
    ax.grid(alpha=0.3, lw=0.5)
    ax.legend(fontsize=8, ncols=2, loc="lower left")
    fig.tight_layout()
    return fig


def _color(strategy: str) -> str | None:
    return _COLORS.get(strategy.partition("@")[0])


def plot_trade_off(table: pd.DataFrame, baseline: dict[str, float]) -> Figure:
    """Return Rust test perplexity against general perplexity, a panel per size (three a row): a point per strategy
    and depth with 95 % seed intervals, the untrained model as a star (notebook 09). Down-left learns more, forgets
    less."""
    from .plotting import new_figure

    sizes = list(table.index.get_level_values("size").unique())
    ncols = min(3, len(sizes))
    nrows = -(-len(sizes) // ncols)
    fig = new_figure(3.6 * ncols, 3.3 * nrows)
    fig.set_layout_engine("constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    legend = {}
    for ax, size in zip(axes, sizes):
        for strategy, row in table.loc[size].iterrows():
            depth = "@" in strategy
            bars = ax.errorbar(row["test_mean"], row["general_mean"], xerr=row["test_half"], yerr=row["general_half"],
                               fmt="s" if depth else "o", mfc="white" if depth else _color(strategy), ms=5, lw=1,
                               color=_color(strategy))
            legend.setdefault(strategy.replace("_", " "), bars)
        legend["untrained"], = ax.plot([baseline["test_ppl"]], [baseline["general_ppl"]], "*", color="black", ms=10)
        read = table.loc[size, "tokens_read"].mean()
        ax.set_title(f"size {size}: {read:,.0f} tokens read (mean)", fontsize=9)
        ax.set_xlabel("Rust test perplexity (learning: lower is better)", fontsize=8)
        ax.set_ylabel("general-English perplexity\n(forgetting: higher is worse)", fontsize=8)
        ax.grid(alpha=0.3, lw=0.5)
    for ax in axes[len(sizes):]:
        ax.axis("off")
    where = axes[-1] if len(axes) > len(sizes) else fig
    where.legend(list(legend.values()), list(legend), fontsize=7, frameon=False,
                 **({"loc": "center"} if where is not fig else {"loc": "outside lower center", "ncols": 4}))
    fig.suptitle("what each strategy learned and forgot; bars: 95 % intervals over seeds; squares: other depths",
                 fontsize=10)
    return fig


def plot_depth(table: pd.DataFrame, strategy: str) -> Figure:
    """Return test and general perplexity against the depth of `strategy` (blocks frozen or trained), a line per
    size where several depths ran (notebook 09)."""
    from .plotting import new_figure

    rows = table.reset_index()
    rows = rows[rows["strategy"].astype(str).str.partition("@")[0] == strategy]
    fig = new_figure(8.0, 3.4)
    fig.set_layout_engine("constrained")
    axes = fig.subplots(1, 2).ravel()
    for size, cell in rows.groupby("size", observed=True):
        if len(cell) < 2:
            continue
        cell = cell.sort_values("depth")
        for ax, metric in zip(axes, ("test", "general")):
            ax.errorbar(cell["depth"], cell[f"{metric}_mean"], yerr=cell[f"{metric}_half"], marker="o", ms=4,
                        lw=1.2, capsize=2, label=f"size {size}")
    for ax, what in zip(axes, ("Rust test perplexity (learning)", "general-English perplexity (forgetting)")):
        ax.set_xlabel(f"{DEPTH_OPTIONS[strategy].replace('_', ' ')} (blocks)", fontsize=9)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel(what, fontsize=9)
        ax.grid(alpha=0.3, lw=0.5)
        ax.legend(fontsize=8)
    fig.suptitle(f"{strategy.replace('_', ' ')} at several depths; bars: 95 % intervals over seeds", fontsize=10)
    return fig


def plot_val_curves(runs: pd.DataFrame, sizes: list[str]) -> Figure:
    """Return validation loss against optimizer step of the final runs of `sizes`, a panel a size (notebook 09)."""
    from matplotlib.lines import Line2D

    from .plotting import new_figure

    finals = runs[runs["final"] & runs["size"].isin(sizes)]
    fig = new_figure(4.0 * len(sizes), 3.6)
    fig.set_layout_engine("constrained")
    axes = fig.subplots(1, len(sizes), squeeze=False).ravel()
    for ax, size in zip(axes, sizes):
        for _, run in finals[finals["size"] == size].iterrows():
            steps, losses = zip(*run["val_curve"])
            color = _COLORS.get(run["strategy"])
            ax.plot(steps, losses, color=color, lw=1, alpha=0.8)
            ax.plot([run["best_step"]], [run["best_val_loss"]], "o", color=color, ms=3.5)
        ax.set_title(f"training set {size} ({int(finals[finals['size'] == size]['train_tokens'].iloc[0]):,} tokens)",
                     fontsize=9)
        ax.set_xlabel("optimizer step", fontsize=9)
        ax.grid(alpha=0.3, lw=0.5)
    axes[0].set_ylabel("validation loss (nats)", fontsize=9)
    handles = [Line2D([], [], color=_COLORS.get(s), lw=1.5, label=s.replace("_", " "))
               for s in finals["strategy"].cat.remove_unused_categories().cat.categories]
    handles.append(Line2D([], [], color="#555555", marker="o", lw=0, ms=3.5, label="best step (weights kept)"))
    fig.legend(handles=handles, loc="outside upper center", ncols=4, fontsize=8, frameon=False)
    return fig


def plot_report_draws(draws: pd.DataFrame) -> Figure:
    """Return each draw's 8-token 'improvement %' per strategy, the report's own figures marked (notebook 09)."""
    from .plotting import new_figure

    fig = new_figure(7.0, 3.8)
    ax = fig.add_subplot()
    for i, strategy in enumerate(REPORT_STRATEGIES):
        values = draws[draws["strategy"] == strategy]["improvement_pct"]
        jitter = [(k % 5 - 2) * 0.05 for k in range(len(values))]
        ax.scatter([i + j for j in jitter], values, color=_COLORS.get(strategy), s=18, alpha=0.8,
                   label="one random draw" if i == 0 else None)
        ax.scatter([i + 0.3], [REPORT_FINDINGS[strategy]], marker="x", color="black", s=40,
                   label="the report's figure" if i == 0 else None)
    ax.axhline(0, color="#636363", lw=0.8)
    ax.set_xticks(range(len(REPORT_STRATEGIES)), [s.replace("_", "\n") for s in REPORT_STRATEGIES], fontsize=8)
    ax.set_ylabel("'improvement' on one 8-token test sequence (%)")
    ax.set_title("the report's protocol, redone with a working model over random draws", fontsize=10)
    ax.grid(alpha=0.3, lw=0.5, axis="y")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


# --- re-running a committed run ------------------------------------------------------------------------------------

def rerun(size: str, strategy: str, seed: int, *, folder: str | Path | None = None,
          model_and_tokenizer: tuple | None = None, corpus_data: Corpus | None = None,
          general_data: list[str] | None = None) -> dict:
    """Return the record of one final run of the committed sweep, trained again here (notebook 09).

    It runs with the committed spec at the rate the sweep chose, in a temporary folder, never the committed one;
    `model_and_tokenizer` and `corpus_data` replace the default model and corpus.
    """
    path = _folder(folder)
    lr = chosen_rate(strategy, size, path)
    committed = run_path(path, size, strategy, lr, seed)
    if not committed.is_file():
        raise ValueError(f"The sweep in {path} has no final run of {strategy} at size {size} with seed {seed}.")
    with tempfile.TemporaryDirectory() as tmp:
        sweep = Sweep(tmp, sweep_spec(path), model_and_tokenizer=model_and_tokenizer, corpus_data=corpus_data,
                      general_data=general_data, progress=False)
        model, record = sweep.train(size, strategy, lr, seed)
        record.update(chosen_lr=lr, **sweep.scores(model))
    return record | {"committed": json.loads(committed.read_text()), "committed_path": str(committed)}


def rerun_report_draw(draw: int = 0, *, folder: str | Path | None = None, model_and_tokenizer: tuple | None = None,
                      corpus_data: Corpus | None = None) -> dict:
    """Return draw `draw` of the report's protocol run again here, the committed one under 'committed' (notebook 09);
    its general-English scores are not recomputed (the check reads the 8-token and test perplexities)."""
    path = _folder(folder)
    committed = path / "report" / f"draw-{draw}.json"
    if not committed.is_file():
        raise ValueError(f"The sweep in {path} has no report draw {draw}.")
    spec = dataclasses.replace(sweep_spec(path), score_general=False)
    with tempfile.TemporaryDirectory() as tmp:
        sweep = Sweep(tmp, spec, model_and_tokenizer=model_and_tokenizer, corpus_data=corpus_data, progress=False)
        record = sweep.report_draw(draw, sweep.test_perplexity(sweep.model))
    return record | {"committed": json.loads(committed.read_text())}


def relative_gap(a: float, b: float) -> float:
    """Return |a - b| / |b|, 0 when both are 0 (notebook 09)."""
    return 0.0 if a == b else abs(a - b) / abs(b) if b else math.inf
