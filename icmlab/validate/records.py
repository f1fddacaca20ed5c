"""Record checks of the validate stage: the problem kinds, file and record checks, the parallel pass.

- :data:`KINDS`: every problem the validate stage reports, with its level, severity (``error``
  drops the record under the ``drop`` policy, ``warning`` never does), description and fix;
- :func:`check_file`: what the first bytes already tell (missing, HTML page, byte-order mark);
  :func:`utf8_error` locates an invalid UTF-8 byte once a parse has failed;
- :func:`check_record` (pure): the schema of one LLaVA record: id, conversations, roles, empty
  values, image-token count, the other family's dialect;
- :func:`record_pass`: the file's record spans (from the byte scanner of :mod:`icmlab.inputs.jsonscan`)
  parsed and checked in worker processes, token lengths measured with :mod:`icmlab.inputs.lengths`,
  duplicate ids collected; only compact results come back.

Usage::

    from icmlab.validate.records import KINDS, check_record
    check_record({"id": "1", "conversations": []}, "<image>")   # [("missing_conversations", ...)]

:func:`icmlab.validate.stage.validate_file` runs the whole pass and writes the report.
"""

from __future__ import annotations

import codecs
import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import orjson

from icmlab.inputs.jsonscan import DuplicateIds, iter_blocks
from icmlab.inputs.lengths import LengthSetup, length_bound, record_length
from icmlab.inputs.problems import KINDS, Kind  # noqa: F401  (re-exported: the stage's problem kinds)
from icmlab.io import compression_of
from icmlab.models.spec import DIALECTS


# --------------------------------------------------------------------------- file level
def check_file(path: Path) -> list[tuple[str, str]]:
    """File-level problems visible at the start of the file: missing, HTML page, byte-order mark.

    JSON syntax, UTF-8 validity (:func:`utf8_error`, located only when a parse fails) and the
    list shape are found by the record pass (the byte scanner and orjson).
    """
    if not path.is_file():
        return [("file_missing", f"{path} not found")]
    with open(path, "rb") as f:
        head = f.read(512)
    packed = compression_of(head)
    if packed:
        return [("file_compressed", f"{path} is {packed}-compressed, not JSON text; decompress it first")]
    if head.startswith(codecs.BOM_UTF8):
        return [("file_encoding", "byte 0: UTF-8 byte-order mark (json.load of the original repos fails on it)")]
    if head.lstrip().lower().startswith((b"<!doctype html", b"<html")):
        return [("file_html", f"{path} is an HTML page (a '/blob/' URL or an error page was saved)")]
    return []


def utf8_error(path: Path, offset: int = 0, length: int | None = None, chunk_bytes: int = 16 << 20) -> str | None:
    """Locate the first invalid UTF-8 byte of ``path[offset:offset+length]``: ``"byte N: reason"`` or None."""
    dec = codecs.getincrementaldecoder("utf-8")()
    end = path.stat().st_size if length is None else offset + length
    with open(path, "rb") as f:
        f.seek(offset)
        while offset < end:
            chunk = f.read(min(chunk_bytes, end - offset))
            try:
                dec.decode(chunk, final=offset + len(chunk) >= end)
            except UnicodeDecodeError as e:
                pending = len(dec.getstate()[0]) if e.start >= len(chunk) else 0
                return f"byte {offset + e.start - pending}: {e.reason}"
            offset += len(chunk)
    return None


