"""One writer per run directory: a lock for the stages that write into it, and leftovers swept.

Two ``icmlab merge`` runs with different inputs into one run directory used to race, the last
writer winning silently. :func:`run_dir_lock` holds ``<run_dir>/.lock`` (an ``flock``) while a stage
writes; a second writer gets an error naming the holder (stage, pid, host, start time)::

    with run_dir_lock(cfg, "merge"):
        ...  # write into cfg.run_dir

The lock is re-entrant within a process, and processes started by the holder (papermill kernels,
launched training ranks) inherit ``ICMLAB_RUN_LOCK`` and do not take it again. On acquiring it,
the hidden temporary files that :func:`icmlab.io.atomic_path` leaves behind when a writer is
killed (``kill -9`` mid-merge left ~300 MB) are removed: only the holder writes there.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import orjson

from icmlab.config import RunConfig

log = logging.getLogger("icmlab.rundir")

LOCK_ENV = "ICMLAB_RUN_LOCK"
#: ``atomic_path``'s temporary names: ``.<final name>.<8 random characters from mkstemp>.tmp``.
_TMP_NAME = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")
_held: dict[Path, int] = {}


class RunDirBusy(RuntimeError):
    """Another process is writing into the run directory."""


def lock_path(run_dir: Path) -> Path:
    """``<run_dir>/.lock``."""
    return Path(run_dir) / ".lock"


@contextmanager
def run_dir_lock(cfg: RunConfig, stage: str) -> Iterator[None]:
    """Hold the run directory's lock while ``stage`` writes into it.

    Raises:
        RunDirBusy: another process holds it; the message names that process and its stage.
    """
    path = lock_path(cfg.run_dir).absolute()
    if _held.get(path) or os.environ.get(LOCK_ENV) == str(path):
        _held[path] = _held.get(path, 0) + 1
        try:
            yield
        finally:
            _held[path] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirBusy(
                f"{cfg.run_dir} is in use by {_holder(fd)}; wait for it to finish, or use another run_name"
            ) from None
        os.ftruncate(fd, 0)
        holder = {"stage": stage, "pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%F %T")}
        os.write(fd, orjson.dumps(holder))
        _held[path], os.environ[LOCK_ENV] = 1, str(path)
        sweep_temporaries(cfg.run_dir)
        try:
            yield
        finally:
            _held.pop(path, None)
            os.environ.pop(LOCK_ENV, None)
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the flock


def sweep_temporaries(folder: Path) -> int:
    """Remove the temporary files of interrupted atomic writes below ``folder``; returns the bytes freed."""
    freed, names = 0, []
    for dirpath, _dirs, files in os.walk(folder):
        for name in files:
            if _TMP_NAME.fullmatch(name):
                p = Path(dirpath) / name
                try:
                    freed += p.stat().st_size
                    p.unlink()
                    names.append(str(p.relative_to(folder)))
                except OSError:
                    continue
    if names:
        log.info("removed %d leftover temporary file(s) (%d bytes) of interrupted writes: %s", len(names), freed, names)
    return freed


def _holder(fd: int) -> str:
    try:
        info = orjson.loads(os.pread(fd, 4096, 0))
        return f"the {info['stage']} stage (pid {info['pid']} on {info['host']}, since {info['since']})"
    except (orjson.JSONDecodeError, KeyError, TypeError, OSError):
        return "another icmlab process"
