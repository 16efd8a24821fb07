"""Every notebook in a real JupyterLab and a real (headless) browser: it opens clean and renders, and notebook 08's
two widgets work when clicked.

Run alone with `make browser`. Screenshots land in tests/browser/screenshots/ (git-ignored).
"""
from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import pytest

from .conftest import FOLDERS, ROOT

NOTEBOOKS = [f"{folder}/{path.name}" for folder in FOLDERS for path in sorted((ROOT / folder).glob("*.ipynb"))]
EXPLORER_NOTEBOOK = "notebooks/08_compare_strategies.ipynb"

# JupyterLab's own API (exposed by --LabApp.expose_app_in_browser): open a notebook, wait for its kernel, report.
OPEN = """async (path) => {
  const app = window.jupyterapp;
  const widget = await app.commands.execute('docmanager:open', {path, factory: 'Notebook'});
  await widget.context.ready;
  await widget.sessionContext.ready;
  const deadline = Date.now() + 60000;
  while (widget.sessionContext.session?.kernel?.status !== 'idle') {
    if (Date.now() > deadline) throw new Error('the kernel of ' + path + ' never became idle');
    await new Promise(r => setTimeout(r, 100));
  }
  app.shell.activateById(widget.id);
  return widget.id;
}"""
REPORT = """async (id) => {
  const node = document.getElementById(id);
  const images = [...node.querySelectorAll('.jp-OutputArea-output img')];
  await Promise.all(images.map(img => img.decode().catch(() => null)));
  const widget = window.jupyterapp.shell.currentWidget;
  return {
    dirty: widget.context.model.dirty,
    outputs: node.querySelectorAll('.jp-OutputArea-child').length,
    images: images.length,
    drawn: images.filter(img => img.complete && img.naturalWidth > 0).length,
    errors: node.querySelectorAll('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.error"]').length,
    text: [...node.querySelectorAll('.jp-OutputArea-output')].map(n => n.innerText).join('\\n'),
  };
}"""
SAVE_AND_CLOSE = """async () => {
  const app = window.jupyterapp;
  const widget = app.shell.currentWidget;
  await app.commands.execute('docmanager:save');
  await widget.sessionContext.shutdown();
  widget.dispose();
}"""
STALE_BAR = re.compile(r"\b0%\|[^\n]*\| 0/\d+")


@pytest.fixture(scope="module")
def page(browser, lab):
    """Yield one JupyterLab page for the module, with its screenshots saved if a test fails."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(60_000)
    page.goto(f"{lab.url}/lab?token={lab.token}")
    page.wait_for_function("() => window.jupyterapp && document.querySelector('#jp-main-dock-panel')")
    page.evaluate("() => window.jupyterapp.restored")
    yield page
    page.close()


def _saved_outputs(path: Path) -> tuple[int, int]:
    """Return (outputs as JupyterLab shows them, PNG images) saved in the notebook at `path`."""
    shown = images = 0
    for cell in json.loads(path.read_text())["cells"]:
        previous = None
        for output in cell.get("outputs", []):
            stream = output.get("name") if output["output_type"] == "stream" else None
            # JupyterLab shows consecutive stream outputs of one name (stdout, stderr) as one.
            shown += not (stream and stream == previous)
            previous = stream
            images += "image/png" in output.get("data", {})
    return shown, images


@pytest.mark.parametrize("notebook", NOTEBOOKS)
def test_a_notebook_opens_unmodified_and_renders_its_saved_outputs(page, lab, notebook):
    widget_id = page.evaluate(OPEN, notebook)
    seen = page.evaluate(REPORT, widget_id)
    outputs, images = _saved_outputs(ROOT / notebook)
    page.evaluate(SAVE_AND_CLOSE)
    assert not seen["dirty"], f"{notebook} is marked modified as soon as it opens (kernelspec or metadata rewritten?)"
    assert (lab.root / notebook).read_bytes() == (ROOT / notebook).read_bytes(), \
        f"saving {notebook} unchanged rewrote the file: its metadata differs from what JupyterLab writes"
    assert seen["outputs"] == outputs, f"{notebook}: {seen['outputs']} outputs shown, {outputs} saved"
    assert seen["images"] == seen["drawn"] == images, f"{notebook}: {seen['drawn']} of {images} images drawn"
    assert seen["errors"] == 0, f"{notebook} shows an error output"
    assert not STALE_BAR.search(seen["text"]), f"{notebook} shows a progress bar stuck at 0%"


RUN_ALL = """async () => {
  const app = window.jupyterapp;
  const widget = app.shell.currentWidget;
  await app.commands.execute('notebook:run-all-cells');
  const deadline = Date.now() + 180000;
  const busy = () => widget.sessionContext.session?.kernel?.status !== 'idle'
      || [...widget.content.widgets].some(c => c.model.type === 'code' && c.model.executionCount === null
                                               && c.model.sharedModel.getSource().trim());
  while (busy()) {
    if (Date.now() > deadline) throw new Error('notebook 08 did not finish running');
    await new Promise(r => setTimeout(r, 200));
  }
}"""
CLOSE_WITHOUT_SAVING = """async () => {
  const widget = window.jupyterapp.shell.currentWidget;
  await widget.sessionContext.shutdown();
  widget.context.model.dirty = false;
  widget.dispose();
}"""
TRAINABLE_BLUE = (0x2B, 0x8C, 0xBE)  # plot_trainable_map's colour for trainable parameters
TRAIN_LOSS_BLUE = (0x6B, 0xAE, 0xD6)  # the training panel's colour for the training loss


def _share_of_colour(src: str, colour: tuple[int, int, int], tolerance: int = 12) -> float:
    """Return the fraction of the pixels of a data-URL PNG within `tolerance` of `colour` in every channel."""
    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB")
    pixels = list(image.getdata())
    close = sum(all(abs(p - c) <= tolerance for p, c in zip(pixel, colour)) for pixel in pixels)
    return close / len(pixels)


def _cell_output(panel, call: str):
    """Return the output area of the code cell whose source contains `call`."""
    cell = panel.locator(".jp-CodeCell").filter(has=panel.page.locator(".jp-InputArea", has_text=call))
    return cell.locator(".jp-Cell-outputWrapper")


@pytest.fixture(scope="module")
def notebook08(page):
    """Yield notebook 08's panel after Run All in the browser (live widgets); close it unsaved afterwards."""
    widget_id = page.evaluate(OPEN, EXPLORER_NOTEBOOK)
    page.evaluate(RUN_ALL)
    yield page.locator(f"#{widget_id}")
    page.evaluate(CLOSE_WITHOUT_SAVING)