# --------------------------------------------------------------------------- record level (pure)
def check_record(record: Any, image_token: str) -> list[tuple[str, str]]:
    """Schema problems of one LLaVA record, as ``(kind, detail)`` pairs (empty when clean).

    Written for speed (it runs on every record): the clean path does one pass over the turns
    with ``in`` tests before any counting.

    Args:
        record: a parsed element of the training list.
        image_token: the model's image token; the other family's token is a ``wrong_dialect``.

    Returns:
        The problems found.
    """
    if type(record) is not dict:
        return [("not_object", f"a JSON {type(record).__name__}")]
    out: list[tuple[str, str]] = []
    rid = record.get("id")
    if rid is None or rid == "" or (type(rid) is str and rid.isspace()):
        out.append(("missing_id", "no 'id'" if rid is None else "empty 'id'"))
    has_image = "image" in record
    if has_image:
        img = record["image"]
        if type(img) is not str or not img or img.isspace():
            out.append(("bad_image_field", f"image = {json.dumps(img)[:80]}"))
    convs = record.get("conversations")
    if type(convs) is not list or not convs:
        out.append(
            (
                "missing_conversations",
                "missing"
                if convs is None
                else f"{type(convs).__name__} of length {len(convs) if hasattr(convs, '__len__') else '-'}",
            )
        )
        return out
    other = _OTHER[image_token]
    roles: list = []
    in_human = in_gpt = wrong = 0
    answered = broken = False
    for i, turn in enumerate(convs):
        value = turn.get("value") if type(turn) is dict else None
        if type(value) is not str or "from" not in turn:
            out.append(("bad_turn", f"turn {i}: {json.dumps(turn)[:80]}"))
            roles.append(None)
            broken = True
            continue
        role = turn["from"]
        roles.append(role)
        if role != "human" and role != "gpt":
            out.append(("unknown_role", f"turn {i}: from = {role!r}"))
            broken = True
        if not value or value.isspace():
            out.append(("empty_value", f"turn {i} ({role}) is empty"))
        elif role == "gpt":
            answered = True
        if image_token in value:
            if role == "gpt":
                in_gpt += value.count(image_token)
            else:
                in_human += value.count(image_token)
        if other in value:
            wrong += value.count(other)
    if broken:  # the turn structure itself is broken: derived checks would only echo it
        return out + ([("wrong_dialect", f"{wrong} x {other!r}")] if wrong else [])
    if roles[0] != "human":
        out.append(("first_turn_not_human", f"turn 0 is {roles[0]!r}"))
    for i in range(1, len(roles)):
        if roles[i] == roles[i - 1]:
            out.append(("roles_not_alternating", f"turns {i - 1} and {i} are both {roles[i]!r}"))
            break
    if not answered:
        out.append(("no_answer", "no gpt turn with text"))
    elif roles[-1] == "human":
        out.append(("ends_with_human", f"turn {len(roles) - 1} is an unanswered question"))
    if wrong:
        out.append(("wrong_dialect", f"{wrong} x {other!r}; this model reads {image_token!r}"))
    if (in_human != has_image or in_gpt) and not (wrong and in_human + in_gpt == 0):
        where = f" ({in_gpt} in gpt turns)" if in_gpt else ""
        out.append(
            (
                "image_token_count",
                f"{in_human + in_gpt} x {image_token!r}{where} with " + ("'image' set" if has_image else "no 'image'"),
            )
        )
    return out


# The other family's token of each dialect (two families).
_OTHER = {tok: next(o for o in DIALECTS.values() if o != tok) for tok in DIALECTS.values()}


# --------------------------------------------------------------------------- the record pass (workers)
_WORKER: dict[str, Any] = {}


def _init_worker(image_token: str, setup: LengthSetup | None, stride: int) -> None:
    _WORKER.update(image_token=image_token, setup=setup, stride=stride)


