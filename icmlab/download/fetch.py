"""Getting bytes onto the disk: a resumable, verifying HTTP/file downloader and the Hugging Face path.

Used by :mod:`icmlab.download.stage` (usable alone)::

    from icmlab.download.fetch import fetch_url
    fetch_url("https://host/big.zip", Path("data/.icmlab/downloads/big.zip"), sha256="…")

- :func:`fetch_url` (``http(s)://``, ``file://`` or a plain path) writes ``<dest>.part`` with a
  ``.part.json`` sidecar, resumes with ``Range: bytes=N-`` (``If-Range`` guarded), retries with
  exponential backoff, checks size and sha256, and renames onto ``dest`` only when everything
  matches: ``dest`` exists only as a complete, verified file.
- The Hugging Face path (:func:`icmlab.download.hub.fetch_hf_file` / :func:`icmlab.download.hub.fetch_hf_snapshot`)
  goes through ``huggingface_hub`` and then applies the same HTML and checksum checks
  (:func:`looks_like_html`, :func:`verify_file`), with the same errors and :class:`FetchResult`.

Failures raise :class:`FetchError` subclasses whose messages say what to do: :class:`AuthError`
(401/403, gated data), :class:`NotFoundError`, :class:`HTMLInsteadOfData` (the ``/blob/`` trap,
captive portals, error pages) and :class:`ChecksumError`.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import logging
import os
import random
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from tqdm.auto import tqdm

from icmlab.io import atomic_write_json
from icmlab.redact import redact_text

log = logging.getLogger(__name__)

CHUNK = 1 << 20
USER_AGENT = "icmlab-download/1"


class FetchError(RuntimeError):
    """A source could not be fetched; the message says why and what to do."""


class AuthError(FetchError):
    """The server wants credentials (401) or refuses them (403): gated or private data."""


class NotFoundError(FetchError):
    """The file, repository or revision does not exist at that location (404/410)."""


class HTMLInsteadOfData(FetchError):
    """An HTML page came back where a data file was expected."""


class ChecksumError(FetchError):
    """Size or sha256 differ from the expected values; nothing was left in place."""


@dataclass
class FetchResult:
    """What a fetch produced.

    Attributes:
        path: the verified file (``dest``, a file in the Hugging Face cache, or a local file).
        size: its size in bytes.
        sha256: its sha256 (hex), or None when it was not computed (trusted cache hit).
        transferred: bytes moved over the transport by this call (0 for a cache hit).
        resumed_from: bytes of an earlier partial download that were kept.
    """

    path: Path
    size: int
    sha256: str | None
    transferred: int = 0
    resumed_from: int = 0


# --------------------------------------------------------------------------- helpers
def sha256_file(path: Path, desc: str | None = None) -> str:
    """sha256 of a file, read in 1 MiB chunks (with a progress bar when ``desc`` is given)."""
    h = hashlib.sha256()
    size = path.stat().st_size
    with (
        open(path, "rb") as f,
        tqdm(total=size, unit="B", unit_scale=True, desc=desc, disable=desc is None, leave=False) as bar,
    ):
        while chunk := f.read(CHUNK):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def verify_file(path: Path, size: int | None = None, sha256: str | None = None, *, what: str = "") -> str | None:
    """Check ``path`` against an expected size and sha256.

    Returns:
        The sha256 when it was computed (``sha256`` given), else None.

    Raises:
        ChecksumError: on a mismatch (the file is left alone: the caller decides whether it is theirs to delete).
    """
    what = what or str(path)
    actual = path.stat().st_size
    if size is not None and actual != size:
        raise ChecksumError(f"{what}: size is {actual} bytes, expected {size}")
    if sha256:
        got = sha256_file(path, desc=f"verify {path.name}" if actual > 64 * CHUNK else None)
        if got != sha256.lower():
            raise ChecksumError(f"{what}: sha256 is {got}, expected {sha256.lower()}")
        return got
    return None


def suggest_url(url: str) -> str | None:
    """The raw-file URL of a web-page URL: Hugging Face ``/blob/`` → ``/resolve/``, GitHub → ``/raw/``."""
    parts = urllib.parse.urlsplit(url)
    if "/blob/" not in parts.path:
        return None
    new = "/raw/" if parts.netloc.endswith("github.com") else "/resolve/"
    return urllib.parse.urlunsplit(parts._replace(path=parts.path.replace("/blob/", new, 1)))


def looks_like_html(head: bytes) -> bool:
    """True when the first bytes of a body are an HTML document."""
    h = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if h.startswith((b"<!doctype html", b"<html", b"<head", b"<!-- ")):
        return True
    return h.startswith(b"<") and b"<html" in h[:1024]


def html_message(url: str, what: str) -> str:
    """The explanation given when ``url`` answered with an HTML page instead of ``what``."""
    fix = suggest_url(url)
    if fix:
        return (
            f"{url} returned an HTML web page, not {what}: '/blob/' URLs show the file's page. "
            f"Use the raw-file URL instead: {fix}"
        )
    return (
        f"{url} returned an HTML page instead of {what} (a login page, a captive portal, an error page "
        "or a file-viewer link). Open it in a browser to see which, then use the direct download URL "
        "(on Hugging Face: '/resolve/<revision>/<file>')."
    )


def local_path(location: str) -> Path | None:
    """The local path of a ``file://`` URL or a plain path; None for network URLs."""
    scheme = urllib.parse.urlsplit(location).scheme.lower()
    if scheme == "file":
        return Path(urllib.request.url2pathname(urllib.parse.urlsplit(location).path))
    if scheme in ("",) or (len(scheme) == 1 and os.name == "nt"):
        return Path(location).expanduser()
    return None


