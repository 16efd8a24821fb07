"""Figures of the notebooks: which parts of a model train, how losses move in training, what the KV-cache loop costs."""
from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure


def new_figure(width: float = 6.5, height: float = 3.8) -> Figure:
    """Return an empty figure a notebook draws once, when returned or displayed (first used in notebook 01)."""
    # Through pyplot, so that Jupyter's inline backend loads and registers its PNG formatter (a bare Figure() shows
    # as "<Figure size ...>" text); closed at once, so the backend does not draw it again at the end of the cell.
    fig = plt.figure(figsize=(width, height))
    plt.close(fig)
    return fig


def show_figure(fig: Figure, alt: str) -> None:
    """Display `fig` as a PNG described by `alt`, its alt text (first used in notebook 01).

    Notebook outputs have no alt attribute, so the description goes where readers without the picture look: the
    output's text form (what a text-only viewer, nbval and a screen reader get) and the image's "alt" metadata,
    the key IPython's Image(alt=...) writes and site builders read.
    """
    from IPython.display import display  # imported here: `import helpers` stays fast

    if not alt.strip():
        raise ValueError("alt is empty: describe what the figure shows, in a sentence a reader without it can use.")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(fig)
    png = base64.b64encode(buffer.getvalue()).decode("ascii")
    display({"image/png": png, "text/plain": alt}, raw=True, metadata={"image/png": {"alt": alt}})


def plot_trainable_map(table: pd.DataFrame, *, title: str | None = None, ax=None) -> Figure:
    """Return a figure with one bar per model part, bottom part at the bottom, trainable share on top (notebook 03)."""
    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, max(2.5, 0.22 * len(table) + 1)))
    parts = list(table.index)
    y = range(len(parts))
    millions_total = table["parameters"] / 1e6
    millions_trainable = table["trainable"] / 1e6
    ax.barh(y, millions_total, color="#d9d9d9", label="frozen")
    ax.barh(y, millions_trainable, color="#2b8cbe", label="trainable")
    ax.set_yticks(list(y), parts, fontsize=7 if len(parts) > 16 else 9)
    partly = (table["trainable"] > 0) & (table["trainable"] < table["parameters"])
    if (partly & (table["trainable"] < 0.02 * table["parameters"].max())).any():
        # A partly trained part under 2 % of the axis (LoRA: 0.16 M of a 3.6 M block, beside a 28 M embedding) is a
        # pixel or two wide on a linear axis and looks frozen; on a log axis each decade gets the same width.
        ax.set_xscale("log")
        smallest = min(v for v in list(millions_total) + list(millions_trainable) if v > 0)
        ax.set_xlim(smallest / 3, millions_total.max() * 8)
        ax.set_xlabel("parameters (millions, log scale)")
        # A log axis shrinks the gap between the bars, so each partly trained part also states its share.
        for i in np.flatnonzero(partly):
            share = table["trainable"].iloc[i] / table["parameters"].iloc[i]
            ax.annotate(f"{share:.1%}", (millions_total.iloc[i], i), xytext=(3, 0), textcoords="offset points",
                        va="center", fontsize=7 if len(parts) > 16 else 8, color="#2b8cbe")
    else:
        ax.set_xlabel("parameters (millions)")
    if "note" in table:
        left = ax.get_xlim()[0] if ax.get_xscale() == "log" else 0
        for i, note in enumerate(table["note"]):
            if note:
                ax.annotate(note, (left, i), xytext=(4, 0), textcoords="offset points", va="center", fontsize=7,
                            color="#555555")
    trainable, total = int(table["trainable"].sum()), int(table["parameters"].sum())
    ax.set_title(title or f"trainable {trainable / 1e6:.2f} M of {total / 1e6:.2f} M parameters "
                          f"({trainable / total:.1%})")
    # Lower right is free beside the blocks, except on a log axis, where the embedding's bar reaches it.
    ax.legend(loc="upper right" if ax.get_xscale() == "log" else "lower right", fontsize=8)
    ax.figure.tight_layout()
    return ax.figure


def plot_history(history: pd.DataFrame | dict[str, pd.DataFrame], *, title: str | None = None) -> Figure:
    """Return a figure of training (lines) and validation loss (markers) against tokens seen (notebook 03)."""
    runs = history if isinstance(history, dict) else {"": history}
    _, ax = plt.subplots(figsize=(6.5, 3.8))
    for i, (name, frame) in enumerate(runs.items()):
        color = f"C{i}"
        label = f"{name} " if name else ""
        trained = frame.dropna(subset=["train_loss"])
        ax.plot(trained["tokens"], trained["train_loss"], color=color, alpha=0.6, label=f"{label}train loss")
        checked = frame.dropna(subset=["val_loss"])
        ax.plot(checked["tokens"], checked["val_loss"], "o--", color=color, label=f"{label}validation loss")
    ax.set_xlabel("training tokens seen")
    ax.set_ylabel("next-token loss (nats)")
    right = ax.secondary_yaxis("right", functions=(_exp, _log))
    right.set_ylabel("perplexity")
    ax.set_title(title or "loss while training")
    ax.legend(fontsize=8)
    ax.figure.tight_layout()
    return ax.figure