def _counts_line(name: str, **options) -> tuple[str, str]:
    """Return the explorer's counts line for strategy `name` as helpers computes it, and the strategy's summary."""
    from helpers.widgets import explore

    _, counts = explore(name, **options)
    return (f"{counts['trainable']:,} of {counts['total']:,} parameters trainable ({counts['percent']}%)",
            counts["summary"])


def test_the_strategy_explorer_follows_its_controls(notebook08, screenshots):
    from playwright.sync_api import expect

    explorer = _cell_output(notebook08, "strategy_explorer()")
    figure = explorer.locator(".widget-output img")
    expect(explorer).to_contain_text(_counts_line("full_fine_tuning")[0])
    first_figure = figure.get_attribute("src")

    explorer.locator(".widget-dropdown select").select_option("freeze_lower_layers")
    line, summary = _counts_line("freeze_lower_layers")
    expect(explorer).to_contain_text(line)
    expect(explorer).to_contain_text("(20 of 30)")
    assert figure.get_attribute("src") != first_figure, "the trainable map was not redrawn"

    # n_frozen takes the block count that the summary speaks of.
    n_frozen = explorer.locator(".widget-inline-hbox", has_text="n_frozen").locator("input")
    expect(n_frozen).to_have_value("20")
    n_frozen.fill("10")
    n_frozen.press("Enter")
    expect(explorer).to_contain_text(_counts_line("freeze_lower_layers", n_frozen=10)[0])
    expect(explorer).to_contain_text("(10 of 30)")
    explorer.screenshot(path=str(screenshots / "explorer_n_frozen_10.png"))

    # LoRA's trainable share is visible on the map, not a sliver a pixel wide.
    before = figure.get_attribute("src")
    explorer.locator(".widget-dropdown select").select_option("lora")
    expect(explorer).to_contain_text(_counts_line("lora")[0])
    expect(figure).not_to_have_attribute("src", before)
    explorer.screenshot(path=str(screenshots / "explorer_lora.png"))
    share = _share_of_colour(figure.get_attribute("src"), TRAINABLE_BLUE)
    assert share > 0.10, "LoRA's trainable bars are too thin to see"


def test_the_training_panel_trains_and_draws_from_the_first_step_to_the_last(notebook08, screenshots):
    from playwright.sync_api import expect

    panel = _cell_output(notebook08, "training_panel(results)")
    readout = panel.locator(".widget-slider .widget-readout")
    readout.click()
    readout.press("Control+a")
    readout.type("2")
    readout.press("Enter")
    expect(readout).to_have_text("2")
    status = panel.locator(".widget-label").last
    panel.locator("button", has_text="Train").click()

    expect(status).to_have_text(re.compile(r"^step 1/2: train loss"), timeout=120_000)
    figure = panel.locator(".widget-output img")
    expect(figure).to_have_count(1)
    assert _share_of_colour(figure.get_attribute("src"), TRAIN_LOSS_BLUE, tolerance=20) > 0, \
        "after step 1 the plot shows no training-loss point"
    panel.screenshot(path=str(screenshots / "panel_step_1.png"))

    expect(status).to_contain_text(re.compile(r"^done: step 2/2, validation loss \d+\.\d{3}$"), timeout=120_000)
    expect(panel.locator(".progress-bar")).to_have_attribute("style", re.compile(r"width: 100%"))
    expect(panel.locator("button", has_text="Train")).to_be_enabled()
    panel.screenshot(path=str(screenshots / "panel_done.png"))
