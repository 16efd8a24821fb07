"""The course website (make site) in a real, headless browser: chapters load clean with every figure drawn, search
finds the chapter that defines a term, and the theme's next links walk the chapters in order.

The site is served from site/ by a local http.server (as a reader's `python -m http.server -d site` would), and every
request that leaves 127.0.0.1 is refused and reported: the site must work offline. Run `make site` first (`make
browser` and `make test` do). Screenshots land in tests/browser/screenshots/ (git-ignored).
"""
from __future__ import annotations

import functools
import http.server
import json
import threading
from pathlib import Path
from urllib.parse import urlparse

import pytest

from .conftest import ROOT

SITE = ROOT / "site"
CHAPTERS = [path.stem for path in sorted((ROOT / "notebooks").glob("*.ipynb"))]
DEFINES_PERPLEXITY = "01_baseline_perplexity"
IMAGES = """async () => {
  const images = [...document.querySelectorAll('article img')];
  await Promise.all(images.map(img => img.decode().catch(() => null)));
  return {images: images.length, drawn: images.filter(img => img.complete && img.naturalWidth > 0).length,
          broken: images.filter(img => !(img.complete && img.naturalWidth > 0)).map(img => img.src),
          tables: document.querySelectorAll('article table.dataframe').length};
}"""


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def site_url() -> str:
    """Serve site/ on a free 127.0.0.1 port in a thread for the module; return its base URL."""
    if not (SITE / "index.html").is_file() or not (SITE / "search.html").is_file():
        pytest.fail(f"the course website is not built in {SITE}: run `make site`", pytrace=False)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(SITE)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def page(browser, site_url):
    """Yield a fresh page that records console errors, page errors, failed requests and off-machine requests."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(30_000)
    page.problems = []
    page.on("console", lambda m: m.type == "error" and page.problems.append(f"console error: {m.text} ({m.location})"))
    page.on("pageerror", lambda error: page.problems.append(f"page error: {error}"))
    page.on("response", lambda r: r.status >= 400 and page.problems.append(f"HTTP {r.status}: {r.url}"))

    def local_only(route):
        if urlparse(route.request.url).hostname == "127.0.0.1":
            return route.continue_()
        page.problems.append(f"the page fetched {route.request.url} (the site must work offline)")
        return route.abort()

    page.route("**/*", local_only)
    yield page
    page.close()


def _saved(notebook: Path) -> tuple[int, int]:
    """Return (PNG outputs, pandas HTML tables) saved in `notebook`."""
    images = tables = 0
    for cell in json.loads(notebook.read_text())["cells"]:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            images += "image/png" in data
            tables += "".join(data.get("text/html", "")).count('class="dataframe')
    return images, tables


def test_the_chapters_are_00_to_10():
    assert [name[:2] for name in CHAPTERS] == [f"{i:02d}" for i in range(len(CHAPTERS))] and len(CHAPTERS) >= 11


def test_every_chapter_loads_clean_with_its_figures_and_tables(page, site_url, screenshots):
    for name in CHAPTERS:
        response = page.goto(f"{site_url}/notebooks/{name}.html", wait_until="load")
        assert response.ok, f"{name}: HTTP {response.status}"
        seen = page.evaluate(IMAGES)
        images, tables = _saved(ROOT / "notebooks" / f"{name}.ipynb")
        assert seen["drawn"] == seen["images"], f"{name}: images not drawn: {seen['broken']}"
        assert seen["images"] >= images, f"{name}: {seen['images']} images shown, {images} PNG outputs saved"
        assert seen["tables"] >= tables, f"{name}: {seen['tables']} tables shown, {tables} saved"
        if page.locator("script[src*='mathjax/tex-chtml.js']").count():
            page.wait_for_selector("article mjx-container", state="attached")  # the maths typeset, offline
        if name == DEFINES_PERPLEXITY:
            page.screenshot(path=str(screenshots / f"site_{name}.png"))
        page.wait_for_load_state("networkidle")
        assert not page.problems, f"{name}: {page.problems}"
    explorer = page.goto(f"{site_url}/notebooks/{CHAPTERS[8]}.html")
    assert explorer.ok
    note = page.locator(".widget-note")
    assert "run the notebook in JupyterLab" in note.inner_text() and "make lab" in note.inner_text(), \
        "notebook 08's page does not say that its widgets are static and how to run them live"


def test_search_finds_the_chapter_that_defines_perplexity(page, site_url, screenshots):
    page.goto(f"{site_url}/search.html?q=perplexity")
    summary = page.locator("#search-results .search-summary")
    summary.wait_for()
    page.wait_for_function("() => !document.querySelector('#search-results h2')?.textContent.includes('Searching')")
    results = page.locator("#search-results ul.search li a").evaluate_all("links => links.map(a => a.href)")
    page.screenshot(path=str(screenshots / "site_search.png"))
    assert any(f"/notebooks/{DEFINES_PERPLEXITY}.html" in url for url in results), results
    assert not page.problems, page.problems


def test_next_links_walk_the_chapters_in_order(page, site_url, screenshots):
    page.goto(f"{site_url}/index.html")  # the site's root sends the reader to the home page
    page.wait_for_url("**/README.html")
    page.screenshot(path=str(screenshots / "site_home.png"))
    page.goto(f"{site_url}/notebooks/{CHAPTERS[0]}.html")
    for name in CHAPTERS[1:]:
        with page.expect_navigation() as navigation:
            page.locator("a.right-next").click()
        assert navigation.value.ok, f"the next link to {name} gave HTTP {navigation.value.status}"
        assert page.url.endswith(f"/notebooks/{name}.html"), f"after {name}'s predecessor came {page.url}"
        assert page.locator("article h1").first.inner_text().startswith(name[:2]), page.url
    assert not page.problems, page.problems
