"""Validate stage: a preflight report on the merged training file, before any GPU time is spent.

Upstream finds a bad dataset hours into a run (a missing OCR-VQA image, ``<image>`` left
unconverted for mPLUG-Owl2, answers pushed past ``model_max_length`` by 576 image tokens). This
stage finds all of it first and reports, for every problem kind (:data:`KINDS`), a count and
examples:

- file: missing, an HTML page, not UTF-8 / not JSON (with the byte offset), not a list;
- records (:func:`check_record`, pure): id, conversations, roles, empty values, image-token count,
  wrong dialect, duplicate ids (merge's intentional repeats excepted);
- images (:func:`check_images`, threads): missing with exact case (cached directory listings),
  unreadable, truncated/corrupt (full decode, optional), content format different from the
  extension, degenerate sizes;
- lengths (:func:`record_length`): the model's tokenizer and template through
  :func:`icmlab.preprocess.encode_conversation`, the function the trainer uses, image tokens
  counted: samples cut at ``model_max_length`` and samples whose answer tokens are all cut.

Records are parsed and checked in worker processes, one span of the file each (found by the byte
scanner of :mod:`icmlab.merge`), so only compact results are held in memory.

Policies (``cfg.data.invalid_records``): ``stop`` writes the report and raises
:class:`DataValidationError` when a record has an error; ``drop`` writes ``train.clean.json``
without those records and ``rejects.jsonl`` with the reasons of each. Warnings never drop a record.

Usage::

    from icmlab.validate import run
    result = run(cfg)                 # notebook 03_validate / ``icmlab validate parameters/X.yaml``
    print(result.summary())
"""

from __future__ import annotations

import codecs
import contextlib
import json
import logging
import multiprocessing
import os
import time
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import numpy as np
import orjson
from PIL import Image, UnidentifiedImageError

from icmlab import paths
from icmlab.config import RunConfig
from icmlab.conversation import DIALECTS
from icmlab.io import atomic_path, atomic_write_json, write_jsonl
from icmlab.merge import DuplicateIds, id_value, iter_blocks

log = logging.getLogger("icmlab.validate")

MAX_EXAMPLES = 10


class Kind(NamedTuple):
    """A problem kind: where it is found, whether it drops the record, and what to do about it."""

    level: str  # file | record | image | length
    severity: str  # error (the record cannot train as intended) | warning (reported, kept)
    description: str
    fix: str


KINDS: dict[str, Kind] = {
    "file_missing": Kind("file", "error", "the training JSON does not exist", "run the merge stage"),
    "file_html": Kind("file", "error", "an HTML page saved instead of the JSON",
                      "download through a '/resolve/' URL, not '/blob/'"),
    "file_encoding": Kind("file", "error", "not UTF-8 (or a byte-order mark) at the given byte offset",
                          "re-encode the file as UTF-8 without BOM"),
    "file_not_json": Kind("file", "error", "not valid JSON at the given byte offset", "re-download or fix the file"),
    "file_not_list": Kind("file", "error", "the top level is not a list of records", "use the LLaVA list format"),
    "not_object": Kind("record", "error", "a list element is not a JSON object", "remove it"),
    "missing_id": Kind("record", "error", "no 'id' or an empty one", "give every record a unique id"),
    "missing_conversations": Kind("record", "error", "'conversations' missing, empty or not a list",
                                  "add [{from: human, value}, {from: gpt, value}, ...]"),
    "bad_turn": Kind("record", "error", "a turn is not {from, value} with a string value", "fix the turn"),
    "unknown_role": Kind("record", "error", "'from' is neither 'human' nor 'gpt'", "use human/gpt"),
    "first_turn_not_human": Kind("record", "error", "the first turn is not 'human' (upstream silently drops it)",
                                 "start with the human turn"),
    "roles_not_alternating": Kind("record", "error", "two consecutive turns have the same role (upstream asserts)",
                                  "alternate human/gpt"),
    "empty_value": Kind("record", "error", "a turn's value is empty (an empty answer masks the whole sample upstream)",
                        "fill or remove the turn"),
    "no_answer": Kind("record", "error", "no non-empty gpt turn: the sample trains on nothing", "add the answer"),
    "ends_with_human": Kind("record", "warning", "the last turn is 'human' (its question is never answered)",
                            "drop the trailing turn"),
    "bad_image_field": Kind("record", "error", "'image' is not a non-empty string (one image per sample)",
                            "a path relative to data.root"),
    "image_token_count": Kind("record", "error",
                              "not exactly one image token in a human turn with 'image' set, or one without 'image'",
                              "one image token in a human turn iff the record has an image"),
    "wrong_dialect": Kind("record", "error", "the other model family's image token (mPLUG-Owl2 would train text-only)",
                          "re-run merge for this model family"),
    "duplicate_id": Kind("record", "warning", "the id of an earlier record is reused", "make ids unique"),
    "image_missing": Kind("image", "error", "the image file does not exist (exact case)", "download it or fix the path"),
    "image_unreadable": Kind("image", "error", "not an image PIL can open (empty, HTML, directory...)",
                             "replace the file"),
    "image_corrupt": Kind("image", "error", "truncated or corrupt: decoding fails", "re-download the file"),
    "image_format_mismatch": Kind("image", "warning", "content format differs from the extension (e.g. GIF named .jpg)",
                                  "PIL reads it by content; rename if other tools need it"),
    "image_degenerate": Kind("image", "warning", "tiny side or extreme aspect ratio", "check the image"),
    "truncated": Kind("length", "warning", "longer than model_max_length: the end is cut, some answer tokens remain",
                      "raise data.model_max_length or shorten"),
    "image_cut": Kind("length", "warning", "the cut goes through the image tokens (trained as text before the image)",
                      "raise data.model_max_length"),
    "answer_cut": Kind("length", "error", "every answer token lies past model_max_length: trains on nothing",
                       "raise data.model_max_length or shorten the prompt"),
}
IMAGE_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".gif": "GIF", ".bmp": "BMP", ".webp": "WEBP",
                 ".tif": "TIFF", ".tiff": "TIFF"}


