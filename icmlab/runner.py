"""Run the stage notebooks in order with papermill: ``icmlab run parameters/X.yaml``.

Each stage is a notebook under ``notebooks/``. The runner saves the resolved config and an
environment record in ``runs/<run_name>/``, executes each notebook into that folder (the executed
notebooks are the record of the run), and writes a completion marker per stage **last**. A stage
whose marker is present and whose fingerprint (resolved config, notebook cell sources, input files,
previous stages) is unchanged is skipped. The first failure stops the run with a message naming the
notebook and the cell; the executed notebook is kept for diagnosis.

While a stage runs, its progress bars are shown in the terminal (:mod:`icmlab.progress`: redrawn
in place on a terminal, a line a minute in a log). Otherwise the run is quiet: papermill's INFO
lines and the kernel's own log (its "running over TCP" warning) appear only with ``verbose``
(``icmlab run -v``).

SIGTERM (a scheduler's pre-emption, ``kill``) is forwarded to the notebook kernel, which runs in
a session of its own and would not see it: an in-process training saves a checkpoint at the end of
its step, a launched job's ranks do the same (see :mod:`icmlab.train.launch`). The stage is then
not marked done, and :class:`StageInterrupted` ends the run (``icmlab run`` exits 143); a rerun
resumes from the checkpoint.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from icmlab import paths
from icmlab.config import RunConfig, find_project_root, save_resolved
from icmlab.io import atomic_write_json, read_json
from icmlab.progress import PROGRESS_FILE_ENV, TerminalProgress

log = logging.getLogger("icmlab.run")

STAGES: tuple[str, ...] = ("setup", "download", "merge", "validate", "inspect", "train", "evaluate", "playground")


class StageFailed(RuntimeError):
    """A stage notebook raised; the message names the notebook, the cell and the executed copy."""


class StageInterrupted(RuntimeError):
    """SIGTERM stopped the run during a stage (forwarded to its kernel); rerun to resume."""


def _child_pids() -> list[int]:
    """Processes whose parent is this one (the notebook kernel among them); Linux ``/proc``."""
    me, out = os.getpid(), []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            try:
                if int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1]) == me:
                    out.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return out


class _ForwardSigterm:
    """While active (main thread only), SIGTERM to this process goes to its children (the kernel)."""

    def __init__(self) -> None:
        self.received = False
        self._previous: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        self.received = True
        log.warning("SIGTERM: forwarding it to the notebook kernel (training checkpoints and stops)")
        for pid in _child_pids():
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def __enter__(self) -> "_ForwardSigterm":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


@dataclass
class StageOutcome:
    """What happened to one stage."""

    stage: str
    status: str  # "ran" | "skipped" | "failed" | "interrupted"
    seconds: float
    output: Path


@dataclass
class PipelineResult:
    """Outcome of ``run_pipeline``."""

    run_dir: Path
    stages: list[StageOutcome] = field(default_factory=list)

    @property
    def report(self) -> Path:
        """The evaluation report (exists once the evaluate stage ran)."""
        return self.run_dir / "report" / "report.html"

    def summary(self) -> str:
        """Lines for the terminal."""
        lines = [f"{s.stage:<9} {s.status:<8} {s.seconds:7.1f} s  {s.output}" for s in self.stages]
        return "\n".join(lines)


def notebook_for(stage: str, root: Path | None = None) -> Path:
    """The notebook of a stage: ``notebooks/NN_<stage>.ipynb``."""
    root = root or find_project_root()
    return root / "notebooks" / f"{STAGES.index(stage):02d}_{stage}.ipynb"


def select_stages(only: list[str] | None = None, start: str | None = None) -> list[str]:
    """Stages to consider, in order.

    Raises:
        ValueError: for an unknown stage name (the message lists the stages).
    """
    for name in [*(only or []), *([start] if start else [])]:
        if name not in STAGES:
            raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    chosen = list(STAGES)
    if start:
        chosen = chosen[chosen.index(start) :]
    if only:
        chosen = [s for s in chosen if s in only]
    return chosen


def stage_inputs(cfg: RunConfig, stage: str) -> list[Path]:
    """Files whose change must re-run a stage even when its config is unchanged."""
    if stage == "merge":
        return (
            [paths.dataset_json(cfg, d) for d in cfg.data.datasets if d != "custom"]
            + [cfg.data.root / p for p in cfg.data.custom_json]
            + ([paths.dataset_json(cfg, "llava_v1_5_mix665k")] if cfg.train.strategy == "mix" else [])
        )
    if stage in ("validate", "inspect"):
        return [paths.merged_json(cfg)]
    if stage == "train":
        return [paths.training_json(cfg)]
    if stage in ("evaluate", "playground"):
        return [paths.final_model_dir(cfg) / "config.json", paths.metrics_jsonl(cfg)]
    return []


def notebook_code(notebook: Path) -> bytes:
    """What of a notebook decides its result: each cell's type and source, in order.

    Outputs, execution counts and cell/notebook metadata are left out, so a notebook that Lab saved
    after a Run All (outputs in it, widget state in its metadata) does not re-run its stage.
    """
    nb = orjson.loads(notebook.read_bytes())
    cells = [(c.get("cell_type", ""), "".join(c.get("source", ""))) for c in nb.get("cells", [])]
    return orjson.dumps(cells)


def fingerprint(cfg: RunConfig, stage: str, notebook: Path, previous: str) -> str:
    """Hash of everything a stage's result depends on (the notebook by :func:`notebook_code`)."""
    h = hashlib.sha256()
    h.update(orjson.dumps(cfg.to_dict(), option=orjson.OPT_SORT_KEYS))
    h.update(stage.encode())
    h.update(notebook_code(notebook))
    h.update(previous.encode())
    for p in stage_inputs(cfg, stage):
        st = p.stat() if p.exists() else None
        h.update(f"{p}:{st.st_size if st else -1}:{st.st_mtime_ns if st else -1}".encode())
    return h.hexdigest()


