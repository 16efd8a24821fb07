"""What the course website needs beyond Sphinx and myst-nb, without editing a notebook or README.md.

* The table of contents (docs/site/toctree.md) is appended to the home page (README.md) as Sphinx reads it.
* A page whose notebook holds interactive widgets, which a static page can only show in their saved, static form,
  gets a note at its top saying so and how to run them live.
* A link to a Markdown file or notebook that is not a page (data/README.md) becomes a download link, as a link to
  any other existing file does (myst-nb's own rule); a link to a file that does not exist still fails the build.
* MathJax is copied into the site from the django-static-mathjax wheel, so maths renders offline.
* myst-nb's scratch folder of output files goes beside the doctrees (build/), not beside site/ (the repository root).
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from docutils import nodes
from sphinx import addnodes
from sphinx.application import Sphinx
from sphinx.errors import ExtensionError

TOCTREE = Path(__file__).resolve().parents[1] / "toctree.md"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
IMPORTS_IPYWIDGETS = re.compile(r"^\s*(import ipywidgets|from ipywidgets\b)", re.MULTILINE)
NOTE_TITLE = "Interactive widgets"
NOTE = ("This page shows the notebook's interactive widgets in their static form: the tables and figures it saved "
        "when it was executed without a browser. To use them live, run the notebook in JupyterLab: ")
LIVE_COMMAND = "make lab"
# What a page needs of MathJax 3's es5 build: the combined TeX-to-HTML component and the fonts it loads.
MATHJAX_FILES = ("tex-chtml.js", "output/chtml/fonts/woff-v2")


def append_toctree(app: Sphinx, docname: str, source: list[str]) -> None:
    """Give the home page the site's table of contents (captions Chapters, Solutions, Reference)."""
    if docname == app.config.root_doc:
        source[0] = source[0].rstrip("\n") + "\n\n" + TOCTREE.read_text(encoding="utf-8")


def has_widgets(notebook: dict, calls: list[str]) -> bool:
    """Return True if `notebook` (nbformat JSON) has widget-view outputs or code that makes widgets."""
    for cell in notebook.get("cells", []):
        if cell.get("cell_type") != "code":
            continue
        if any(WIDGET_VIEW in output.get("data", {}) for output in cell.get("outputs", [])):
            return True
        source = "".join(cell.get("source", ""))
        if IMPORTS_IPYWIDGETS.search(source) or any(call in source for call in calls):
            return True
    return False


def widget_note() -> nodes.Element:
    note = nodes.admonition(classes=["note", "widget-note"])
    note += nodes.title(NOTE_TITLE, NOTE_TITLE)
    note += nodes.paragraph("", "", nodes.Text(NOTE), nodes.literal(LIVE_COMMAND, LIVE_COMMAND), nodes.Text("."))
    return note


def add_widget_note(app: Sphinx, doctree: nodes.document) -> None:
    """Put the widget note at the top of a notebook page whose notebook holds widgets (below its title)."""
    path = Path(app.env.doc2path(app.env.docname))
    if path.suffix != ".ipynb":
        return
    if not has_widgets(json.loads(path.read_text(encoding="utf-8")), app.config.course_site_widget_calls):
        return
    section = next(iter(doctree.findall(nodes.section)), None)
    if section is None:
        doctree.insert(0, widget_note())
    else:
        titles = [i for i, child in enumerate(section.children) if isinstance(child, nodes.title)]
        section.insert(titles[0] + 1 if titles else 0, widget_note())


def download_non_pages(app: Sphinx, doctree: nodes.document) -> None:
    """Turn links to existing source files that are not pages into download links (before downloads are collected).

    MyST makes a link to any file with a source suffix (.md, .ipynb) a link to a page; for one outside the pages
    (include_patterns) that would be an "Unknown source document" error although the file is there.
    """
    env = app.env
    for node in list(doctree.findall(addnodes.pending_xref)):
        if node.get("reftype") != "myst" or node.get("refdomain") != "doc" or node["reftarget"] in env.found_docs:
            continue
        for suffix in app.config.source_suffix:
            path = Path(app.srcdir) / (node["reftarget"] + suffix)
            if path.is_file():
                download = addnodes.download_reference(
                    refdomain=None, reftype="myst", refexplicit=node.get("refexplicit", False),
                    refdoc=node.get("refdoc", env.docname), reftarget="/" + path.relative_to(app.srcdir).as_posix(),
                    classes=["xref", "download", "myst"],
                )
                download += node.children
                node.replace_self(download)
                break


def copy_mathjax(app: Sphinx, exception: Exception | None) -> None:
    """Copy MathJax where mathjax_path points (_static/mathjax/) after an HTML build."""
    if exception is not None or app.builder.format != "html":
        return
    try:
        import mathjax  # the django-static-mathjax wheel (no Django needed to read its files)
    except ImportError as error:
        raise ExtensionError("django-static-mathjax is missing: run `make setup` (it is in the dev extras)") from error
    es5 = Path(mathjax.__file__).parent / "static" / "mathjax" / "es5"
    target = Path(app.outdir) / "_static" / "mathjax"
    for name in MATHJAX_FILES:
        source = es5 / name
        if source.is_dir():
            shutil.copytree(source, target / name, dirs_exist_ok=True)
        else:
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


def move_output_folder(app: Sphinx) -> None:
    """Write myst-nb's files (the notebooks' images before Sphinx copies them) under the doctree folder.

    myst-nb puts them in jupyter_execute/ beside the output folder, which for `. site` is the repository root.
    """
    folder = Path(app.doctreedir) / "jupyter_execute"
    app.env.mystnb_config = app.env.mystnb_config.copy(output_folder=str(folder.resolve()))


def setup(app: Sphinx) -> dict:
    app.add_config_value("course_site_widget_calls", [], "env", types=frozenset({list}))
    app.connect("builder-inited", move_output_folder, priority=600)  # after myst-nb's own (500) sets it
    app.connect("source-read", append_toctree)
    app.connect("doctree-read", add_widget_note)
    # Before Sphinx's download collector (priority 500) so that the files are copied into _downloads/.
    app.connect("doctree-read", download_non_pages, priority=400)
    app.connect("build-finished", copy_mathjax)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
