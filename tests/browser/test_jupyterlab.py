"""The quickstart notebook in a real browser: JupyterLab, headless Chromium, the widgets rendered and working.

Starts JupyterLab on 127.0.0.1 (a free port, a random token) in a temporary folder holding a copy of
``notebooks/00_quickstart.ipynb``, with ``DELTAKIT_NOTEBOOK_FAMILY=tiny`` and ``DELTAKIT_HOME`` pointing at a
temporary home in which the tiny family was built first. Python Playwright drives Debian's Chromium
(``/usr/bin/chromium``; ``playwright install`` is never needed): run all cells, check that the three widgets and a
plotly plot are in the DOM, click Run on the SweepPanel and wait until its status label reports finished points
(the sweep callback updates that label, and the figure's legend gains the method lines). A screenshot is saved to
``$DELTAKIT_ARTIFACTS`` (or the test's temporary folder) and its path printed.

Skipped, with the reason, when Chromium or the playwright package is missing. Installing both on Debian:
``apt-get install -y chromium`` and ``pip install playwright``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "00_quickstart.ipynb"
KERNEL_IDLE = """() => {
    const widget = window.jupyterapp.shell.currentWidget;
    const kernel = widget && widget.sessionContext && widget.sessionContext.session
        && widget.sessionContext.session.kernel;
    return Boolean(kernel) && kernel.status === 'idle';
}"""

if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} not found: install Debian's chromium (apt-get install -y chromium)",
                allow_module_level=True)
if importlib.util.find_spec("playwright") is None:
    pytest.skip("the playwright package is missing: pip install playwright (its wheel bundles the driver; "
                "no `playwright install` is needed with Debian's chromium)", allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_server(url: str, proc: subprocess.Popen, log: Path, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"JupyterLab exited with code {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"JupyterLab did not answer {url} within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A running JupyterLab serving a copy of the quickstart; yields its URL, token, folder and log."""
    from deltakit.families import build_family

    root = tmp_path_factory.mktemp("lab")
    home = tmp_path_factory.mktemp("deltakit-home")
    build_family("tiny", home=home, progress=False)  # in the test, so a failure here reads as a build failure
    work = root / "notebooks"
    work.mkdir()
    shutil.copy(NOTEBOOK, work / NOTEBOOK.name)
    # No news or update toasts over the notebook: user settings live in a private settings folder.
    settings = root / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false",
                                                                           "checkForUpdates": False}))
    port, token = _free_port(), secrets.token_hex(16)
    config = root / "jupyter_server_config.py"
    config.write_text("\n".join([
        "c.ServerApp.ip = '127.0.0.1'",
        f"c.ServerApp.port = {port}",
        "c.ServerApp.port_retries = 0",
        "c.ServerApp.open_browser = False",
        f"c.IdentityProvider.token = {token!r}",
        f"c.ServerApp.root_dir = {str(work)!r}",
        "c.LabApp.expose_app_in_browser = True",  # window.jupyterapp: run commands instead of clicking menus
        "",
    ]))
    env = dict(os.environ, DELTAKIT_NOTEBOOK_FAMILY="tiny", DELTAKIT_HOME=str(home), HF_HUB_OFFLINE="1",
               JUPYTER_CONFIG_DIR=str(root / "config"), JUPYTER_RUNTIME_DIR=str(root / "runtime"),
               JUPYTERLAB_SETTINGS_DIR=str(root / "settings"), JUPYTERLAB_WORKSPACES_DIR=str(root / "workspaces"))
    log = root / "jupyterlab.log"
    args = [sys.executable, "-m", "jupyterlab", "--config", str(config)]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        args.append("--allow-root")
    with log.open("w") as log_file:
        proc = subprocess.Popen(args, env=env, cwd=work, stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for_server(f"{url}/api/status?token={token}", proc, log)
        yield {"url": url, "token": token, "folder": work, "log": log}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _artifact(name: str, fallback: Path) -> Path:
    folder = Path(os.environ.get("DELTAKIT_ARTIFACTS") or fallback)
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


def test_quickstart_widgets_render_and_the_sweep_runs(lab, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.goto(f"{lab['url']}/lab/tree/{NOTEBOOK.name}?token={lab['token']}")
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=90_000)
            page.wait_for_function("() => window.jupyterapp !== undefined", timeout=30_000)
            # Run-all before the kernel is connected opens a "Select Kernel" dialog: wait for an idle kernel first,
            # and accept the preselected kernel should the dialog open anyway.
            page.wait_for_function(KERNEL_IDLE, timeout=120_000)
            if page.locator(".jp-Dialog .jp-mod-accept").count():
                page.locator(".jp-Dialog .jp-mod-accept").click()
            # Run every cell once the kernel is up (JupyterLab queues the request until it is). The command's
            # promise settles only when the last cell finishes, so it is not awaited here: the prompts are watched.
            page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")
            # Done when every code cell shows an execution count ("[3]:" rather than "[ ]:" or "[*]:"), or when a
            # cell failed (run-all stops there, so the remaining prompts would never fill in).
            page.wait_for_function(
                """() => {
                    const prompts = [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')];
                    const failed = [...document.querySelectorAll(
                        ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")]
                        .some(o => o.textContent.includes('Traceback'));
                    return failed || (prompts.length > 0 && prompts.every(p => /\\[\\d+\\]/.test(p.textContent)));
                }""",
                timeout=300_000,
            )
            errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
            tracebacks = [t for t in errors.all_text_contents() if "Traceback" in t or "Error" in t]
            assert not tracebacks, f"a cell failed:\n{tracebacks[0][:2000]}"

            for widget in ("deltakit-model-picker", "deltakit-stats-dashboard", "deltakit-sweep-panel"):
                page.wait_for_selector(f".{widget}", timeout=60_000)
            # The dashboard's FigureWidgets were drawn by plotly.js (anywidget front end).
            page.wait_for_selector(".deltakit-stats-dashboard .js-plotly-plot", timeout=60_000)
            dashboards = page.locator(".deltakit-stats-dashboard")  # one fine-tune first, then both
            assert dashboards.count() == 2
            # histogram, layer x kind heatmap, similarity matrix, spectral ranks
            assert [dashboards.nth(i).locator(".js-plotly-plot").count() for i in range(2)] == [4, 4]
            picker_status = page.locator(".deltakit-model-picker .deltakit-status").text_content()
            assert "paired tensors" in picker_status, picker_status

            panel = page.locator(".deltakit-sweep-panel")
            panel.scroll_into_view_if_needed()
            status = panel.locator(".deltakit-status")
            assert "new point" not in (status.text_content() or "")
            panel.locator(".deltakit-run").click()
            # The worker's on_point callback rewrites the status label after every finished point.
            page.wait_for_function(
                """() => {
                    const s = document.querySelector('.deltakit-sweep-panel .deltakit-status');
                    const m = s && s.textContent.match(/(\\d+) new point/);
                    return m && Number(m[1]) >= 4;
                }""",
                timeout=180_000,
            )
            # The curve has method lines now: the legend names them (SVG text, read with textContent).
            page.wait_for_function(
                """() => [...document.querySelectorAll('.deltakit-sweep-panel .legendtext')]
                         .some(t => t.textContent === 'dare')""",
                timeout=60_000,
            )
            page.wait_for_function(
                "() => /^(done|cancelled)/.test("
                "document.querySelector('.deltakit-sweep-panel .deltakit-status').textContent)",
                timeout=180_000,
            )
            final = status.text_content()
            assert re.match(r"done: \d+ new point\(s\)", final), final
            panel.locator(".js-plotly-plot").scroll_into_view_if_needed()
            shot = _artifact("quickstart.png", tmp_path)
            page.screenshot(path=str(shot))
            print(f"screenshot: {shot}")
        finally:
            browser.close()
