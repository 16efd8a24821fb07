"""Browser tests: JupyterLab in headless Chromium (run with `make browser`)."""