def _exp(v):
    return np.exp(np.clip(v, -50, 50))


def _log(p):
    return np.log(np.clip(p, math.exp(-50), None))


def plot_timing(table: pd.DataFrame) -> Figure:
    """Return a figure of forward + backward seconds against T for both modes, and their ratio (notebook 02)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.plot(table.index, table["full (s)"], "o-", label="full sequence (one forward)")
    left.plot(table.index, table["token by token (s)"], "s-", label="token by token (T forwards)")
    left.set_yscale("log")
    left.set_ylabel("forward + backward (s)")
    left.legend(fontsize=8)
    right.plot(table.index, table["ratio"], "o-", color="C3")
    right.set_ylabel("token by token / full sequence")
    right.axhline(1, color="grey", lw=0.8)
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(table.index), [str(t) for t in table.index])
        ax.set_xlabel("sequence length T (tokens)")
    fig.tight_layout()
    return fig


# Colours of plot_windows' cells; the blue is the one plot_trainable_map gives to what counts (there: trainable).
_CONTEXT, _SCORED, _PREFIX = "#cfcfcf", "#2b8cbe", "#f4a259"
_MAX_WINDOW_TOKENS = 200


def plot_windows(n_tokens: int, block_size: int, strides: Sequence[int | None] = (None,), *,
                 n_prefix: int = 0) -> Figure:
    """Return a panel per stride of perplexity's windows: the tokens each feeds as context and scores (notebook 01)."""
    from .evaluation import windows

    strides = list(strides)
    if not strides:
        raise ValueError("strides is empty: pass at least one stride, e.g. (None,) for non-overlapping windows.")
    if not 2 <= n_tokens <= _MAX_WINDOW_TOKENS:
        raise ValueError(
            f"n_tokens must be between 2 and {_MAX_WINDOW_TOKENS} so that every token stays a readable cell; got "
            f"{n_tokens}. The figure shows the rule on a short made-up text: scale block_size and stride down with it."
        )
    # windows() is what token_nll feeds the model, so the figure cannot drift from the code it explains.
    layouts = [(stride, windows(n_tokens, block_size, stride, n_prefix=n_prefix)) for stride in strides]
    span = block_size - n_prefix
    fig = new_figure(6.5, 0.9 + sum(0.3 * len(spans) + 0.55 for _, spans in layouts))
    axes = fig.subplots(len(layouts), 1, sharex=True, squeeze=False,
                        gridspec_kw={"height_ratios": [len(spans) + 1 for _, spans in layouts]})[:, 0]
    for ax, (stride, spans) in zip(axes, layouts):
        scored_total = 0
        for row, (begin, end, n_context) in enumerate(spans):
            # The first fed position is never a target; with a prefix that position is the prefix's.
            first_scored = begin + max(n_context, 1 - n_prefix)
            scored_total += end - first_scored
            cells = [(begin - n_prefix + j, _PREFIX) for j in range(n_prefix)]
            cells += [(t, _CONTEXT if t < first_scored else _SCORED) for t in range(begin, end)]
            for x, color in cells:
                ax.add_patch(plt.Rectangle((x, row + 0.1), 1, 0.8, facecolor=color, edgecolor="white", linewidth=1.5))
            ax.annotate(f"{end - first_scored} scored", (n_tokens, row + 0.5), xytext=(6, 0),
                        textcoords="offset points", va="center", fontsize=8, color="#555555")
        ax.set_ylim(len(spans), 0)
        ax.set_yticks([r + 0.5 for r in range(len(spans))], [f"window {r + 1}" for r in range(len(spans))], fontsize=8)
        ax.tick_params(axis="y", length=0)
        step = span if stride is None else stride
        how = "the default: windows do not overlap" if step == span else f"each window re-reads {span - step} tokens"
        ax.set_title(f"stride {step} ({how}): {scored_total} of {n_tokens} tokens scored", fontsize=9, loc="left")
        for side in ("top", "right", "left"):
            ax.spines[side].set_visible(False)
    last = axes[-1]
    last.set_xlim(-n_prefix, n_tokens + 2.5)
    ticks = range(0, n_tokens, 2 if n_tokens <= 40 else 10)
    last.set_xticks([t + 0.5 for t in ticks], [str(t) for t in ticks], fontsize=8)
    last.set_xlabel(f"position of the token in the text (window of {block_size} tokens)", fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in (_CONTEXT, _SCORED, _PREFIX)[: 3 if n_prefix else 2]]
    labels = ["fed as context only", "scored: predicted from the tokens to its left", "BOS prefix (context only)"]
    fig.legend(handles, labels[: len(handles)], loc="upper center", ncol=len(handles), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))
    return fig
