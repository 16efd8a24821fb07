"""Two ipywidgets panels of notebook 08, a strategy explorer and a live training run, with static fallbacks.

In JupyterLab (or any frontend that can answer input()) the functions return live widgets. Under nbval, nbclient,
a plain Python process, or without ipywidgets, they return static output instead: a table, one figure.
"""
from __future__ import annotations

import inspect

import pandas as pd
from matplotlib.figure import Figure

from .data import Corpus, load_corpus
from .models import load_config, meta_model
from .plotting import new_figure, plot_trainable_map
from .registry import STRATEGIES, apply_strategy, strategy_options
from .strategies import count_parameters, find_layers, trainable_map


def widgets_available() -> bool:
    """Return True when live widgets can be shown: ipywidgets and a frontend that answers (notebook 08)."""
    try:
        import ipywidgets  # noqa: F401
        from IPython import get_ipython
    except ImportError:
        return False
    kernel = getattr(get_ipython(), "kernel", None)  # None in plain Python or a terminal IPython: nothing to draw on
    # nbclient and nbval execute with allow_stdin=False; JupyterLab, Notebook and VS Code allow input(), and any
    # frontend that can answer an input() prompt also runs the widget manager.
    return bool(getattr(kernel, "_allow_stdin", False))


def explore(name: str, config=None, **options) -> tuple[pd.DataFrame, dict]:
    """Return (trainable map, counts) of strategy `name` with `options` on a weightless model (notebook 08)."""
    model = apply_strategy(meta_model(config or load_config()), name, **options)
    trainable, total = count_parameters(model)
    return trainable_map(model), {"strategy": name, "trainable": trainable, "total": total,
                                  "percent": round(100 * trainable / total, 2), "summary": model.strategy_info.summary}


def explorer_table(config=None) -> pd.DataFrame:
    """Return trainable and total parameters of every strategy at its defaults (static explorer, notebook 08)."""
    rows = []
    for name in STRATEGIES:
        _, counts = explore(name, config)
        rows.append({k: counts[k] for k in ("strategy", "trainable", "total", "percent")})
    return pd.DataFrame(rows).set_index("strategy")


def _control(param: inspect.Parameter, resolved, n_blocks: int):
    """Return the input widget for one strategy option, or None for an option without a simple default."""
    import ipywidgets as w

    value, style = param.default, {"description_width": "initial"}
    if isinstance(value, float) and type(resolved) is int:
        # A fraction of the blocks (n_frozen=2/3) that the strategy resolves to a count: show and take the count,
        # the number its summary speaks of ("20 of 30"), not a float nobody would type.
        return w.BoundedIntText(value=resolved, min=0, max=n_blocks, description=f"{param.name} (of {n_blocks} blocks)",
                                style=style)
    if isinstance(value, bool):
        return w.Checkbox(value=value, description=param.name)
    if isinstance(value, int):
        return w.BoundedIntText(value=value, min=0, max=4096, description=param.name, style=style)
    if isinstance(value, float):
        return w.FloatText(value=value, description=param.name, style=style)
    return None  # e.g. LoRA's target modules: they keep their default


def strategy_explorer(config=None, *, interactive: bool | None = None):
    """Return a widget to pick a strategy and options, showing its trainable map (static: a table; notebook 08)."""
    config = config or load_config()
    if not (widgets_available() if interactive is None else interactive):
        return explorer_table(config)

    import ipywidgets as w
    from IPython.display import display

    choice = w.Dropdown(options=list(STRATEGIES), value=next(iter(STRATEGIES)), description="strategy")
    controls_box, output = w.HBox(), w.Output()
    controls: dict[str, object] = {}

    def refresh(*_):
        values = {k: c.value for k, c in controls.items()}
        with output:
            output.clear_output(wait=True)
            try:
                table, counts = explore(choice.value, config, **values)
            except ValueError as err:  # e.g. n_top larger than the model's blocks: show the message, keep the panel
                print(err)
                return
            print(f"{counts['trainable']:,} of {counts['total']:,} parameters trainable ({counts['percent']}%)")
            print(counts["summary"])
            fig = new_figure(6.5, max(2.5, 0.22 * len(table) + 1))
            plot_trainable_map(table, ax=fig.add_subplot())
            display(fig)

    n_blocks = len(find_layers(meta_model(config)).blocks)

    def rebuild(*_):
        controls.clear()
        resolved = apply_strategy(meta_model(config), choice.value).strategy_info.options
        for name, param in strategy_options(choice.value).items():
            control = _control(param, resolved.get(name), n_blocks)
            if control is not None:
                control.observe(refresh, names="value")
                controls[name] = control
        controls_box.children = tuple(controls.values())
        refresh()

    choice.observe(rebuild, names="value")
    rebuild()
    return w.VBox([choice, controls_box, output])


PANEL_STRATEGY = "lora"
"""The training panel's first choice, and the saved run its static view draws (when the results hold it)."""