def _marker(cfg: RunConfig, stage: str) -> Path:
    return paths.markers_dir(cfg) / f"{stage}.json"


def _failing_cell(output: Path) -> str | None:
    """Locate the cell that raised in an executed notebook: its execution count and first line."""
    import nbformat

    try:
        nb = nbformat.read(output, as_version=4)
    except Exception:  # the notebook may not have been written at all
        return None
    for cell in nb.cells:
        if cell.cell_type == "code" and any(o.get("output_type") == "error" for o in cell.get("outputs", [])):
            first = next((line for line in cell.source.splitlines() if line.strip()), "")
            return f"cell [{cell.execution_count}] ({first.strip()[:60]!r})"
    return None


def _failure_message(stage: str, notebook: Path, output: Path, err: Exception) -> str:
    ename = getattr(err, "ename", type(err).__name__)
    evalue = getattr(err, "evalue", str(err))
    where = _failing_cell(output) or "a cell"
    return (
        f"stage '{stage}' failed in {notebook.name}, {where}: {ename}: {evalue}\n"
        f"  executed notebook kept for diagnosis: {output}"
    )


def run_pipeline(
    cfg: RunConfig,
    *,
    only: list[str] | None = None,
    start: str | None = None,
    force: bool = False,
    kernel_name: str | None = None,
    root: Path | None = None,
    verbose: bool = False,
) -> PipelineResult:
    """Execute the stage notebooks for ``cfg`` into its run directory.

    Args:
        cfg: the validated run config.
        only: run just these stages (in pipeline order).
        start: start at this stage (``--from``); earlier stages are not considered.
        force: run even when a stage's marker and fingerprint say it is done.
        kernel_name: Jupyter kernel to use (default: the kernel of this Python).
        root: project root holding ``notebooks/`` (default: found from the working directory).
        verbose: show papermill's INFO lines and the kernel's own log.

    Returns:
        A :class:`PipelineResult` listing each stage's outcome.

    Raises:
        StageFailed: at the first failing notebook, naming it and the cell.
    """
    import papermill as pm

    root = root or find_project_root()
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = save_resolved(cfg)
    from icmlab.envinfo import environment_record

    atomic_write_json(run_dir / "env.json", environment_record())
    # The kernel must be this environment's Python: ipykernel's spec resolves `python` through PATH.
    os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
    logging.getLogger("papermill").setLevel(logging.INFO if verbose else logging.WARNING)
    quiet_kernel = [] if verbose else ["--log-level=ERROR"]  # ipykernel's own log (the TCP warning)
    progress_file = run_dir / "progress.txt"
    result = PipelineResult(run_dir)
    previous = ""
    chosen = select_stages(only, start)
    for stage in STAGES:
        nb = notebook_for(stage, root)
        marker = _marker(cfg, stage)
        if stage not in chosen:
            if marker.exists():
                previous = read_json(marker).get("fingerprint", "")
            continue
        fp = fingerprint(cfg, stage, nb, previous)
        out = run_dir / nb.name
        if not force and marker.exists() and read_json(marker).get("fingerprint") == fp:
            log.info("%s: up to date, skipped (%s)", stage, marker)
            result.stages.append(StageOutcome(stage, "skipped", 0.0, out))
            previous = fp
            continue
        marker.unlink(missing_ok=True)
        log.info("%s: running %s -> %s", stage, nb.name, out)
        t0 = time.perf_counter()
        os.environ[PROGRESS_FILE_ENV] = str(progress_file)  # the kernel inherits it
        with _ForwardSigterm() as sigterm, TerminalProgress(progress_file, stage):
            try:
                pm.execute_notebook(
                    str(nb),
                    str(out),
                    parameters={"params_file": str(resolved), "overrides": {}},
                    cwd=str(root),
                    kernel_name=kernel_name,
                    progress_bar=False,
                    log_output=False,
                    extra_arguments=quiet_kernel,
                )
            except Exception as err:  # papermill raises PapermillExecutionError; keep the notebook
                status = "interrupted" if sigterm.received else "failed"
                result.stages.append(StageOutcome(stage, status, time.perf_counter() - t0, out))
                if sigterm.received:
                    raise StageInterrupted(f"stage '{stage}' stopped by SIGTERM; rerun to resume ({out})") from None
                raise StageFailed(_failure_message(stage, nb, out, err)) from None
            finally:
                os.environ.pop(PROGRESS_FILE_ENV, None)
        secs = time.perf_counter() - t0
        if sigterm.received:  # the stage ended early but cleanly (training saved a checkpoint)
            result.stages.append(StageOutcome(stage, "interrupted", secs, out))
            raise StageInterrupted(f"stage '{stage}' stopped by SIGTERM after a checkpoint; rerun to resume ({out})")
        # Re-fingerprint after the stage ran: its own inputs (e.g. merged JSON for validate) exist now.
        fp = fingerprint(cfg, stage, nb, previous)
        atomic_write_json(
            marker,
            {
                "stage": stage,
                "fingerprint": fp,
                "seconds": round(secs, 2),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "notebook": str(out),
            },
        )
        result.stages.append(StageOutcome(stage, "ran", secs, out))
        log.info("%s: done in %.1f s", stage, secs)
        previous = fp
    return result
