"""``make lab-check``: every notebook, Run All, in a real JupyterLab driven by headless Chromium.

What a newcomer does after ``make lab``, checked the way they would see it: the server is started
with the repository's ``jupyter_server_config.py`` (as root too), each ``notebooks/NN_*.ipynb`` is
opened in Lab, *Run All Cells* is clicked, and the check waits for the kernel to finish. It then
reads the rendered notebook: cells run, error outputs, red stderr boxes (with their first line),
kernel dialogs, live widgets and images; saves the notebook (the pre-save hook must leave the
committed file as generated: ``git status`` clean); and opens ``runs/<run>/report/report.html``
and an executed notebook from ``runs/`` inside Lab. A screenshot per notebook goes to
``runs/lab-check/``, a summary to ``runs/lab-check/summary.json``; the exit status is 1 when a
notebook had an error, a dialog or dirtied git.

Needs ``chromium`` (Debian package) and the ``playwright`` Python package, neither in the lock:
``make lab-check`` installs both when it can and says so when it cannot. Playwright drives the
system Chromium (``executable_path``), so no browser is downloaded.

Usage: ``python tools/lab_check.py [--only 03_validate ...] [--timeout-min 40]``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Playwright adds --headless and a fresh temporary profile itself; these keep Chromium off the network.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# JupyterLab 4 renders only the cells in view ("windowing"); the check reads every cell's output.
LAB_SETTINGS = {"@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_lab(port: int, settings_dir: Path, log: Path) -> subprocess.Popen:
    """``jupyter-lab`` itself (not the ``jupyter lab`` wrapper, which would orphan the server when killed)."""
    for name, value in LAB_SETTINGS.items():
        target = settings_dir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(value))
    venv_bin = Path(sys.executable).parent
    cmd = [
        str(venv_bin / "jupyter-lab"),
        f"--config={ROOT / 'jupyter_server_config.py'}",
        "--no-browser",
        "--ip=127.0.0.1",
        f"--port={port}",
        "--IdentityProvider.token=",
        f"--LabApp.user_settings_dir={settings_dir}",
        f"--LabApp.workspaces_dir={settings_dir / 'workspaces'}",
    ]
    env = dict(os.environ, PATH=f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"jupyter-lab exited with {proc.returncode}; see {log}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status", timeout=2)
            return proc
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise RuntimeError(f"jupyter-lab did not answer within 120 s; see {log}")


# JavaScript run in the page: the state of every code cell and what its outputs show.
VISIBLE = ".jp-NotebookPanel:not(.lm-mod-hidden)"  # the notebook in front (earlier tabs stay open)
READ_CELLS = """() => [...document.querySelectorAll('VISIBLE .jp-Cell.jp-CodeCell')].map(c => ({
  prompt: (c.querySelector('.jp-InputArea-prompt') || {}).textContent || '',
  source: ((c.querySelector('.jp-InputArea-editor') || {}).textContent || '').slice(0, 60),
  errors: [...c.querySelectorAll('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')]
    .map(o => o.textContent).filter(t => /Traceback|Error\\b/.test(t)).map(t => t.slice(0, 300)),
  stderr: [...c.querySelectorAll('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')]
    .map(o => o.textContent.trim().split('\\n')[0].slice(0, 160)),
  widgets: c.querySelectorAll('.jupyter-widgets, .widget-box').length,
  images: c.querySelectorAll('.jp-OutputArea-output img').length,
  details: c.querySelectorAll('.jp-OutputArea-output details').length,
  text: [...c.querySelectorAll('.jp-OutputArea-output')].map(o => o.textContent).join(' ').slice(0, 400),
}))""".replace("VISIBLE", VISIBLE)


def run_notebook(page, base: str, name: str, timeout_s: float, shots: Path) -> dict:
    """Open one notebook, Run All, wait for the kernel to finish, read what it shows, save it."""
    t0 = time.monotonic()
    page.goto(f"{base}/lab/tree/notebooks/{name}")
    page.wait_for_selector(f"{VISIBLE} .jp-CodeCell", timeout=120_000)
    dialogs: list[str] = []

    def accept_dialog() -> None:  # a newcomer would see it: recorded, then its default accepted
        if page.locator(".jp-Dialog").count():
            dialogs.append(page.locator(".jp-Dialog-header").first.text_content() or "dialog")
            page.screenshot(path=str(shots / f"{Path(name).stem}-dialog-{len(dialogs)}.png"))
            page.locator(".jp-Dialog .jp-mod-accept").first.click()

    deadline = time.monotonic() + 180
    while not page.locator(f"{VISIBLE} .jp-Notebook-ExecutionIndicator[data-status='idle']").count():
        accept_dialog()
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name}: the kernel did not become idle within 180 s")
        time.sleep(1)
    for _attempt in range(3):  # a click while the kernel was still being chosen can be lost
        time.sleep(2)
        page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).first.click()
        page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).first.click()
        started = time.monotonic() + 30
        while time.monotonic() < started and not any(c["prompt"].strip() != "[ ]:" for c in page.evaluate(READ_CELLS)):
            time.sleep(1)
        if any(c["prompt"].strip() != "[ ]:" for c in page.evaluate(READ_CELLS)):
            break
    finished = False
    while time.monotonic() - t0 < timeout_s:
        time.sleep(2)
        accept_dialog()
        prompts = [c["prompt"] for c in page.evaluate(READ_CELLS)]
        running = any("*" in p for p in prompts)
        if not running and prompts and any(re.search(r"\[\d+\]", p) for p in prompts):
            time.sleep(3)  # outputs of the last cell (display updates) settle
            if not any("*" in c["prompt"] for c in page.evaluate(READ_CELLS)):
                finished = True
                break
    cells = page.evaluate(READ_CELLS)
    page.keyboard.press("Control+s")  # through the pre-save hook
    time.sleep(2)
    page.screenshot(path=str(shots / f"{Path(name).stem}.png"), full_page=True)
    ran = sum(bool(re.search(r"\[\d+\]", c["prompt"])) for c in cells)
    return {
        "notebook": name,
        "seconds": round(time.monotonic() - t0, 1),
        "finished": finished,
        "cells": len(cells),
        "ran": ran,
        "errors": [e for c in cells for e in c["errors"]],
        "stderr_boxes": [s for c in cells for s in c["stderr"]],
        "dialogs": dialogs,
        "widgets": sum(c["widgets"] for c in cells),
        "images": sum(c["images"] for c in cells),
        "config_folded": bool(len(cells) > 1 and cells[1]["details"]),
        "config_output": cells[1]["text"][:200] if len(cells) > 1 else "",
    }


def open_in_lab(page, base: str, path: str, selector: str) -> bool:
    """Whether ``path`` (relative to the repository) opens inside Lab in a widget matching ``selector``."""
    if not (ROOT / path).exists():
        return False
    page.goto(f"{base}/lab/tree/{path}")
    try:
        page.wait_for_selector(selector, timeout=60_000)
        return True
    except Exception:
        return False


def main(argv: list[str] | None = None) -> int:
    """Run the check; see the module docstring."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", metavar="NOTEBOOK", help="stems, e.g. 03_validate (default: all)")
    ap.add_argument("--timeout-min", type=float, default=40, help="per notebook (default 40)")
    ap.add_argument("--run-name", default="demo", help="run whose report and executed notebooks are opened")
    args = ap.parse_args(argv)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        print("lab-check: no chromium on PATH (Debian: apt-get install chromium); nothing checked", file=sys.stderr)
        return 2
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        print("lab-check: the playwright package is missing (pip install playwright); nothing checked", file=sys.stderr)
        return 2
    names = sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))
    if args.only:
        names = [n for n in names if Path(n).stem in args.only]
    out = ROOT / "runs" / "lab-check"
    out.mkdir(parents=True, exist_ok=True)
    port, results = _free_port(), []
    with tempfile.TemporaryDirectory(prefix="icmlab-lab-check-") as tmp:
        lab = start_lab(port, Path(tmp) / "settings", out / "jupyter-lab.log")
        base = f"http://127.0.0.1:{port}"
        try:
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                for name in names:
                    res = run_notebook(page, base, name, args.timeout_min * 60, out)
                    results.append(res)
                    print(json.dumps(res), flush=True)
                run = f"runs/{args.run_name}"
                opened = {
                    "report.html": open_in_lab(page, base, f"{run}/report/report.html", ".jp-HTMLViewer iframe"),
                    "executed notebook": open_in_lab(page, base, f"{run}/05_train.ipynb", ".jp-Notebook .jp-CodeCell"),
                    "parameters": open_in_lab(page, base, "parameters/demo.yaml", ".jp-FileEditor"),
                }
                browser.close()
        finally:
            lab.send_signal(signal.SIGTERM)
            try:
                lab.wait(timeout=30)
            except subprocess.TimeoutExpired:
                lab.kill()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "notebooks/"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    summary = {"notebooks": results, "opened_in_lab": opened, "git_status_notebooks": dirty}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({"opened_in_lab": opened, "git_status_notebooks": dirty or "clean"}))
    bad = [r["notebook"] for r in results if r["errors"] or not r["finished"]]
    print(f"lab-check: {len(results) - len(bad)}/{len(results)} notebooks ran clean; screenshots in {out}")
    return 1 if bad or dirty else 0


if __name__ == "__main__":
    sys.exit(main())
