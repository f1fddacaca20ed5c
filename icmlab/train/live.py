"""Training curves for notebooks: loss, learning rate, grad norm, throughput and ETA from metrics.jsonl.

``plot_metrics(path)`` draws the figure from a finished (or running) run's ``metrics.jsonl``;
``LiveMetricsPlot`` redraws it in place in the notebook while training runs: as a Trainer callback
for in-process training, and for a launched multi-rank job (deepspeed/torchrun, whose workers
cannot receive callbacks) through :meth:`LiveMetricsPlot.poll`, which the train stage calls about
once a second while the job runs: it follows the ``metrics.jsonl`` that rank 0 appends to.
The same code serves both, so the notebook looks the same either way.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import orjson
from matplotlib.figure import Figure
from transformers import TrainerCallback

# metrics.jsonl keys written by icmlab.train.callbacks.MetricsJsonlCallback
PANELS = (
    ("loss", "training loss"),
    ("lr", "learning rate"),
    ("grad_norm", "grad norm"),
    ("samples_per_s", "samples / s"),
)


def read_metrics(path: str | Path) -> list[dict]:
    """Rows of ``metrics.jsonl`` (a partially written last line is ignored)."""
    rows = []
    p = Path(path)
    if not p.exists():
        return rows
    for line in p.read_bytes().splitlines():
        try:
            rows.append(orjson.loads(line))
        except orjson.JSONDecodeError:
            continue
    return rows


def _value(row: dict, key: str) -> float | None:
    v = row.get(key)
    return float(v) if isinstance(v, (int, float)) else None


def plot_metrics(rows_or_path: list[dict] | str | Path, title: str = "") -> Figure:
    """A 2×2 figure of the curves against the optimizer step, with the ETA in the title when known."""
    rows = read_metrics(rows_or_path) if isinstance(rows_or_path, (str, Path)) else rows_or_path
    fig = Figure(figsize=(10, 6), layout="constrained")
    axes = fig.subplots(2, 2).ravel()
    for ax, (key, label) in zip(axes, PANELS):
        pts = [(r["step"], v) for r in rows if "step" in r and (v := _value(r, key)) is not None]
        if pts:
            ax.plot(*zip(*pts), marker="." if len(pts) < 50 else None)
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    last = rows[-1] if rows else {}
    eta = last.get("eta_s")
    extra = f" — step {last.get('step', 0)}" + (f", ETA {eta:.0f} s" if isinstance(eta, (int, float)) else "")
    fig.suptitle((title or "training") + (extra if rows else " — no metrics yet"))
    return fig


class LiveMetricsPlot(TrainerCallback):
    """Redraw ``plot_metrics`` in one notebook output: at the first logged step, then at most every
    ``every_s`` seconds while new rows come in, and once at the end.

    In-process training calls it as a Trainer callback; a launched job's stage calls :meth:`poll`.
    Time, not a count of steps, sets the pace: the picture is as fresh on a 0.1 s/step demo as on
    a 20 s/step real run (drawing takes about 0.1 s, so 5 s keeps its cost near 2 %).
    """

    def __init__(self, metrics_path: str | Path, every_s: float = 5.0, title: str = "") -> None:
        self.path, self.every_s, self.title = Path(metrics_path), max(0.0, every_s), title
        self._handle: Any = None
        self._last_draw = -math.inf  # time.monotonic() of the last redraw
        self._drawn_rows = -1  # rows shown by the last poll() redraw
        self.drawn: list[int] = []  # metrics rows shown by each redraw (the live view's history)

    def _due(self) -> bool:
        return time.monotonic() - self._last_draw >= self.every_s

    def poll(self, force: bool = False) -> bool:
        """Redraw when ``metrics.jsonl`` gained rows and the last redraw is ``every_s`` old (launched jobs).

        Args:
            force: redraw whenever the file changed (the final picture when the job ended).

        Returns:
            True when it redrew.
        """
        rows = len(read_metrics(self.path))
        if rows == self._drawn_rows or (not force and not self._due()):
            return False
        self._drawn_rows = rows
        self._draw()
        return True

    def _draw(self) -> None:
        try:
            self._draw_now()
        finally:  # the pace counts from when the picture was shown
            self._last_draw = time.monotonic()

    def _draw_now(self) -> None:
        try:
            from IPython.display import display
        except ImportError:
            return
        from IPython.display import Image

        from icmlab.display import figure_png

        rows = read_metrics(self.path)
        self.drawn.append(len(rows))
        fig = Image(figure_png(plot_metrics(rows, self.title)))
        if self._handle is None:
            self._handle = display(fig, display_id=True)
        else:
            self._handle.update(fig)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        # MetricsJsonlCallback (registered first, see build_trainer) has appended this log's row.
        if state.is_world_process_zero and self._due():
            self._draw()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self._draw()