# --------------------------------------------------------------------------- HTTP / file transport
class _Retry(Exception):
    """A transient failure: retry (resuming) after a backoff. ``moved``: bytes kept from this attempt."""

    def __init__(self, message: str, moved: int = 0):
        super().__init__(message)
        self.moved = moved


def _open(url: str, offset: int, validator: str | None, timeout: float) -> tuple[int, dict[str, str], BinaryIO, str]:
    """Open ``url`` at byte ``offset``. Returns (status, lower-case headers, stream, final url)."""
    path = local_path(url)
    if path is not None:
        if not path.is_file():
            raise NotFoundError(f"{path}: no such file")
        f = open(path, "rb")
        size = path.stat().st_size
        f.seek(min(offset, size))
        return (206 if offset else 200), {"content-length": str(size - min(offset, size))}, f, path.as_uri()
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        if validator:
            headers["If-Range"] = validator
    req = urllib.request.Request(url, headers=headers)
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code in (401, 403):
            raise AuthError(
                f"{url}: the server answered {e.code} ({e.reason}): this source needs credentials or "
                "an access grant from the data's owners."
            ) from None
        if e.code in (404, 410):
            raise NotFoundError(
                f"{url}: the server answered {e.code} ({e.reason}): the file is not there (moved or renamed?)"
            ) from None
        if e.code == 416:
            return 416, {}, io.BytesIO(), url
        if e.code in (408, 425, 429) or e.code >= 500:
            raise _Retry(f"HTTP {e.code} {e.reason}") from None
        raise FetchError(f"{url}: the server answered {e.code} ({e.reason})") from None
    except (urllib.error.URLError, http.client.HTTPException, ConnectionError, socket.timeout, TimeoutError) as e:
        raise _Retry(f"{type(e).__name__}: {getattr(e, 'reason', e)}") from None
    return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp, resp.geturl()