class DataValidationError(ValueError):
    """Validation found errors under the ``stop`` policy; the message is the report summary."""


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
        out.append(("missing_conversations", "missing" if convs is None else f"{type(convs).__name__} of length "
                    f"{len(convs) if hasattr(convs, '__len__') else '-'}"))
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
        out.append(("image_token_count", f"{in_human + in_gpt} x {image_token!r}{where} with "
                    + ("'image' set" if has_image else "no 'image'")))
    return out


# The other family's token of each dialect (two families).
_OTHER = {tok: next(o for o in DIALECTS.values() if o != tok) for tok in DIALECTS.values()}


# --------------------------------------------------------------------------- images
def _plain(folder: str) -> bool:
    """A relative folder without ``.``/``..``/empty parts or backslashes: usable as a listing key as is."""
    return not folder or (not folder.startswith("/") and "\\" not in folder
                          and all(p not in ("", ".", "..") for p in folder.split("/")))


class _Listings:
    """Cached directory listings: exact-case existence without one stat per file."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cache: dict[Path, set[str] | None] = {}
        self.lower: dict[Path, dict[str, str]] = {}
        self.by_str: dict[str, set[str] | None] = {}

    def names_str(self, folder: str) -> set[str] | None:
        """Listing of ``root/folder`` for a plain relative folder string (cached by the string)."""
        if folder not in self.by_str:
            self.by_str[folder] = self.names(self.root / folder if folder else self.root)
        return self.by_str[folder]

    def names(self, folder: Path) -> set[str] | None:
        if folder not in self.cache:
            try:
                self.cache[folder] = set(os.listdir(folder))
            except OSError:
                self.cache[folder] = None
        return self.cache[folder]

    def missing(self, rel: str) -> str | None:
        """None when ``root/rel`` exists with this exact case, else the detail of what is wrong."""
        folder, _, name = rel.rpartition("/")
        if _plain(folder) and name not in ("", ".", ".."):
            names = self.names_str(folder)
            if names is not None and name in names:
                return None
        p = Path(os.path.normpath(self.root / rel))
        names = self.names(p.parent)
        if names is not None and p.name in names:
            return None
        # Explain: walk from the root, matching each component case-insensitively.
        cur, fixed = self.root, []
        for part in Path(os.path.relpath(p, self.root)).parts:
            if cur not in self.lower:
                self.lower[cur] = {e.lower(): e for e in sorted(self.names(cur) or ())}
            hit = self.lower[cur].get(part.lower())
            if hit is None:
                return f"{rel}: not found ({cur} has no {part!r})"
            fixed.append(hit)
            cur = cur / hit
        return f"{rel}: not found with this case; on disk: {'/'.join(fixed)}"


def _inspect_image(path: Path, decode: bool, min_side: int, max_aspect: float) -> tuple[list[tuple[str, str]], dict]:
    """Header (and optionally full-decode) checks of one existing file: ``(problems, info)``."""
    from icmlab.images import load_rgb  # the trainer's loader: decode exactly as training will

    try:
        if path.stat().st_size == 0:
            return [("image_unreadable", "empty file (0 bytes)")], {}
        with Image.open(path) as im:
            fmt, (w, h) = im.format, im.size
    except UnidentifiedImageError:
        return [("image_unreadable", "PIL cannot identify the content")], {}
    except (OSError, SyntaxError, ValueError) as e:
        return [("image_unreadable", f"{type(e).__name__}: {e}")], {}
    info = {"format": fmt, "width": w, "height": h}
    out = []
    if decode:
        try:
            load_rgb(path)
        except (ValueError, OSError) as e:
            return [("image_corrupt", str(e.__cause__ or e))], info
    want = IMAGE_FORMATS.get(path.suffix.lower())
    if want and fmt != want:
        out.append(("image_format_mismatch", f"{fmt} content named {path.suffix}"))
    if min(w, h) < min_side or max(w, h) > max_aspect * min(w, h):
        out.append(("image_degenerate", f"{w}x{h}"))
    return out, info


def check_images(
    root: Path, rels: list[str], *, decode: bool = True, header: bool = True, workers: int | None = None,
    min_side: int = 4, max_aspect: float = 20.0,
) -> dict[str, tuple[list[tuple[str, str]], dict]]:
    """Check image files (paths relative to ``root``): existence first, then headers/decodes in threads.

    Args:
        root: the data root (upstream ``--image_folder``).
        rels: unique relative paths.
        decode: fully decode every image with the trainer's loader (finds truncated files).
        header: read each header (format, size); False = existence only.
        workers: threads for the header/decode pass (default: 2 x CPUs, at most 16).
        min_side: smaller sides are ``image_degenerate``.
        max_aspect: larger aspect ratios are ``image_degenerate``.

    Returns:
        ``{rel: (problems, info)}``: every missing path, and with ``header`` every path (``info``
        holds format/width/height when readable).
    """
    listings = _Listings(Path(root))
    out: dict[str, tuple[list[tuple[str, str]], dict]] = {}
    by_folder: dict[str, set[str]] = {}
    for rel in rels:
        folder, _, name = rel.rpartition("/")
        by_folder.setdefault(folder, set()).add(name)
    suspects = []
    for folder, names in by_folder.items():  # one listing and one set difference per folder
        listing = listings.names_str(folder) if _plain(folder) else None
        absent = names - listing if listing is not None else names
        suspects += [f"{folder}/{n}" if folder else n for n in absent]
    for rel in suspects:  # the slow, exact path (normalisation, case hints) for the few left
        why = listings.missing(rel)
        if why is not None:
            out[rel] = ([("image_missing", why)], {})
    present = [r for r in rels if r not in out] if header else []

    def batch(items: list[str]) -> list:
        return [_inspect_image(Path(root) / r, decode, min_side, max_aspect) for r in items]

    step = 64
    if not present:
        return out
    with ThreadPoolExecutor(workers or min(16, 2 * (os.cpu_count() or 1))) as pool:
        batches = [present[i : i + step] for i in range(0, len(present), step)]
        for items, results in zip(batches, pool.map(batch, batches)):
            out.update(zip(items, results))
    return out


# --------------------------------------------------------------------------- lengths
@dataclass
class LengthSetup:
    """How the trainer tokenizes: what the length check needs.

    Attributes:
        tokenizer: the model's tokenizer (fast).
        family: ``llava15`` or ``mplug_owl2`` (dialect, tokenization rule, truncation rule).
        num_image_tokens: placeholders per image (576 LLaVA-336, 65 mPLUG-Owl2, 64 demo).
        model_max_length: the cut length.
        source: where the tokenizer and the image-token count came from (for the report).
        template: training template (``vicuna_v1`` for both families, ``--version v1``).
    """

    tokenizer: Any
    family: str
    num_image_tokens: int
    model_max_length: int
    source: str = ""
    template: str = "vicuna_v1"
    _encoder: Any = field(default=None, repr=False)

    def encoder(self) -> Any:
        """The trainer's :class:`icmlab.preprocess.PieceEncoder` (built once)."""
        if self._encoder is None:
            from icmlab.preprocess import PieceEncoder

            self._encoder = PieceEncoder(self.tokenizer, dialect=self.family, literal=(DIALECTS[self.family],))
        return self._encoder

    def __getstate__(self) -> dict:  # the encoder holds a compiled regex: rebuild it in workers
        return {**self.__dict__, "_encoder": None}


