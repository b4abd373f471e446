"""The way a learner meets the cookbook, in a real browser: JupyterLab on this repository, a double-click on
notebooks/00_setup_check.py opens it as a notebook (the jupytext default viewer the project ships, jupyter/README.md)
with the project's kernel, Run All Cells, and the label-mask figure and the model's reply appear.

Driven by Playwright over Debian's chromium (`make browser-deps`; Playwright's own browser is never downloaded).
Without chromium or playwright the test skips, unless LONGALIGN_REQUIRE_BROWSER=1 (set by .ci/run) makes it fail.
A screenshot is kept in $LONGALIGN_ARTIFACTS (default runs/test-artifacts/) whether the test passes or fails.
Run as: python -m pytest -q tests/test_browser.py
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = "00_setup_check.py"
KERNEL_NAME, KERNEL_DISPLAY = "longalign", "LongAlign (.venv)"  # what `make setup` registers
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
REQUIRED = os.environ.get("LONGALIGN_REQUIRE_BROWSER") == "1"
ARTIFACTS = Path(os.environ.get("LONGALIGN_ARTIFACTS", ROOT / "runs" / "test-artifacts"))


def _need(ok: bool, what: str):
    if not ok:
        (pytest.fail if REQUIRED else pytest.skip)(what)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            pytest.fail(f"JupyterLab exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"JupyterLab did not answer {url} within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


@pytest.fixture
def jupyterlab(tmp_path):
    """JupyterLab from this interpreter on 127.0.0.1, rooted at the repo, with private Jupyter dirs (no user
    settings or kernels leak in) and the project's kernel registered as `make setup` does, for this interpreter."""
    kernels = tmp_path / "data" / "kernels" / KERNEL_NAME
    kernels.mkdir(parents=True)
    (kernels / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": KERNEL_DISPLAY, "language": "python"}))
    env = {k: v for k, v in os.environ.items() if k not in ("MPLBACKEND", "JUPYTER_PATH")}
    env.update(HOME=str(tmp_path / "home"), JUPYTER_PATH=str(tmp_path / "data"),
               JUPYTER_CONFIG_DIR=str(tmp_path / "config"), JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"),
               JUPYTERLAB_SETTINGS_DIR=str(tmp_path / "user-settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "workspaces"),
               PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.setdefault("LONGALIGN_HOME", str(ROOT / ".longalign_home"))
    news = tmp_path / "user-settings" / "@jupyterlab" / "apputils-extension"
    news.mkdir(parents=True)  # no "receive Jupyter news?" toast over the screenshot
    (news / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false"}))
    docmanager = tmp_path / "user-settings" / "@jupyterlab" / "docmanager-extension"
    docmanager.mkdir(parents=True)  # never save: the test must not rewrite notebooks/00_setup_check.py
    (docmanager / "plugin.jupyterlab-settings").write_text(json.dumps({"autosave": False}))
    port, token = _free_port(), secrets.token_hex(16)
    log = tmp_path / "jupyterlab.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ServerApp.ip=127.0.0.1",
             f"--ServerApp.port={port}",
             "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={ROOT}",
             "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_http(f"{base}/api/status?token={token}", proc, log)
        yield base, token, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_double_click_opens_setup_notebook_and_runs_it(jupyterlab):
    chromium = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    _need(chromium is not None, "Debian's chromium is not installed (`make browser-deps`)")
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        _need(False, "playwright is not installed (`pip install playwright`; no browser download needed)")
    installed = Path(sys.prefix) / "share/jupyter/lab/settings/overrides.d/longalign-cookbook.json"
    assert installed.exists() and json.loads(installed.read_text()) == json.loads(
        (ROOT / "jupyter/lab-overrides.json").read_text()), \
        f"{installed}: missing or stale; `make setup` installs jupyter/lab-overrides.json there"

    from longalign_lib.models import convert_bundled

    convert_bundled(quiet=True)  # converted once per machine; the notebook then only loads it
    base, token, log = jupyterlab
    metrics = ROOT / "runs" / "notebooks" / "00_setup_check" / "metrics.json"
    started = time.time()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "browser_00_setup_check.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1500})
        try:
            page.goto(f"{base}/lab/tree/notebooks?token={token}", wait_until="domcontentloaded")
            item = page.locator(".jp-DirListing-item", has_text=NOTEBOOK)
            expect(item).to_be_visible(timeout=60_000)
            item.dblclick()
            panel = page.locator(".jp-NotebookPanel:visible")
            expect(panel).to_be_visible(timeout=30_000)  # a notebook, not the text editor
            expect(page.locator(".jp-FileEditor:visible")).to_have_count(0)
            expect(panel.locator(".jp-Notebook-cell")).not_to_have_count(0)
            kernel = panel.locator(".jp-Toolbar-kernelName")
            expect(kernel).to_have_text(KERNEL_DISPLAY, timeout=30_000)
            expect(panel.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']")).to_have_count(1,
                                                                                                        timeout=60_000)
            page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
            page.locator(".lm-Menu-item:visible", has_text="Run All Cells").first.click()
            figure = panel.locator(".jp-OutputArea-output img")
            expect(figure.first).to_be_visible(timeout=120_000)
            reply = panel.locator(".jp-OutputArea-output", has_text="A: ")
            expect(reply.first).to_be_visible(timeout=120_000)
            # every code cell ran: the metrics cell (the last one) wrote its file after we pressed Run
            deadline = time.time() + 60
            while not (metrics.exists() and metrics.stat().st_mtime >= started) and time.time() < deadline:
                time.sleep(0.5)
            assert metrics.exists() and metrics.stat().st_mtime >= started, "the last cell did not run"
            errors = panel.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.error']")
            assert errors.count() == 0, errors.first.inner_text()
            width = figure.first.evaluate("img => img.naturalWidth")
            assert width > 300, f"label-mask image is {width} px wide"
            figure.first.scroll_into_view_if_needed()  # the figure and, below it, the reply
            page.screenshot(path=str(shot))
        except BaseException:
            page.screenshot(path=str(shot))
            print(f"screenshot: {shot}\nJupyterLab log (tail):\n{log.read_text()[-2000:]}")
            raise
        finally:
            browser.close()
    assert shot.stat().st_size > 20_000
    print(f"screenshot: {shot} ({time.time() - started:.0f} s in the browser)")
