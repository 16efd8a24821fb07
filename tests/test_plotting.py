"""plot_windows draws exactly the windows helpers.perplexity feeds, and refuses what it cannot draw readably."""
from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
import pytest
import torch
from matplotlib.patches import Rectangle

import helpers
from conftest import tiny_config, tiny_model
from helpers.plotting import _CONTEXT, _PREFIX, _SCORED, plot_windows

CASES = [  # (n_tokens, block_size, stride, n_prefix)
    (20, 8, None, 0),
    (20, 8, 4, 0),
    (21, 8, 3, 1),
    (9, 8, None, 1),
    (50, 16, 5, 2),
]


def _cells(ax) -> dict[str, int]:
    """Count the token cells of one panel by colour."""
    counts = {"context": 0, "scored": 0, "prefix": 0}
    names = {_CONTEXT: "context", _SCORED: "scored", _PREFIX: "prefix"}
    for patch in ax.patches:
        if isinstance(patch, Rectangle):
            hex_colour = "#{:02x}{:02x}{:02x}".format(*(round(255 * c) for c in patch.get_facecolor()[:3]))
            counts[names[hex_colour]] += 1
    return counts


@pytest.mark.parametrize("n_tokens, block_size, stride, n_prefix", CASES)
def test_scored_cells_are_the_tokens_token_nll_scores(n_tokens, block_size, stride, n_prefix):
    model = tiny_model("llama")
    ids = torch.randint(3, 200, (n_tokens,), generator=torch.Generator().manual_seed(0))
    prefix = [1] * n_prefix
    _, n_scored = helpers.token_nll(model, ids, block_size=block_size, stride=stride, prefix=prefix, progress=False)
    spans = helpers.evaluation.windows(n_tokens, block_size, stride, n_prefix=n_prefix)

    (ax,) = plot_windows(n_tokens, block_size, [stride], n_prefix=n_prefix).axes
    cells = _cells(ax)
    assert cells["scored"] == n_scored
    assert cells["prefix"] == n_prefix * len(spans)
    # Every fed text token is drawn: context plus scored is what the windows feed.
    assert cells["context"] + cells["scored"] == sum(end - begin for begin, end, _ in spans)
    assert f"{n_scored} of {n_tokens} tokens scored" in ax.get_title(loc="left")
    assert len(ax.get_yticks()) == len(spans)


def test_one_panel_per_stride_and_the_figure_is_left_closed():
    before = plt.get_fignums()
    fig = plot_windows(20, 8, (None, 4, 2))
    assert plt.get_fignums() == before
    titles = [ax.get_title(loc="left") for ax in fig.axes]
    assert [t.split(" (")[0] for t in titles] == ["stride 8", "stride 4", "stride 2"]
    assert "do not overlap" in titles[0] and "re-reads 4 tokens" in titles[1]


@pytest.mark.parametrize(
    "args, kwargs, message",
    [
        ((20, 8, ()), {}, "strides is empty"),
        ((201, 8), {}, "n_tokens must be between 2 and 200"),
        ((1, 8), {}, "n_tokens must be between 2 and 200"),
        ((20, 8, (9,)), {}, "stride must be between 1 and block_size"),
        ((20, 2, (None,)), {"n_prefix": 2}, "longer than the 2-token prefix"),
    ],
)
def test_bad_input_is_one_clear_value_error(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        plot_windows(*args, **kwargs)


def test_trainable_map_uses_a_log_axis_when_the_trainable_share_would_be_a_sliver():
    # LoRA on the default model: 0.16 M trainable in each 3.6 M block, beside a 28 M embedding.
    lora = pd.DataFrame({"parameters": [28_311_552, 3_704_448, 3_704_448], "trainable": [0, 163_840, 163_840],
                         "note": ["", "", ""]}, index=["embeddings", "block 0", "block 1"])
    ax = helpers.plot_trainable_map(lora).axes[0]
    assert ax.get_xscale() == "log" and "log scale" in ax.get_xlabel()
    assert ax.get_xlim()[0] > 0 and ax.get_xlim()[1] > 28.3
    assert [t.get_text() for t in ax.texts] == ["4.4%", "4.4%"]  # each partly trained part states its share
    frozen = helpers.apply_strategy(helpers.meta_model(tiny_config("llama")), "freeze_lower_layers")
    upper = helpers.trainable_map(frozen)
    assert helpers.plot_trainable_map(upper).axes[0].get_xscale() == "linear"  # whole blocks train: bars are wide
    plt.close("all")


def test_show_figure_carries_its_alt_text_beside_the_png():
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output

    InteractiveShell.instance()  # a shell, as in a notebook, so that display() publishes rather than prints
    fig = helpers.plotting.new_figure()
    fig.add_subplot().plot([0, 1], [1, 0])
    with capture_output() as captured:
        helpers.show_figure(fig, "a line falling from 1 to 0")
    (output,) = captured.outputs
    assert output.data["text/plain"] == output.metadata["image/png"]["alt"] == "a line falling from 1 to 0"
    assert output.data["image/png"].startswith("iVBORw0KGgo")  # base64 of the PNG signature


def test_show_figure_refuses_a_figure_without_a_description():
    with pytest.raises(ValueError, match="alt is empty"):
        helpers.show_figure(helpers.plotting.new_figure(), " ")
