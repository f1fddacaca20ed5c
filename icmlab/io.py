"""Small I/O helpers shared by every stage: atomic writes and JSON reading with clear errors.

Every file icmlab writes goes through these functions, so an interrupted run never leaves a
half-written file under its final name and no input file is ever modified in place.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import orjson


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds.

    The temporary file lives in the same directory, so the final ``os.replace`` is atomic on POSIX.
    On error the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600 files; give the final file the usual umask-based mode.
        umask = os.umask(0)
        os.umask(umask)
        if tmp_path.exists():
            os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file + fsync + rename)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: bool = True) -> Path:
    """Serialise ``obj`` as JSON (orjson, UTF-8, non-ASCII kept) and write it atomically."""
    opts = orjson.OPT_INDENT_2 if indent else 0
    return atomic_write_bytes(path, orjson.dumps(obj, option=opts | orjson.OPT_SERIALIZE_NUMPY))


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file, raising ``ValueError`` that names the file and the byte offset on bad input."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as e:
        head = data[:200].lstrip().lower()
        if head.startswith((b"<!doctype html", b"<html")):
            raise ValueError(
                f"{path}: is an HTML page, not JSON (a '/blob/' URL or an error page was saved; "
                "download the file through a '/resolve/' URL)"
            ) from None
        raise ValueError(f"{path}: not valid JSON at byte {e.pos}: {e.msg}") from None


def write_jsonl(path: str | os.PathLike, rows: list[dict]) -> Path:
    """Write ``rows`` as JSON lines atomically."""
    return atomic_write_bytes(path, b"".join(orjson.dumps(r) + b"\n" for r in rows))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSON-lines file; blank lines are skipped."""
    out = []
    with open(path, "rb") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(orjson.loads(line))
                except orjson.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i}: not valid JSON: {e.msg}") from None
    return out


def dumps_pretty(obj: Any) -> str:
    """Human-readable JSON for displays and logs."""
    return json.dumps(obj, indent=2, ensure_ascii=False, default=str)
