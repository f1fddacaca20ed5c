"""Live check of notebook 07 in a real JupyterLab, driven by headless Chromium (not a test: it needs a
finished demo run and a Chromium binary).

What it does: copies ``notebooks/07_playground.ipynb`` into ``runs/<run>/`` (so JupyterLab's autosave
never writes outputs into the committed notebook), starts JupyterLab on a free loopback port, opens
the copy in ``chromium --headless`` over the DevTools protocol, runs all cells, picks the second
dataset record in the widgets, clicks "Ask", waits for the answers of every selected model, prints
them and saves a screenshot ``runs/<run>/playground/browser.png``.

Usage::

    icmlab run parameters/demo.yaml                     # the run it looks at
    python tools/playground_browser_check.py [--run runs/demo] [--chromium /usr/bin/chromium]
"""

from __future__ import annotations

import argparse
import base64
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import websocket  # websocket-client, a dependency of jupyter_server

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, seconds: float) -> str:
    end = time.time() + seconds
    while time.time() < end:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.read().decode()
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer in {seconds} s")


class Page:
    """One Chromium tab over the DevTools protocol."""

    def __init__(self, ws_url: str) -> None:
        self.ws = websocket.create_connection(ws_url, timeout=60, suppress_origin=True)
        self.next_id = 0

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def js(self, expression: str):
        res = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(res["exceptionDetails"].get("text", "JS error"))
        return res["result"].get("value")

    def wait(self, expression: str, seconds: float, what: str):
        end = time.time() + seconds
        while time.time() < end:
            value = self.js(expression)
            if value:
                return value
            time.sleep(1)
        seen = self.js(
            "document.title + ' | app: ' + (typeof window.jupyterapp) + ' | ' + document.body.innerText.slice(0, 300)"
        )
        raise TimeoutError(f"{what}: not seen in {seconds} s (page: {seen!r})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/demo", help="the run directory (default runs/demo)")
    ap.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    ap.add_argument("--timeout", type=float, default=600, help="seconds for Run All (default 600)")
    args = ap.parse_args()
    run_dir = (ROOT / args.run).resolve()
    if not (run_dir / "model" / "config.json").is_file():
        print(f"no trained model in {run_dir}: run `icmlab run parameters/demo.yaml` first", file=sys.stderr)
        return 2
    notebook = run_dir / "07_playground.live.ipynb"
    shutil.copy(ROOT / "notebooks" / "07_playground.ipynb", notebook)
    lab_port, cdp_port = free_port(), free_port()
    profile = tempfile.mkdtemp(prefix="icmlab-chromium-")
    lab = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={lab_port}", "--ip=127.0.0.1", "--allow-root",
         "--ServerApp.token=", "--ServerApp.password=", "--LabApp.expose_app_in_browser=True",
         f"--ServerApp.root_dir={ROOT}"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    browser = None
    try:
        wait_http(f"http://127.0.0.1:{lab_port}/api", 120)
        browser = subprocess.Popen(
            [args.chromium, "--headless=new", "--no-sandbox", "--disable-gpu", f"--remote-debugging-port={cdp_port}",
             f"--user-data-dir={profile}", "--window-size=1500,2400", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_http(f"http://127.0.0.1:{cdp_port}/json/version", 60)
        tabs = json.loads(wait_http(f"http://127.0.0.1:{cdp_port}/json", 10))
        page = Page(next(t for t in tabs if t.get("type") == "page")["webSocketDebuggerUrl"])
        page.call("Page.enable")
        rel = notebook.relative_to(ROOT).as_posix()
        page.call("Page.navigate", url=f"http://127.0.0.1:{lab_port}/lab")
        page.wait("window.jupyterapp?.started !== undefined", 90, "JupyterLab")
        page.js("window.jupyterapp.started")
        page.js(
            f"window.jupyterapp.commands.execute('docmanager:open', {{path: {json.dumps(rel)}}})"
            ".then(w => {{ window.__nb = w; window.jupyterapp.shell.activateById(w.id); return true; }})"
        )
        kernel = "window.__nb?.sessionContext?.session?.kernel?.status"
        page.wait(f"{kernel} === 'idle'", 120, "the notebook's kernel")
        t0 = time.time()
        page.js("window.jupyterapp.commands.execute('notebook:run-all-cells')")
        page.wait(
            f"{kernel} === 'idle' && document.body.innerText.includes('serve it:') "
            "&& document.querySelector('.widget-select-multiple') !== null",
            args.timeout,
            "Run All (the export's 'serve it:' output and the widgets)",
        )
        print(f"Run All: {time.time() - t0:.1f} s")
        page.js(
            "(() => { const d = [...document.querySelectorAll('.widget-dropdown')]"
            ".find(e => e.innerText.trim().startsWith('dataset')); const s = d.querySelector('select');"
            " s.selectedIndex = 2; s.dispatchEvent(new Event('change', {bubbles: true})); })()"
        )
        page.wait("document.body.innerText.includes('ground truth:')", 60, "the record's image and ground truth")
        t1 = time.time()
        page.js("[...document.querySelectorAll('button')].find(b => b.innerText.trim() === 'Ask').click()")
        status = "[...document.querySelectorAll('.widget-html')].some(e => e.innerText.trim() === 'done')"
        page.wait(status, 300, "the answers")
        print(f"Ask: {time.time() - t1:.1f} s")
        answers = page.js(
            "[...document.querySelectorAll('.widget-hbox .widget-html')].map(e => e.innerText.trim())"
            ".filter(t => t.startsWith('baseline') || t.startsWith('fine-tuned'))"
        )
        truth = page.js(
            "[...document.querySelectorAll('.widget-html')].map(e => e.innerText).find(t => t.startsWith('ground truth'))"
        )
        question = page.js("document.querySelector('.widget-textarea textarea').value")
        images = page.js("[...document.querySelectorAll('.widget-image')].filter(i => i.naturalWidth > 0).length")
        print(json.dumps({"question": question, "truth": truth, "answers": answers, "images_shown": images}, indent=1))
        page.js(
            "[...document.querySelectorAll('button')].find(b => b.innerText.trim() === 'Ask')"
            ".scrollIntoView({block: 'center'})"
        )
        time.sleep(1)
        shot = page.call("Page.captureScreenshot", format="png")["data"]
        out = run_dir / "playground" / "browser.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(base64.b64decode(shot))
        print(f"screenshot: {out}")
        return 0 if len(answers) == 2 and images else 1
    finally:
        for proc in (browser, lab):
            if proc is not None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
        shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
