"""Figures of the notebooks: which parts of a model train, how the losses move while training, what the KV-cache loop costs."""
from __future__ import annotations

import math

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.figure import Figure


def new_figure(width: float = 6.5, height: float = 3.8) -> Figure:
    """Return an empty figure that a notebook draws once, as the value it is returned as (or passed to display)."""
    # Made through pyplot so that Jupyter's inline backend gets loaded and registers its PNG formatter: a bare
    # Figure() in a kernel where pyplot never drew shows up as "<Figure size ...>" text. Closed at once, so the
    # backend does not draw it a second time at the end of the cell, and redrawn widgets do not pile up figures.
    fig = plt.figure(figsize=(width, height))
    plt.close(fig)
    return fig


def plot_trainable_map(table: pd.DataFrame, *, title: str | None = None, ax=None) -> Figure:
    """Return a figure with one bar per model part (bottom part at the bottom): all parameters, trainable ones on top."""
    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, max(2.5, 0.22 * len(table) + 1)))
    parts = list(table.index)
    y = range(len(parts))
    millions_total = table["parameters"] / 1e6
    millions_trainable = table["trainable"] / 1e6
    ax.barh(y, millions_total, color="#d9d9d9", label="frozen")
    ax.barh(y, millions_trainable, color="#2b8cbe", label="trainable")
    ax.set_yticks(list(y), parts, fontsize=7 if len(parts) > 16 else 9)
    ax.set_xlabel("parameters (millions)")
    if "note" in table:
        for i, note in enumerate(table["note"]):
            if note:
                ax.annotate(note, (0, i), xytext=(4, 0), textcoords="offset points", va="center", fontsize=7, color="#555555")
    trainable, total = int(table["trainable"].sum()), int(table["parameters"].sum())
    ax.set_title(title or f"trainable {trainable / 1e6:.2f} M of {total / 1e6:.2f} M parameters ({trainable / total:.1%})")
    ax.legend(loc="lower right", fontsize=8)
    ax.figure.tight_layout()
    return ax.figure


def plot_history(history: pd.DataFrame | dict[str, pd.DataFrame], *, title: str | None = None, ax=None) -> Figure:
    """Return a figure of training loss (lines) and validation loss (markers) against tokens seen, one colour per run."""
    runs = history if isinstance(history, dict) else {"": history}
    if ax is None:
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
    right = ax.secondary_yaxis("right", functions=(lambda v: _exp(v), lambda p: _log(p)))
    right.set_ylabel("perplexity")
    ax.set_title(title or "loss while training")
    ax.legend(fontsize=8)
    ax.figure.tight_layout()
    return ax.figure


def _exp(v):
    import numpy as np

    return np.exp(np.clip(v, -50, 50))


def _log(p):
    import numpy as np

    return np.log(np.clip(p, math.exp(-50), None))


def plot_timing(table: pd.DataFrame) -> Figure:
    """Return a figure of forward + backward seconds against T for both modes, and their ratio against T."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.plot(table.index, table["full (s)"], "o-", label="full sequence (one forward)")
    left.plot(table.index, table["token by token (s)"], "s-", label="token by token (T forwards)")
    left.set_xscale("log", base=2)
    left.set_yscale("log")
    left.set_xlabel("sequence length T (tokens)")
    left.set_ylabel("forward + backward (s)")
    left.set_xticks(list(table.index), [str(t) for t in table.index])
    left.legend(fontsize=8)
    right.plot(table.index, table["ratio"], "o-", color="C3")
    right.set_xscale("log", base=2)
    right.set_xticks(list(table.index), [str(t) for t in table.index])
    right.set_xlabel("sequence length T (tokens)")
    right.set_ylabel("token by token / full sequence")
    right.axhline(1, color="grey", lw=0.8)
    fig.tight_layout()
    return fig