def _loss_figure(history: pd.DataFrame, title: str, total_tokens: int | None = None) -> Figure:
    """Return the panel's figure: training loss per step and validation loss, over 0..total_tokens when given."""
    from .compare import legend_above

    fig = new_figure(6.5, 3.6)
    fig.set_layout_engine("constrained")  # which keeps the legend above the axes
    ax = fig.add_subplot()
    # Markers, so that a run of one step already shows its point.
    train = {"color": "#6baed6", "marker": ".", "ms": 7, "lw": 1}
    val = {"color": "#d94801", "marker": "o", "ms": 4, "lw": 1.5}
    trained, checked = history.dropna(subset=["train_loss"]), history.dropna(subset=["val_loss"])
    ax.plot(trained["tokens"], trained["train_loss"], **train)
    ax.plot(checked["tokens"], checked["val_loss"], **val)
    if total_tokens:
        # The whole run's span from the first step on, so the curve grows into a fixed frame.
        ax.set_xlim(-0.02 * total_tokens, 1.02 * total_tokens)
    ax.set_xlabel("training tokens seen")
    ax.set_ylabel("loss (nats)")
    ax.grid(alpha=0.3, lw=0.5)
    ax.set_title(title, fontsize=10)
    legend_above(fig, {"training loss (each step's batch)": train, "validation loss": val})
    return fig


def training_panel(results: dict[str, dict] | None = None, *, model_name: str | None = None, corpus=None,
                   interactive: bool | None = None):
    """Return a widget that trains a strategy a few steps, redrawing its loss (static: a saved run; notebook 08)."""
    if not (widgets_available() if interactive is None else interactive):
        from .experiment import load_results

        results = results if results is not None else load_results()
        if not results:
            raise ValueError("No saved runs to draw: run a strategy notebook (03-07) first, or pass "
                             "results={strategy: result}.")
        name = PANEL_STRATEGY if PANEL_STRATEGY in results else next(iter(results))
        # Read in JupyterLab before the cell is run again: the title says what the picture is and how to go live.
        return _loss_figure(pd.DataFrame(results[name]["history"]),
                            f"{name}: the run saved by its notebook (run this cell in JupyterLab to train live)")

    import ipywidgets as w

    choice = w.Dropdown(options=list(STRATEGIES), value=PANEL_STRATEGY, description="strategy")
    steps = w.IntSlider(value=10, min=2, max=50, description="steps")
    button = w.Button(description="Train", button_style="primary", icon="play")
    progress = w.IntProgress(value=0, min=0, max=steps.value, description="progress")
    status, output = w.Label(), w.Output()

    def run(_):
        button.disabled = True
        try:
            _train_live(choice.value, steps.value, progress, status, output, model_name=model_name, corpus=corpus)
        except Exception as err:  # show the error in the panel; the notebook keeps running
            status.value = f"error: {err}"
        finally:
            button.disabled = False

    button.on_click(run)
    return w.VBox([w.HBox([choice, steps, button]), progress, status, output])


def _train_live(strategy: str, total: int, progress, status, output, *, model_name: str | None, corpus) -> None:
    """Train `strategy` for `total` steps, redrawing the loss in `output` and counting in `progress` and `status`."""
    from IPython.display import display

    from .experiment import choose_learning_rate, recipe_config, recipe_data
    from .models import is_default_model, load_model
    from .training import train_strategy

    progress.value, progress.max = 0, total
    rows: list[dict] = []
    status.value = "loading the model ..."
    model, tokenizer = load_model(model_name)
    texts = corpus if isinstance(corpus, Corpus) or corpus is None else load_corpus(corpus)
    train_data, val_data = recipe_data(tokenizer, texts)
    rate = {}
    if not is_default_model(model_name=model_name):  # the sweep's rates are the default model's
        status.value = "choosing a learning rate on validation for this model ..."
        rate["lr"] = choose_learning_rate(strategy, model, tokenizer, texts, show=False)
    model = apply_strategy(model, strategy)
    config = recipe_config(strategy, steps=total, warmup_steps=min(3, total), eval_every=max(1, total // 5),
                           progress=False, **rate)

    def draw(row: dict) -> None:
        rows.append(row)
        step = row["step"]
        progress.value = step
        # Say what runs next: the last step's validation pass takes a while, and "step 9/10" would sit there.
        upcoming = ""
        if step < total:
            validates = (step + 1) % config.eval_every == 0 or step + 1 == total
            upcoming = f"; running step {step + 1}" + (" and a validation pass" if validates else "")
        status.value = f"step {step}/{total}: train loss {row['train_loss']:.3f}{upcoming}"
        with output:
            output.clear_output(wait=True)
            display(_loss_figure(pd.DataFrame(rows), f"{strategy}, live: step {step} of {total}",
                                 total_tokens=row["tokens"] * total // step))

    status.value = f"a first validation pass, then step 1/{total} ..."
    history = train_strategy(model, train_data, val_data, config, callback=draw)
    final = history["val_loss"].dropna().iloc[-1]
    done_steps = int(history["step"].iloc[-1])
    with output:  # the whole history, the validation loss before training included
        output.clear_output(wait=True)
        display(_loss_figure(history, f"{strategy}: {done_steps} steps, validation loss {final:.3f}",
                             total_tokens=int(history["tokens"].iloc[-1])))
    status.value = f"done: step {done_steps}/{total}, validation loss {final:.3f}"