def _check_span(path: str, offset: int, length: int, first: int, records: list | None = None) -> dict:
    """Parse and check one run of consecutive records (in a worker process).

    Returns:
        ``{first, n, problems: [(index, kind, detail)], images: [str|None], turns: [int],
        lengths: [(index, tokens, untruncated, supervised, truncated, image_cut)], json_error}``.
    """
    if records is None:
        fd = os.open(path, os.O_RDONLY)
        try:
            data = os.pread(fd, length, offset)
        finally:
            os.close(fd)
        try:
            records = orjson.loads(b"[" + data + b"]")
        except orjson.JSONDecodeError as e:
            bad_utf8 = utf8_error(Path(path), offset, length) if "UTF-8" in e.msg else None
            return {
                "first": first,
                "n": 0,
                "json_error": ("file_encoding", bad_utf8)
                if bad_utf8
                else ("file_not_json", f"byte {offset + max(e.pos - 1, 0)}: {e.msg}"),
            }
    token, setup, stride = _WORKER["image_token"], _WORKER["setup"], _WORKER["stride"]
    problems, images, turns, lengths = [], [], [], []
    for j, rec in enumerate(records):
        i = first + j
        found = check_record(rec, token)
        ok = True
        if found:
            problems += [(i, k, d) for k, d in found]
            ok = not any(KINDS[k].severity == "error" for k, _ in found)
        images.append(rec.get("image") if ok else None)
        turns.append(len(rec.get("conversations") or ()) if type(rec) is dict else 0)
        if (
            setup is not None
            and ok
            and (i % stride == 0 or length_bound(rec, setup.num_image_tokens) > setup.model_max_length)
        ):
            r = record_length(rec, setup)
            lengths.append((i, r["tokens"], r["untruncated"], r["supervised"], r["truncated"], r["image_cut"]))
            if r["supervised"] == 0:
                problems.append(
                    (i, "answer_cut", f"{r['untruncated']} tokens > {setup.model_max_length}; no answer token left")
                )
            elif r["truncated"]:
                problems.append((i, "truncated", f"{r['untruncated']} tokens cut to {setup.model_max_length}"))
            if r["image_cut"]:
                problems.append((i, "image_cut", f"the cut at {setup.model_max_length} splits the image tokens"))
    return {
        "first": first,
        "n": len(records),
        "problems": problems,
        "images": images,
        "turns": turns,
        "lengths": lengths,
        "json_error": None,
    }


def record_pass(
    path: Path,
    image_token: str,
    setup: LengthSetup | None,
    stride: int,
    workers: int,
    dup: DuplicateIds,
    repeats: np.ndarray | None,
    id_blocks: list,
) -> Iterator[dict]:
    """Stream the file's blocks to the workers; yield their results in file order.

    Args:
        path: the training JSON.
        image_token: the model's image token (see :func:`check_record`).
        setup: tokenizer setup for the length check, or None to skip it.
        stride: every ``stride``-th record is measured (and every record that may be too long).
        workers: processes; ``1`` checks in this process.
        dup: collects the records' ids (merge's intentional repeats excepted).
        repeats: merge's per-record repeat flags, or None.
        id_blocks: receives ``(first, id_keys, id_offsets)`` of each block, for the report.

    Yields:
        Per span: ``{first, n, problems, images, turns, lengths, json_error}`` (see :func:`_check_span`).

    Raises:
        ValueError: from the scanner's whole-file fallback (HTML, invalid JSON, not a list).
    """
    _init_worker(image_token, setup, stride)
    if workers <= 1:
        for block in iter_blocks(path):
            _dup_add(dup, block, repeats, id_blocks)
            yield _check_span(str(path), 0, 0, block.first, block.records())
        return
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with ProcessPoolExecutor(
        workers, mp_context=ctx, initializer=_init_worker, initargs=(image_token, setup, stride)
    ) as pool:
        pending = []
        for block in iter_blocks(path):
            _dup_add(dup, block, repeats, id_blocks)
            s, e = int(block.starts[0]), int(block.ends[-1])
            pending.append(
                pool.submit(_check_span, str(path), block.offset + s, e - s, block.first)
                if block.offset is not None
                else pool.submit(_check_span, str(path), 0, 0, block.first, block.records())
            )
            while len(pending) > 2 * workers:
                yield pending.pop(0).result()
        for fut in pending:
            yield fut.result()


def _dup_add(dup: DuplicateIds, block, repeats: np.ndarray | None, id_blocks: list) -> None:
    id_blocks.append((block.first, block.id_keys, block.id_offsets))  # ids for the report, without a re-scan
    idx = block.first + np.arange(len(block))
    keep = np.ones(len(block), bool)
    if repeats is not None:  # merge's repeated copies reuse ids on purpose
        keep &= ~repeats[np.minimum(idx, len(repeats) - 1)] | (idx >= len(repeats))
    dup.add(block, np.flatnonzero(keep), idx[keep])