def record_length(record: dict, setup: LengthSetup) -> dict:
    """Token counts of one (schema-valid) record exactly as the trainer builds it.

    Returns:
        ``{tokens, untruncated, supervised, truncated, image_cut}``.
    """
    from icmlab.dataset import TRUNCATION
    from icmlab.preprocess import encode_conversation

    enc = encode_conversation(
        record, setup.tokenizer, template=setup.template, dialect=setup.family, image_token_id=-200,
        num_image_tokens=setup.num_image_tokens, model_max_length=setup.model_max_length,
        truncation=TRUNCATION.get(setup.family, "expanded"), encoder=setup.encoder(),
    )
    return {"tokens": enc.num_tokens, "untruncated": enc.num_tokens_untruncated, "supervised": enc.num_supervised,
            "truncated": enc.truncated, "image_cut": enc.image_truncated}


def length_bound(record: dict, num_image_tokens: int) -> int:
    """An upper bound on the token count (every token covers at least one byte, plus template overhead)."""
    text = sum(len(t["value"].encode()) for t in record["conversations"])
    return text + 32 * len(record["conversations"]) + 300 + (num_image_tokens if "image" in record else 0)


def length_setup_for(cfg: RunConfig) -> tuple[LengthSetup | None, str]:
    """Load the model's tokenizer and image-token count from local files only.

    The tokenizer comes from ``cfg.model.llm`` for LLaVA ``mix`` (Vicuna + CLIP + projector) and
    from ``cfg.model.base`` otherwise; the image-token count from the checkpoint's config
    (``image_seq_length``, the vision tower's grid, or mPLUG-Owl2's abstractor queries + 1).

    Returns:
        ``(setup, "")``, or ``(None, reason)`` when the tokenizer is not available locally.
    """
    m = cfg.model
    name = m.llm if (m.family == "llava15" and cfg.train.strategy == "mix") else m.base
    if not name:
        return None, "no tokenizer source configured (model.base / model.llm)"
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(name, revision=m.revision, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means "not available here"; the reason is reported
        return None, f"tokenizer of {name} not available locally ({type(e).__name__}: {str(e)[:160]}); run download first"
    n, how = _num_image_tokens(cfg)
    return LengthSetup(tok, m.family, n, cfg.data.model_max_length, source=f"tokenizer {name}; {n} image tokens ({how})"), ""


def _num_image_tokens(cfg: RunConfig) -> tuple[int, str]:
    m = cfg.model
    default = {"llava15": 576, "mplug_owl2": 65}[m.family]

    def config(where: str | None) -> dict:
        if not where:
            return {}
        p = Path(where) / "config.json"
        if not p.is_file():  # a hub id: its config only if it is in the local cache (never downloaded here)
            from huggingface_hub import try_to_load_from_cache

            try:
                cached = try_to_load_from_cache(where, "config.json", revision=m.revision)
            except ValueError:  # not a valid repo id
                cached = None
            p = Path(cached) if isinstance(cached, str) else p
        return orjson.loads(p.read_bytes()) if p.is_file() else {}

    c = config(m.base)
    if m.family == "mplug_owl2":
        q = (c.get("abstractor_config") or c.get("visual_abstractor") or {}).get("num_learnable_queries")
        return (q + 1, f"{m.base} abstractor queries + 1") if q else (default, "mPLUG-Owl2 default")
    if cfg.train.strategy != "mix" and c.get("image_seq_length"):
        return int(c["image_seq_length"]), f"{m.base} image_seq_length"
    vision = c.get("vision_config") if cfg.train.strategy != "mix" else None
    vision = vision or config(m.vision_tower).get("vision_config") or config(m.vision_tower)
    if vision.get("image_size") and vision.get("patch_size"):
        return (vision["image_size"] // vision["patch_size"]) ** 2, "vision tower grid"
    tower = str(c.get("mm_vision_tower") or m.vision_tower or "")
    if tower.endswith("336"):
        return 576, f"{tower}: 24x24 patches"
    return default, "LLaVA-v1.5 default (config not found)"


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
            return {"first": first, "n": 0, "json_error": ("file_encoding", bad_utf8) if bad_utf8 else
                    ("file_not_json", f"byte {offset + max(e.pos - 1, 0)}: {e.msg}")}
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
        if setup is not None and ok and (i % stride == 0 or length_bound(rec, setup.num_image_tokens) > setup.model_max_length):
            r = record_length(rec, setup)
            lengths.append((i, r["tokens"], r["untruncated"], r["supervised"], r["truncated"], r["image_cut"]))
            if r["supervised"] == 0:
                problems.append((i, "answer_cut", f"{r['untruncated']} tokens > {setup.model_max_length}; no answer token left"))
            elif r["truncated"]:
                problems.append((i, "truncated", f"{r['untruncated']} tokens cut to {setup.model_max_length}"))
            if r["image_cut"]:
                problems.append((i, "image_cut", f"the cut at {setup.model_max_length} splits the image tokens"))
    return {"first": first, "n": len(records), "problems": problems, "images": images, "turns": turns,
            "lengths": lengths, "json_error": None}


def _record_pass(path: Path, image_token: str, setup: LengthSetup | None, stride: int, workers: int,
                 dup: DuplicateIds, repeats: np.ndarray | None, id_blocks: list) -> Iterator[dict]:
    """Stream the file's blocks to the workers; yield their results in file order."""
    _init_worker(image_token, setup, stride)
    if workers <= 1:
        for block in iter_blocks(path):
            _dup_add(dup, block, repeats, id_blocks)
            yield _check_span(str(path), 0, 0, block.first, block.records())
        return
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(image_token, setup, stride)) as pool:
        pending = []
        for block in iter_blocks(path):
            _dup_add(dup, block, repeats, id_blocks)
            s, e = int(block.starts[0]), int(block.ends[-1])
            pending.append(pool.submit(_check_span, str(path), block.offset + s, e - s, block.first)
                           if block.offset is not None else pool.submit(_check_span, str(path), 0, 0, block.first,
                                                                         block.records()))
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


# --------------------------------------------------------------------------- result
@dataclass
class ValidationResult:
    """Outcome of the validate stage (the report's content in short).

    Attributes:
        input: the validated file.
        report: ``validation.json`` (counts, examples per kind, per-source statistics, settings).
        problems_file: one JSON line per record with a problem (index, id, source, problems).
        clean_file: the cleaned training JSON (``drop`` policy), else None.
        rejects_file: rejected records with their reasons (``drop`` policy), else None.
        policy: ``stop`` or ``drop``.
        num_records: records in the input.
        counts: records per problem kind (kinds not found are absent).
        records_with_errors: records with at least one error (dropped under ``drop``).
        records_with_warnings: records with warnings only.
        kept: records written to the clean file (or that would train under ``stop``).
        file_problems: file-level ``(kind, detail)``; when present no record was checked.
        per_source: per dataset: records, images, turns, errors, warnings, kinds, token lengths.
        lengths: length check status (``done``/``skipped`` + reason), tokenizer source, counts.
        images: image check mode and counts.
        seconds: wall time per phase.
    """

    input: Path
    report: Path
    problems_file: Path | None
    clean_file: Path | None
    rejects_file: Path | None
    policy: str
    num_records: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    records_with_errors: int = 0
    records_with_warnings: int = 0
    kept: int = 0
    file_problems: list = field(default_factory=list)
    per_source: dict[str, dict] = field(default_factory=dict)
    lengths: dict = field(default_factory=dict)
    images: dict = field(default_factory=dict)
    examples: dict[str, list[dict]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """No file problem and no record with an error."""
        return not self.file_problems and not self.records_with_errors

    def table(self) -> list[dict]:
        """One row per problem kind found: kind, level, severity, records, description, first example."""
        rows = []
        for kind, n in sorted(self.counts.items(), key=lambda kv: (KINDS[kv[0]].severity, -kv[1])):
            ex = (self.examples.get(kind) or [{}])[0]
            rows.append({"kind": kind, "level": KINDS[kind].level, "severity": KINDS[kind].severity, "records": n,
                         "description": KINDS[kind].description,
                         "example": f"#{ex.get('index')} {ex.get('id')!s}: {ex.get('detail')}" if ex else "",
                         "fix": KINDS[kind].fix})
        return rows

    def per_source_table(self) -> list[dict]:
        """One row per dataset: records, errors, warnings, mean turns, token p50/p95/max, kinds found."""
        rows = []
        for name, st in self.per_source.items():
            tok = st.get("tokens") or {}
            rows.append({"dataset": name, "records": st["records"], "errors": st["errors"], "warnings": st["warnings"],
                         "turns (mean)": st["turns_mean"],
                         "tokens p50/p95/max": f"{tok['p50']}/{tok['p95']}/{tok['max']}" if tok else "-",
                         "kinds": ", ".join(f"{k} {n}" for k, n in sorted(st["kinds"].items()))})
        return rows

    def summary(self) -> str:
        """Lines for the terminal, the notebook and the ``stop`` error message."""
        if self.file_problems:
            return f"{self.input}: unusable file\n" + "\n".join(f"  {k}: {d}" for k, d in self.file_problems)
        head = (f"{self.input}: {self.num_records:,} records; {self.records_with_errors:,} with errors, "
                f"{self.records_with_warnings:,} with warnings only; policy {self.policy}: {self.kept:,} kept")
        lines = [head] + [f"  {r['severity']:<7} {r['kind']:<22} {r['records']:>8,}  {r['example'][:100]}"
                          for r in self.table()]
        lines.append(f"  lengths: {self.lengths.get('status')} {self.lengths.get('reason') or self.lengths.get('source', '')}")
        lines.append(f"  images: {self.images.get('mode')} check of {self.images.get('unique', 0):,} files")
        lines.append(f"  report: {self.report}")
        return "\n".join(lines)


@dataclass
class ValidationOutputs:
    """Where validation writes (siblings of the merged file by default)."""

    report: Path
    problems: Path
    clean: Path
    rejects: Path

    @classmethod
    def for_config(cls, cfg: RunConfig) -> "ValidationOutputs":
        """The run directory's layout (:mod:`icmlab.paths`)."""
        rep = paths.validation_report(cfg)
        return cls(rep, rep.with_name("validation.problems.jsonl"), paths.clean_json(cfg), paths.rejects_jsonl(cfg))

    @classmethod
    def in_dir(cls, folder: Path) -> "ValidationOutputs":
        """Standard names under ``folder``."""
        return cls(folder / "validation.json", folder / "validation.problems.jsonl", folder / "train.clean.json",
                   folder / "rejects.jsonl")


# --------------------------------------------------------------------------- orchestration
def read_provenance(path: Path | None) -> tuple[np.ndarray, list[str], np.ndarray] | None:
    """Dataset code per record, the code names, and merge's repeat flags, from merge's sidecar."""
    if path is None or not Path(path).is_file():
        return None
    names: dict[str, int] = {}
    codes, repeats = [], []
    with open(path, "rb") as f:
        for line in f:
            row = orjson.loads(line)
            codes.append(names.setdefault(row.get("source", "?"), len(names)))
            repeats.append(row.get("copy", 0) > 0)
    return np.array(codes, np.int32), list(names), np.array(repeats, bool)


def validate_file(
    path: Path, *, data_root: Path, family: str, outputs: ValidationOutputs, policy: str = "stop",
    setup: LengthSetup | None = None, length_skip_reason: str = "", images: str = "auto",
    workers: int | None = None, length_sample: int = 2000, provenance: Path | None = None,
) -> ValidationResult:
    """Validate a LLaVA training JSON and write the report (and the cleaned file under ``drop``).

    Args:
        path: training JSON.
        data_root: folder the ``image`` paths are relative to.
        family: model family (its image-token dialect).
        outputs: where to write.
        policy: ``stop`` (report only) or ``drop`` (cleaned file + rejects).
        setup: tokenizer setup for the length check, or None (then ``length_skip_reason`` is reported).
        length_skip_reason: why there is no setup.
        images: ``exists`` (fast pass only), ``header`` (+ format/size), ``decode`` (+ full decode),
            ``auto`` (decode up to 20,000 unique images, else header).
        workers: processes for the record pass (default: CPU count, at most 8).
        length_sample: records per file measured for length statistics (every record that could
            reach ``model_max_length`` is measured anyway).
        provenance: merge's sidecar, for per-source statistics and to exempt intentional repeats.

    Returns:
        The :class:`ValidationResult`. Nothing is raised for bad data here; see :func:`run`.
    """
    t0 = time.perf_counter()
    for p in (outputs.clean, outputs.rejects, outputs.problems):  # never leave a stale product behind
        p.unlink(missing_ok=True)
    res = ValidationResult(input=path, report=outputs.report, problems_file=None, clean_file=None,
                           rejects_file=None, policy=policy)
    res.file_problems = check_file(path)
    if res.file_problems:
        return _finish(res, t0, {})
    token = DIALECTS[family]
    n_total = sum(len(b) for b in iter_blocks(path)) if setup is not None else 0  # for the sampling stride
    stride = max(1, n_total // max(1, length_sample))
    dup, id_blocks = DuplicateIds(), []
    prov = read_provenance(provenance)
    problems: dict[int, list[tuple[str, str]]] = defaultdict(list)
    image_of: list[str | None] = []  # per record: its image path when the record is otherwise valid
    turns: list[int] = []
    lengths: list[tuple] = []
    workers = workers or min(8, os.cpu_count() or 1)
    try:
        for r in _record_pass(path, token, setup, stride, workers, dup, prov[2] if prov else None, id_blocks):
            if r.get("json_error"):
                res.file_problems = [r["json_error"]]
                return _finish(res, t0, {})
            for i, k, d in r["problems"]:
                problems[i].append((k, d))
            image_of += r["images"]
            turns += r["turns"]
            lengths += r["lengths"]
    except ValueError as e:  # the scanner's whole-file fallback: HTML / invalid JSON / not a list
        msg = str(e)
        kind = "file_html" if "HTML" in msg else "file_not_list" if "not a list" in msg else "file_not_json"
        bad_utf8 = utf8_error(path) if "UTF-8" in msg else None
        res.file_problems = [("file_encoding", bad_utf8) if bad_utf8 else (kind, msg)]
        return _finish(res, t0, {})
    res.num_records = len(turns)
    t_records = time.perf_counter()
    pairs, _ = dup.confirm(with_ids=0)
    for first, loc in pairs.tolist():
        problems[loc].append(("duplicate_id", f"the id of record #{first}"))
    unique = set(image_of)
    unique.discard(None)
    mode = images if images != "auto" else ("decode" if len(unique) <= 20_000 else "header")
    checked = check_images(data_root, list(unique), decode=mode == "decode", header=mode != "exists")
    bad = {rel: found for rel, (found, _info) in checked.items() if found}
    for i in [i for i, img in enumerate(image_of) if img in bad] if bad else ():
        problems[i] += bad[image_of[i]]
    res.images = {"mode": mode, "unique": len(unique), "with_problems": len(bad), "root": str(data_root)}
    t_images = time.perf_counter()
    if prov and len(prov[0]) != res.num_records:
        log.warning("%s has %d lines for %d records: ignored", provenance, len(prov[0]), res.num_records)
        prov = None
    _summarise(res, problems, np.array(turns), lengths, prov, setup, length_skip_reason, stride)
    _write_records(res, path, outputs, problems, prov, policy, id_blocks)
    return _finish(res, t0, {"records": t_records - t0, "images": t_images - t_records})


def _summarise(res: ValidationResult, problems: dict, turns: np.ndarray, lengths: list, prov, setup,
               skip_reason: str, stride: int) -> None:
    n = res.num_records
    codes, names = (prov[0], prov[1]) if prov else (np.zeros(n, np.int32), ["train"])
    err = np.zeros(n, bool)
    warn = np.zeros(n, bool)
    per_kind: Counter = Counter()
    kinds_by_src: dict[int, Counter] = defaultdict(Counter)
    for i, found in problems.items():
        kinds = {k for k, _ in found}
        per_kind.update(kinds)
        kinds_by_src[int(codes[i])].update(kinds)
        err[i] = any(KINDS[k].severity == "error" for k in kinds)
        warn[i] = not err[i]
    res.counts = dict(per_kind)
    res.records_with_errors, res.records_with_warnings = int(err.sum()), int(warn.sum())
    res.kept = n - res.records_with_errors if res.policy == "drop" else n
    lens = np.array(lengths, dtype=np.int64).reshape(-1, 6)
    sampled = lens[lens[:, 0] % stride == 0] if len(lens) else lens
    for c, name in enumerate(names):
        mine = codes == c
        tok = sampled[codes[sampled[:, 0]] == c, 2] if len(sampled) else np.array([])
        res.per_source[name] = {
            "records": int(mine.sum()), "errors": int((err & mine).sum()), "warnings": int((warn & mine).sum()),
            "turns_mean": round(float(turns[mine].mean()), 2) if mine.any() else 0.0,
            "kinds": dict(kinds_by_src.get(c, {})),
            "tokens": _token_stats(tok, setup),
        }
    if setup is None:
        res.lengths = {"status": "skipped", "reason": skip_reason or "no tokenizer"}
    else:
        res.lengths = {"status": "done", "source": setup.source, "model_max_length": setup.model_max_length,
                       "num_image_tokens": setup.num_image_tokens, "measured": int(len(lens)),
                       "sampled_every": stride, "truncated": per_kind.get("truncated", 0),
                       "answer_cut": per_kind.get("answer_cut", 0)}


def _token_stats(tok: np.ndarray, setup: LengthSetup | None) -> dict:
    if setup is None or not len(tok):
        return {}
    return {"sampled": int(len(tok)), "mean": round(float(tok.mean()), 1), "p50": int(np.percentile(tok, 50)),
            "p95": int(np.percentile(tok, 95)), "max": int(tok.max()),
            "over_max_length": int((tok > setup.model_max_length).sum())}


class _IdsOnly(NamedTuple):
    """A block as kept by the first pass: where it starts and its records' id keys."""

    first: int
    id_keys: np.ndarray
    id_offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.id_offsets) - 1


def _write_records(res: ValidationResult, path: Path, out: ValidationOutputs, problems: dict, prov,
                   policy: str, blocks: list) -> None:
    """One pass over the file: problems JSONL, examples, and under ``drop`` the clean file + rejects.

    Ids come from the byte scanner; only rejected records are parsed (the rejects file holds them).
    Kept records are copied as bytes, in runs.
    """
    source = (lambda i: prov[1][prov[0][i]]) if prov else (lambda i: "train")
    wanted = np.array(sorted(problems), np.int64)
    drop = policy == "drop"
    if not drop and not wanted.size:
        return
    rows, rejects = [], []
    with contextlib.ExitStack() as stack:
        fo = open(stack.enter_context(atomic_path(out.clean)), "wb") if drop else None
        if fo:
            stack.enter_context(fo)
            fo.write(b"[")
        written = False
        # Only the drop policy needs the records again; otherwise the ids kept by the first pass do.
        for block in iter_blocks(path) if drop else (_IdsOnly(*b) for b in blocks):
            lo = block.first
            here = wanted[(wanted >= lo) & (wanted < lo + len(block))]
            kept = np.ones(len(block), bool)
            for i in here.tolist():
                j = i - lo
                key = block.id_keys[block.id_offsets[j] : block.id_offsets[j + 1]].tobytes()
                rid = id_value(key) if key else None
                found = problems[i]
                row = {"index": i, "id": rid, "source": source(i), "problems": [list(p) for p in found]}
                rows.append(row)
                for k, d in found:
                    ex = res.examples.setdefault(k, [])
                    if len(ex) < MAX_EXAMPLES and (not ex or ex[-1]["index"] != i):
                        ex.append({"index": i, "id": rid, "source": source(i), "detail": d})
                errors = [f"{k}: {d}" for k, d in found if KINDS[k].severity == "error"]
                if drop and errors:
                    rejects.append({**row, "reasons": errors, "record": orjson.loads(block.record(j))})
                    kept[j] = False
            if fo is not None and kept.any():
                edges = np.diff(np.concatenate(([0], kept.astype(np.int8), [0])))
                runs = zip(np.flatnonzero(edges == 1).tolist(), (np.flatnonzero(edges == -1) - 1).tolist())
                text = b",\n".join(block.buf[block.starts[a] : block.ends[b]] for a, b in runs)
                fo.write((b",\n" if written else b"\n") + text)
                written = True
        if fo:
            fo.write(b"\n]\n")
    if rows:
        write_jsonl(out.problems, rows)
        res.problems_file = out.problems
    if drop:
        write_jsonl(out.rejects, rejects)
        res.clean_file, res.rejects_file = out.clean, out.rejects


def _finish(res: ValidationResult, t0: float, seconds: dict) -> ValidationResult:
    res.seconds = {**{k: round(v, 2) for k, v in seconds.items()}, "total": round(time.perf_counter() - t0, 2)}
    if res.file_problems:
        res.counts = {k: 1 for k, _ in res.file_problems}
    report = {
        "input": str(res.input), "policy": res.policy, "ok": res.ok, "num_records": res.num_records,
        "records_with_errors": res.records_with_errors, "records_with_warnings": res.records_with_warnings,
        "kept": res.kept, "file_problems": res.file_problems,
        "problems": {k: {**KINDS[k]._asdict(), "count": n, "examples": res.examples.get(k, [])}
                     for k, n in sorted(res.counts.items())},
        "per_source": res.per_source, "lengths": res.lengths, "images": res.images, "seconds": res.seconds,
        "outputs": {k: str(v) if v else None for k, v in (("problems", res.problems_file), ("clean", res.clean_file),
                                                          ("rejects", res.rejects_file))},
    }
    atomic_write_json(res.report, report)
    return res


def run(cfg: RunConfig, *, images: str = "auto", workers: int | None = None, length_sample: int = 2000
        ) -> ValidationResult:
    """Validate stage entry point: check ``paths.merged_json(cfg)`` and apply ``cfg.data.invalid_records``.

    Args:
        cfg: the run config.
        images: image check depth (see :func:`validate_file`).
        workers: processes for the record pass.
        length_sample: records measured for the length statistics.

    Returns:
        The :class:`ValidationResult` (the report is written in every case).

    Raises:
        DataValidationError: the file is unusable, or (``stop`` policy) records have errors; the
            message is the report summary. Under ``drop`` only an unusable file raises.
    """
    setup, reason = length_setup_for(cfg)
    if setup is None:
        log.warning("length check skipped: %s", reason)
    res = validate_file(
        paths.merged_json(cfg), data_root=cfg.data.root, family=cfg.model.family,
        outputs=ValidationOutputs.for_config(cfg), policy=cfg.data.invalid_records, setup=setup,
        length_skip_reason=reason, images=images, workers=workers, length_sample=length_sample,
        provenance=paths.provenance_jsonl(cfg),
    )
    log.info("%s", res.summary())
    if res.file_problems or (cfg.data.invalid_records == "stop" and res.records_with_errors):
        raise DataValidationError(res.summary() + "\n(set data.invalid_records: drop to train without these records)"
                                  if not res.file_problems else res.summary())
    return res
