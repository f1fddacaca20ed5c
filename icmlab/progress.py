"""A stage's progress bars, seen from the terminal that runs ``icmlab run``.

A stage notebook runs in a Jupyter kernel whose output papermill does not show, so its tqdm bars
(download bytes, validate records and images, train steps with loss and ETA, evaluate items) would
reach only the notebook. While ``icmlab run`` executes a stage it sets :data:`PROGRESS_FILE_ENV`
for the kernel; :func:`start_tee` (called by the notebooks' config cell) then writes the text of
every live tqdm bar to that file about twice a second, and :class:`TerminalProgress` (in the
runner) shows it: redrawn in place on a terminal, or as one line every
``ICMLAB_PROGRESS_INTERVAL`` seconds (default 60) in a log file (``nohup``, SLURM).
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, TextIO

PROGRESS_FILE_ENV = "ICMLAB_PROGRESS_FILE"
INTERVAL_ENV = "ICMLAB_PROGRESS_INTERVAL"
_TEE_PERIOD_S = 0.5
_tee_started = False


def bar_lines() -> list[str]:
    """The current text of every live tqdm bar in this process (notebook widgets included)."""
    from tqdm.std import tqdm

    with tqdm.get_lock():
        bars = list(getattr(tqdm, "_instances", ()))
    lines = []
    for bar in sorted(bars, key=lambda b: getattr(b, "pos", 0)):
        try:
            fmt = dict(bar.format_dict, ncols=100)  # widgets have no width; the terminal redraw trims
            lines.append(bar.format_meter(**fmt).strip())
        except Exception:  # a bar being closed by its thread
            continue
    return [line for line in lines if line]


def start_tee(path: str | Path | None = None) -> bool:
    """Start (once per process) the thread that mirrors :func:`bar_lines` into the progress file.

    Args:
        path: the file (default: :data:`PROGRESS_FILE_ENV`; nothing happens without either).

    Returns:
        True when the thread runs.
    """
    global _tee_started
    target = path or os.environ.get(PROGRESS_FILE_ENV)
    if not target or _tee_started:
        return _tee_started
    out = Path(target)

    def loop() -> None:
        last = None
        while True:
            text = "\n".join(bar_lines())
            if text and text != last:  # the last bar's final state stays until the next one appears
                tmp = out.with_suffix(".tmp")
                tmp.write_text(text + "\n", encoding="utf-8")
                os.replace(tmp, out)
                last = text
            time.sleep(_TEE_PERIOD_S)

    threading.Thread(target=loop, name="icmlab-progress-tee", daemon=True).start()
    _tee_started = True
    return True


class TerminalProgress:
    """Follow a progress file from the runner's side (a thread) and show it on ``stream``.

    On a terminal the current bars are redrawn on one line; otherwise a line is printed whenever the
    bars changed and ``interval`` seconds passed (``ICMLAB_PROGRESS_INTERVAL``, default 60).
    """

    def __init__(self, path: Path, label: str, stream: TextIO | None = None, interval: float | None = None) -> None:
        self.path, self.label = path, label
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval = interval if interval is not None else float(os.environ.get(INTERVAL_ENV, "60"))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="icmlab-progress", daemon=True)
        self._drawn = False
        self.shown: list[str] = []  # every line shown (for tests and the log's record)

    def __enter__(self) -> "TerminalProgress":
        self.path.unlink(missing_ok=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._show(final=True)
        if self._drawn and self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def _read(self) -> str:
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            return ""
        return " | ".join(line.strip() for line in lines if line.strip())

    def _loop(self) -> None:
        last_print = time.monotonic()
        while not self._stop.wait(0.5 if self.tty else min(1.0, self.interval)):
            if self.tty or time.monotonic() - last_print >= self.interval:
                if self._show():
                    last_print = time.monotonic()

    def _show(self, final: bool = False) -> bool:
        text = self._read()
        if not text or (self.shown and text == self.shown[-1]):
            return False
        if final and not self.tty and not self.shown:
            return False  # a stage too quick for one periodic line: its "done" line says enough
        self.shown.append(text)
        line = f"{self.label}: {text}"
        if self.tty:
            width = shutil.get_terminal_size((120, 20)).columns
            self.stream.write("\r\x1b[K" + line[: width - 1])
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        self._drawn = True
        return True


def batch_starts(total: int, batch_size: int, desc: str) -> Iterator[int]:
    """``range(0, total, batch_size)`` with a tqdm bar counting items (the evaluate stage's batches).

    The bar advances when the next batch is asked for, i.e. once the previous batch is answered.
    """
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=desc, unit="item", leave=False) as bar:
        for start in range(0, total, batch_size):
            yield start
            bar.update(min(batch_size, total - start))
