"""A JupyterLab server and a headless Chromium for the browser tests, both always shut down.

The server serves a temporary copy of notebooks/, solutions/ and student/, so a test that runs or saves a notebook
never touches the repository's files; a test compares the copy with the original byte for byte instead.
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = ("notebooks", "solutions", "student")
SCREENSHOTS = ROOT / "tests" / "browser" / "screenshots"
REQUIRE = "TUTORIAL_REQUIRE_BROWSER"
"""Set (as .ci/run does) to make a missing browser a failure instead of a skip."""
CHROMIUM = "TUTORIAL_CHROMIUM"
"""Path of a Chromium or Chrome binary, where it is not on PATH as chromium."""
HOW_TO_GET_ONE = ("no Chromium for the browser tests: install Debian's (`sudo apt-get install chromium`) or set "
                  f"{CHROMIUM}=/path/to/chromium, then run `make browser`")

# JupyterLab settings for the test only: every cell rendered (not just those in view), no news prompt over the page,
# and the kernel shut down when a notebook closes.
SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": '{"windowingMode": "none"}',
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": '{"fetchNews": "false"}',
}


def chromium_path() -> str | None:
    """Return the Chromium binary to drive: $TUTORIAL_CHROMIUM, else the first browser found on PATH, else None."""
    named = os.environ.get(CHROMIUM)
    if named:
        return named if Path(named).is_file() else None
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _missing(reason: str) -> None:
    if os.environ.get(REQUIRE):
        pytest.fail(f"{reason} ({REQUIRE} is set, so this is a failure)", pytrace=False)
    pytest.skip(reason)


@dataclass
class Lab:
    """A running JupyterLab: its base URL, token and the folder it serves."""

    url: str
    token: str
    root: Path

    def tree(self, path: str) -> str:
        """Return the URL that opens `path` (relative to the served folder) in JupyterLab."""
        return f"{self.url}/lab/tree/{path}?token={self.token}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def lab(tmp_path_factory) -> Lab:
    """Yield a JupyterLab from this environment on a free localhost port with a random token; stop it afterwards."""
    if chromium_path() is None:
        _missing(HOW_TO_GET_ONE)
    jupyter = Path(sys.executable).parent / "jupyter"
    if not jupyter.exists():
        _missing(f"no JupyterLab beside {sys.executable}: run `make setup` first")
    root = tmp_path_factory.mktemp("lab")
    for folder in FOLDERS:
        shutil.copytree(ROOT / folder, root / folder)
    settings = tmp_path_factory.mktemp("lab-settings")
    for name, text in SETTINGS.items():
        (settings / name).parent.mkdir(parents=True, exist_ok=True)
        (settings / name).write_text(text)
    port, token = _free_port(), secrets.token_hex(16)
    env = dict(os.environ, HF_HUB_OFFLINE="1", JUPYTERLAB_SETTINGS_DIR=str(settings),
               JUPYTERLAB_WORKSPACES_DIR=str(tmp_path_factory.mktemp("lab-workspaces")))
    log = open(tmp_path_factory.mktemp("lab-log") / "server.log", "w")
    server = subprocess.Popen(
        [str(jupyter), "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}", f"--IdentityProvider.token={token}",
         f"--ServerApp.root_dir={root}", "--LabApp.expose_app_in_browser=True", "--ServerApp.port_retries=0",
         *(["--allow-root"] if hasattr(os, "getuid") and os.getuid() == 0 else [])],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    pytest.fail(f"JupyterLab did not start; its log: {log.name}", pytrace=False)
                time.sleep(0.3)
        yield Lab(url, token, root)
    finally:
        # The whole process group: the server and every kernel it started.
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            try:
                os.killpg(server.pid, sig)
                server.wait(timeout=wait)
                break
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue
        log.close()


@pytest.fixture(scope="session")
def browser():
    """Yield a headless Chromium driven by Playwright (no download: the system's binary); close it afterwards."""
    path = chromium_path()
    if path is None:
        _missing(HOW_TO_GET_ONE)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("Playwright for Python is missing: run `make setup` (it is in the dev extras)")
    with sync_playwright() as driver:
        chromium = driver.chromium.launch(executable_path=path, args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="session")
def screenshots() -> Path:
    """Return the git-ignored folder where the tests leave screenshots for a person to look at."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS
