"""Sphinx configuration of the course website (`make site`).

Built with the repository root as the source folder and this folder as the configuration folder:

    sphinx-build -b html -c docs/site -W --keep-going -n -E . site

so that the links the notebooks and docs already hold (`../docs/references.md#hu-et-al-2021`,
`../solutions/...ipynb`, `01_baseline_perplexity.ipynb`, README's `docs/glossary.md`) resolve on the site exactly
as they do on a code host. The notebooks are rendered from their committed outputs and never executed.
"""
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "_ext"))

project = "Transfer learning for pretrained causal language models"
author = "the tutorial's authors"
copyright = "the tutorial's authors; code, notebooks and corpus under Apache-2.0"

extensions = [
    "myst_nb",  # Markdown and notebooks, through MyST
    "sphinx.ext.githubpages",  # writes .nojekyll, so GitHub Pages serves _static/ and _images/
    "course_site",  # docs/site/_ext: the table of contents on README, the widget note, an offline MathJax
]

# README.md is the home page: the story and the syllabus. course_site appends the table of contents
# (docs/site/toctree.md) to it as Sphinx reads it, so the file on disk stays as the code host shows it.
root_doc = "README"

# The pages, and nothing else: every other file (src/, results/, data/, student/, tests/, scripts/, benchmarks/,
# .venv, the Makefile, ...) is at most the target of a download link. The exclusions below also keep Sphinx from
# walking the big folders at all.
include_patterns = [
    "README.md",
    "notebooks/*.ipynb",
    "solutions/*.ipynb",
    "docs/glossary.md",
    "docs/references.md",
    "docs/families.md",
]
exclude_patterns = [
    ".venv", ".git", ".github", ".ci", ".cache", ".pytest_cache", "**/.ipynb_checkpoints",
    "build", "site", "student", "teacher", "tests", "src", "results", "data", "benchmarks", "scripts", "comparison",
    "docs/site",
]

# Render the outputs saved in the notebooks; never start a kernel.
nb_execution_mode = "off"
# Consecutive stdout (or stderr) outputs of one cell shown as one block, as JupyterLab shows them.
nb_merge_streams = True
# No widget JavaScript from a CDN (the site is built and read offline, and the committed notebooks hold no widget
# state); a widget-view output falls back to the static text or image saved beside it, and course_site says so.
nb_ipywidgets_js = {}
nb_mime_priority_overrides = [("html", "application/vnd.jupyter.widget-view+json", None)]

# Heading anchors as a code host makes them (`references.md#hu-et-al-2021`); level 3 is where docs/references.md
# keeps its entries, 4 leaves room.
myst_heading_anchors = 4
# $...$ and $$...$$ are maths in the notebooks, as in JupyterLab.
myst_enable_extensions = ["dollarmath"]
# myst.header is only MyST's heading-level-jump style check, not a link check: docs/references.md puts its entries
# (the anchors the chapters cite) as H3 directly under its H1, which a code host and Sphinx render and anchor alike.
# Broken links, files and anchors are myst.xref_missing and fail the build (tests/test_site.py proves it).
suppress_warnings = ["myst.header"]

# MathJax from the django-static-mathjax wheel (MathJax 3.2.2, no Django needed), copied in by course_site: the CDN
# default would leave the maths unrendered offline and log a console error.
mathjax_path = "mathjax/tex-chtml.js"

# Notebook 08's widgets: a page whose notebook has widget-view outputs, imports ipywidgets or calls one of these
# (helpers.widgets' live panels, which show a static fallback when executed without a browser) gets a note at the top.
course_site_widget_calls = ["strategy_explorer(", "training_panel("]

html_theme = "sphinx_book_theme"
html_title = "Transfer learning for causal LMs"
html_theme_options = {
    "home_page_in_toc": True,  # the home page (README) listed above the chapters in the sidebar
    "show_toc_level": 2,
    "use_download_button": True,  # each page offers its source notebook (.ipynb) for download
    "use_fullscreen_button": False,
}
# Light or dark as the reader's system prefers. Said explicitly: left unset, pydata-sphinx-theme 0.20 starts every
# first visit from an empty mode and logs "Got invalid theme mode" as a console error.
html_context = {"default_mode": "auto"}
# The site's root URL sends the reader to README.html (the home page is named after its file).
html_extra_path = ["extra"]
html_last_updated_fmt = None
html_copy_source = True
html_show_sourcelink = False
