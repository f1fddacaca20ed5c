"""Small I/O helpers shared by every stage: atomic writes and JSON reading with clear errors.

Every file icmlab writes goes through these functions, so an interrupted run never leaves a
half-written file under its final name and no input file is ever modified in place.
"""

from __future__ import annotations

import hashlib
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
        packed = compression_of(data[:8])
        if packed:
            raise ValueError(
                f"{path}: is a {packed}-compressed file, not JSON text; decompress it first "
                f"({_UNPACK[packed]} {path.name}) and point the config at the result"
            ) from None
        head = data[:200].lstrip().lower()
        if head.startswith((b"<!doctype html", b"<html")):
            raise ValueError(
                f"{path}: is an HTML page, not JSON (a '/blob/' URL or an error page was saved; "
                "download the file through a '/resolve/' URL)"
            ) from None
        raise ValueError(f"{path}: not valid JSON at byte {e.pos}: {e.msg}") from None


#: Leading bytes of compressed formats, and the command that undoes each.
_MAGIC = {b"\x1f\x8b": "gzip", b"PK\x03\x04": "zip", b"BZh": "bzip2", b"\xfd7zXZ": "xz", b"\x28\xb5\x2f\xfd": "zstd"}
_UNPACK = {"gzip": "gunzip", "zip": "unzip", "bzip2": "bunzip2", "xz": "unxz", "zstd": "unzstd"}


def compression_of(head: bytes) -> str | None:
    """The compression format whose magic bytes start ``head`` (gzip, zip, bzip2, xz, zstd), or None."""
    return next((name for magic, name in _MAGIC.items() if head.startswith(magic)), None)


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


# --------------------------------------------------------------------------- derived files and their inputs
#: Files up to this size are hashed whole for their fingerprint; larger ones by three 1 MiB samples
#: (head, middle, tail) plus their size, which a re-merge or re-download always changes in practice.
_FULL_HASH_BYTES = 64 << 20
_SAMPLE_BYTES = 1 << 20


def file_fingerprint(path: str | os.PathLike) -> dict:
    """Size and content hash of a file (whole up to 64 MiB, else sampled); the mtime is not used,
    so a copy or a ``touch`` does not make the derived files stale."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= _FULL_HASH_BYTES:
            for chunk in iter(lambda: f.read(8 << 20), b""):
                h.update(chunk)
        else:
            for pos in (0, size // 2, size - _SAMPLE_BYTES):
                f.seek(pos)
                h.update(f.read(_SAMPLE_BYTES))
    return {"size": size, "sha256": h.hexdigest(), "whole": size <= _FULL_HASH_BYTES}


def inputs_stamp_path(derived: str | os.PathLike) -> Path:
    """The sidecar recording what ``derived`` was made from: ``train.clean.json`` → ``train.clean.inputs.json``."""
    derived = Path(derived)
    return derived.with_name(f"{derived.stem}.inputs.json")


def write_inputs_stamp(derived: str | os.PathLike, inputs: list[Path]) -> Path:
    """Record the fingerprints of ``derived`` and of the files it was made from (call after writing it)."""
    return atomic_write_json(
        inputs_stamp_path(derived),
        {"output": file_fingerprint(derived), "inputs": {str(p): file_fingerprint(p) for p in inputs}},
    )


def stale_reason(derived: str | os.PathLike) -> str | None:
    """Why ``derived`` no longer matches its inputs (None when it does).

    Stale: no stamp, ``derived`` itself changed since the stamp, an input is gone or changed.
    """
    derived, stamp = Path(derived), inputs_stamp_path(derived)
    if not stamp.is_file():
        return f"{derived.name} has no record of its inputs ({stamp.name} is missing)"
    try:
        recorded = read_json(stamp)
        if file_fingerprint(derived) != recorded["output"]:
            return f"{derived.name} changed after it was made"
        for name, fp in recorded["inputs"].items():
            if not Path(name).is_file():
                return f"its input {name} is gone"
            if file_fingerprint(name) != fp:
                return f"its input {name} changed after {derived.name} was made from it"
    except (ValueError, KeyError, TypeError, OSError) as e:
        return f"{stamp.name} is unreadable ({e})"
    return None