def fetch_url(
    url: str,
    dest: Path,
    *,
    size: int | None = None,
    sha256: str | None = None,
    retries: int = 5,
    backoff: float = 1.0,
    timeout: float = 60.0,
    allow_html: bool = False,
    what: str | None = None,
    progress: bool = True,
    cancel: threading.Event | None = None,
    replace_other: bool = False,
) -> FetchResult:
    """Download ``url`` to ``dest``: resumable, retried, verified, atomic.

    Args:
        url: ``http(s)://``, ``file://`` or a local path.
        dest: final path; ``<dest>.part`` and ``<dest>.part.json`` hold an unfinished download.
        size: expected size in bytes (checked before and after the transfer), if known.
        sha256: expected sha256 (hex), if known.
        retries: attempts without progress before giving up (a retry that made progress resets the count).
        backoff: first retry delay in seconds; doubles each time (with jitter, capped at 60 s).
        timeout: socket timeout per read.
        allow_html: accept an HTML body (never for data files).
        what: the file's description for messages (default: its name).
        progress: show a tqdm progress bar.
        cancel: when set (Ctrl-C in the stage), stop after the current chunk; the partial file is kept.
        replace_other: ``dest`` is icmlab's own (its download state): another version found there is
            replaced. Otherwise a file at ``dest`` that does not verify is someone's: it is left untouched
            and :class:`FetchError` says so.

    Returns:
        A :class:`FetchResult`; ``transferred`` counts only the bytes moved by this call.

    Raises:
        AuthError, NotFoundError, HTMLInsteadOfData, ChecksumError: see the module docstring; the
            partial file is removed for the last two, kept (for resuming) otherwise.
        FetchError: retries exhausted or an unexpected answer.
    """
    dest = Path(dest)
    what = what or dest.name
    if dest.is_file():
        # dest only ever appears by renaming a verified download, so it is complete ...
        try:
            if sha256:
                verify_file(dest, size, sha256, what=str(dest))
            return FetchResult(dest, dest.stat().st_size, sha256.lower() if sha256 else None)
        except ChecksumError as e:  # ... of another version of the file
            if not replace_other:
                raise FetchError(
                    f"{dest} is already there and is not the expected file ({e}); it was left untouched: "
                    "move it away to download the expected one, or point data.sources at it to use it"
                ) from None
            dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    part, meta = dest.with_name(dest.name + ".part"), dest.with_name(dest.name + ".part.json")
    state = _read_meta(meta)
    if part.exists() and state.get("url_sha256") != _url_hash(url):
        part.unlink()  # a partial file from another URL cannot be resumed
    offset = part.stat().st_size if part.exists() else 0
    if size is not None and offset > size:
        part.unlink()
        offset = 0
    resumed_from, transferred, failures = offset, 0, 0
    hasher = _Digest()
    _hash_prefix(part, offset, hasher)  # the kept bytes count towards the checksum
    bar = tqdm(total=size, initial=offset, unit="B", unit_scale=True, desc=what[:40], disable=not progress, leave=False)
    try:
        while not (size is not None and offset == size and part.exists()):
            try:
                got = _transfer(url, part, meta, offset, state, size, hasher, bar, timeout, allow_html, what, cancel)
            except _Retry as e:
                transferred += e.moved
                failures = 0 if e.moved else failures + 1  # progress resets the count: flaky links finish
                if failures > retries:
                    raise FetchError(f"{url}: gave up after {retries} retries: {e}") from None
                delay = min(60.0, backoff * 2 ** max(failures - 1, 0)) * (0.75 + 0.5 * random.random())
                log.warning("%s: %s; retrying in %.1f s (partial file kept)", what, e, delay)
                time.sleep(delay)
                offset = part.stat().st_size if part.exists() else 0
                state = _read_meta(meta)
                continue
            except (HTMLInsteadOfData, ChecksumError):
                _remove(part, meta)
                raise
            transferred += got.moved
            if got.restarted:
                resumed_from = 0
            break
        digest = hasher.hexdigest()
        actual = part.stat().st_size
        problems = []
        if size is not None and actual != size:
            problems.append(f"size {actual} bytes, expected {size}")
        if sha256 and digest != sha256.lower():
            problems.append(f"sha256 {digest}, expected {sha256.lower()}")
        if problems:
            _remove(part, meta)
            raise ChecksumError(
                f"{url}: {'; '.join(problems)}. The download was removed and nothing was "
                f"written to {dest}; if the catalog's checksum is outdated, point data.sources "
                "at a file you trust."
            )
        with open(part, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(part, dest)
        meta.unlink(missing_ok=True)
        return FetchResult(dest, actual, digest, transferred, resumed_from)
    finally:
        bar.close()


class _Digest:
    """A resettable sha256 (a restarted transfer starts the checksum again)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._h = hashlib.sha256()

    def update(self, data: bytes) -> None:
        self._h.update(data)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


@dataclass
class _Got:
    moved: int
    restarted: bool


def _transfer(
    url: str,
    part: Path,
    meta: Path,
    offset: int,
    state: dict,
    size: int | None,
    hasher,
    bar,
    timeout: float,
    allow_html: bool,
    what: str,
    cancel: threading.Event | None,
) -> _Got:
    """One request appending to ``part`` from ``offset``; raises :class:`_Retry` on transient trouble."""
    status, headers, stream, final_url = _open(url, offset, state.get("validator"), timeout)
    moved = 0
    try:
        if status == 416:  # our offset is at/after the end of what the server has: start again cleanly
            part.unlink(missing_ok=True)
            hasher.reset()
            bar.reset(total=size)
            raise _Retry("HTTP 416 (range not satisfiable); restarting from byte 0")
        restarted = bool(offset) and status != 206
        if restarted:  # the server ignored the range, or If-Range saw a changed file
            offset = 0
            hasher.reset()
            bar.reset(total=size)
        if offset:
            m = re.match(r"bytes (\d+)-", headers.get("content-range", f"bytes {offset}-"))
            if not m or int(m.group(1)) != offset:
                raise FetchError(f"{url}: asked for bytes from {offset}, got {headers.get('content-range')}")
        length = headers.get("content-length", "")
        total = offset + int(length) if length.isdigit() else None
        if size is not None and total is not None and total != size:
            raise ChecksumError(f"{url}: the server offers {total} bytes, expected {size}")
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        if not allow_html and offset == 0 and ctype in ("text/html", "application/xhtml+xml"):
            raise HTMLInsteadOfData(html_message(final_url or url, what))
        # The URL masked, and its hash to recognise it: no signature or credentials on disk.
        atomic_write_json(
            meta, {"url": redact_text(url), "url_sha256": _url_hash(url), "validator": _validator(headers)}
        )
        with open(part, "r+b" if offset else "wb") as f:
            f.seek(offset)
            f.truncate()
            while True:
                try:
                    chunk = stream.read(CHUNK)
                except (http.client.HTTPException, OSError) as e:
                    raise _Retry(f"connection lost after {offset + moved} bytes ({type(e).__name__})", moved) from None
                if not chunk:
                    break
                if cancel is not None and cancel.is_set():
                    raise InterruptedError(f"{what}: cancelled; the partial download is kept and resumes next time")
                if offset + moved == 0 and not allow_html and looks_like_html(chunk[:2048]):
                    raise HTMLInsteadOfData(html_message(final_url or url, what))
                f.write(chunk)
                f.flush()  # what reached the file is what a resumed download keeps
                hasher.update(chunk)
                moved += len(chunk)
                bar.update(len(chunk))
        if total is not None and offset + moved < total:
            raise _Retry(f"connection closed after {offset + moved} of {total} bytes", moved)
        return _Got(moved, restarted)
    finally:
        stream.close()


def _validator(headers: dict[str, str]) -> str | None:
    etag = headers.get("etag")
    if etag and not etag.startswith("W/"):
        return etag
    return headers.get("last-modified")


def _hash_prefix(part: Path, offset: int, hasher) -> None:
    if not offset:
        return
    with open(part, "rb") as f:
        left = offset
        while left and (chunk := f.read(min(CHUNK, left))):
            hasher.update(chunk)
            left -= len(chunk)


def _url_hash(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()


def _read_meta(meta: Path) -> dict:
    try:
        import orjson

        return orjson.loads(meta.read_bytes())
    except (OSError, ValueError):
        return {}


def _remove(*paths: Path) -> None:
    for p in paths:
        p.unlink(missing_ok=True)
