"""What every stage notebook sets up first (``load_notebook_config`` calls :func:`prepare`).

- ``icmlab`` log lines go to stdout below WARNING (Jupyter draws stderr as red boxes, which made
  every INFO line look like an error), warnings and errors still to stderr;
- third-party messages known to be harmless here are dropped, each matched by its exact text so
  that anything new still shows: DeepSpeed's "Setting accelerator to CPU" (expected on a CPU
  machine), transformers' notice that its image processors fall back to PIL without torchvision
  (torchvision is not a dependency, see :mod:`icmlab.inputs.images`), and the "Loading weights" /
  "Writing model shards" bars of every model load and save (seconds each, up to six per notebook);
- the progress tee for ``icmlab run`` (:func:`icmlab.progress.start_tee`) when the runner asks.

Calling it again (a re-run config cell) changes nothing. Outside a Jupyter kernel (a test or a
script calling ``load_notebook_config``) it does nothing: the process's logging is its owner's. The
handlers write to whatever ``sys.stdout``/``sys.stderr`` are at the time of each line, so a kernel
that swaps its streams (or a captured test) never meets a closed one.
"""

from __future__ import annotations

import logging
import sys

from icmlab.progress import start_tee

# (logger name, text the harmless message contains)
HARMLESS = (
    ("DeepSpeed", "Setting accelerator to CPU"),
    ("transformers.utils.import_utils", "requires torchvision (not installed); falling back to"),
)
QUIET_BARS = ("Loading weights", "Writing model shards")
_HANDLER_TAG = "_icmlab_notebook"


class _DropText(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


class _Below(logging.Filter):
    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < self.level


class _CurrentStream(logging.StreamHandler):
    """A stream handler bound to ``sys.<name>`` as it is when a line is written, not when created."""

    def __init__(self, name: str) -> None:
        self._std = name
        super().__init__()

    @property
    def stream(self):  # noqa: D102
        return getattr(sys, self._std)

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns one; the property ignores it
        pass


def in_kernel() -> bool:
    """True inside an IPython kernel (a notebook, papermill), where :func:`prepare` applies."""
    shell = getattr(sys.modules.get("IPython"), "get_ipython", lambda: None)()
    return shell is not None and "ipykernel" in sys.modules


def _quiet_bars(factory, args, kwargs):  # transformers' tqdm hook: (tqdm factory, args, kwargs) -> bar
    if kwargs.get("desc") in QUIET_BARS:
        kwargs = {**kwargs, "disable": True}
    return factory(*args, **kwargs)


def prepare() -> None:
    """Route the logs, drop the known-harmless messages, start the progress tee (see the module doc)."""
    if not in_kernel():
        return
    pkg = logging.getLogger("icmlab")
    if not any(getattr(h, _HANDLER_TAG, False) for h in pkg.handlers):
        out = _CurrentStream("stdout")
        out.addFilter(_Below(logging.WARNING))
        err = _CurrentStream("stderr")
        err.setLevel(logging.WARNING)
        for h in (out, err):
            h.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
            setattr(h, _HANDLER_TAG, True)
            pkg.addHandler(h)
        pkg.setLevel(logging.INFO)
        pkg.propagate = False  # not twice when the application configured the root logger too
        for name, text in HARMLESS:
            logging.getLogger(name).addFilter(_DropText(text))
        from transformers.utils import logging as hf_logging

        hf_logging.set_tqdm_hook(_quiet_bars)
    start_tee()
