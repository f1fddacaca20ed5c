"""Validate stage: a preflight report on the merged training file, before any GPU time is spent.

Upstream finds a bad dataset hours into a run (a missing OCR-VQA image, ``<image>`` left
unconverted for mPLUG-Owl2, answers pushed past ``model_max_length`` by 576 image tokens). This
stage finds all of it first and reports, for every problem kind (:data:`icmlab.validate.records.KINDS`),
a count and examples:

- file: missing, an HTML page, not UTF-8 / not JSON (with the byte offset), not a list;
- records (:func:`icmlab.validate.records.check_record`, pure): id, conversations, roles, empty values,
  image-token count, wrong dialect, duplicate ids (merge's intentional repeats excepted);
- images (:func:`icmlab.validate.images.check_images`): missing with exact case (cached
  directory listings), unreadable, truncated/corrupt (every image decoded, in worker processes;
  ``data.image_check: header`` reads headers only), content format different from the extension,
  degenerate sizes;
- lengths (:func:`icmlab.inputs.lengths.record_length`): the model's tokenizer and template through
  :func:`icmlab.inputs.encode.encode_conversation`, the function the trainer uses, image tokens
  counted: samples cut at ``model_max_length`` and samples whose answer tokens are all cut.

Records are parsed and checked in worker processes (:func:`icmlab.validate.records.record_pass`), one
span of the file each (found by the byte scanner of :mod:`icmlab.inputs.jsonscan`), so only compact
results are held in memory. This module orchestrates the checks, writes the report and holds the
stage's result.

Policies (``cfg.data.invalid_records``): ``stop`` writes the report and raises
:class:`DataValidationError` when a record has an error; ``drop`` writes ``train.clean.json``
without those records and ``rejects.jsonl`` with the reasons of each. Warnings never drop a record.

Usage::

    from icmlab.validate.stage import run
    result = run(cfg)                 # notebook 03_validate / ``icmlab validate parameters/X.yaml``
    print(result.summary())
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import orjson
from tqdm.auto import tqdm

from icmlab import paths
from icmlab.config import RunConfig
from icmlab.inputs.jsonscan import DuplicateIds, id_value, iter_blocks
from icmlab.inputs.lengths import LengthSetup, length_setup_for
from icmlab.io import atomic_path, atomic_write_json, inputs_stamp_path, write_inputs_stamp, write_jsonl
from icmlab.merge.provenance import read_provenance
from icmlab.models.spec import DIALECTS
from icmlab.rundir import run_dir_lock
from icmlab.validate.images import check_images
from icmlab.validate.records import KINDS, check_file, record_pass, utf8_error

log = logging.getLogger("icmlab.validate.stage")

MAX_EXAMPLES = 10
#: Image check depth: ``data.image_check`` (and the ``images`` argument) -> what is done.
IMAGE_CHECKS = {"full": "decode", "decode": "decode", "header": "header", "exists": "exists"}


class DataValidationError(ValueError):
    """Validation found errors under the ``stop`` policy; the message is the report summary."""


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
            rows.append(
                {
                    "kind": kind,
                    "level": KINDS[kind].level,
                    "severity": KINDS[kind].severity,
                    "records": n,
                    "description": KINDS[kind].description,
                    "example": f"#{ex.get('index')} {ex.get('id')!s}: {ex.get('detail')}" if ex else "",
                    "fix": KINDS[kind].fix,
                }
            )
        return rows

    def per_source_table(self) -> list[dict]:
        """One row per dataset: records, errors, warnings, mean turns, token p50/p95/max, kinds found."""
        rows = []
        for name, st in self.per_source.items():
            tok = st.get("tokens") or {}
            rows.append(
                {
                    "dataset": name,
                    "records": st["records"],
                    "errors": st["errors"],
                    "warnings": st["warnings"],
                    "turns (mean)": st["turns_mean"],
                    "tokens p50/p95/max": f"{tok['p50']}/{tok['p95']}/{tok['max']}" if tok else "-",
                    "kinds": ", ".join(f"{k} {n}" for k, n in sorted(st["kinds"].items())),
                }
            )
        return rows

    def summary(self) -> str:
        """Lines for the terminal, the notebook and the ``stop`` error message."""
        if self.file_problems:
            return f"{self.input}: unusable file\n" + "\n".join(f"  {k}: {d}" for k, d in self.file_problems)
        head = (
            f"{self.input}: {self.num_records:,} records; {self.records_with_errors:,} with errors, "
            f"{self.records_with_warnings:,} with warnings only; policy {self.policy}: {self.kept:,} kept"
        )
        lines = [head] + [
            f"  {r['severity']:<7} {r['kind']:<22} {r['records']:>8,}  {r['example'][:100]}" for r in self.table()
        ]
        lines.append(
            f"  lengths: {self.lengths.get('status')} {self.lengths.get('reason') or self.lengths.get('source', '')}"
        )
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
        return cls(
            folder / "validation.json",
            folder / "validation.problems.jsonl",
            folder / "train.clean.json",
            folder / "rejects.jsonl",
        )


# --------------------------------------------------------------------------- orchestration
def validate_file(
    path: Path,
    *,
    data_root: Path,
    family: str,
    outputs: ValidationOutputs,
    policy: str = "stop",
    setup: LengthSetup | None = None,
    length_skip_reason: str = "",
    images: str = "decode",
    workers: int | None = None,
    length_sample: int = 2000,
    provenance: Path | None = None,
    image_workers: int | None = None,
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
        images: ``decode`` (every image fully decoded, across the cores), ``header`` (format and
            size only, the fast explicit option: truncated files pass) or ``exists``.
        workers: processes for the record pass (default: CPU count, at most 8).
        image_workers: processes decoding images (default: the usable CPUs).
        length_sample: records per file measured for length statistics (every record that could
            reach ``model_max_length`` is measured anyway).
        provenance: merge's sidecar, for per-source statistics and to exempt intentional repeats.

    Returns:
        The :class:`ValidationResult`. Nothing is raised for bad data here; see :func:`run`.
    """
    t0 = time.perf_counter()
    for p in (outputs.clean, inputs_stamp_path(outputs.clean), outputs.rejects, outputs.problems):
        p.unlink(missing_ok=True)  # never leave a stale product behind
    res = ValidationResult(
        input=path, report=outputs.report, problems_file=None, clean_file=None, rejects_file=None, policy=policy
    )
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
        with tqdm(total=n_total or None, desc="validate records", unit="rec", leave=False) as bar:
            for r in record_pass(path, token, setup, stride, workers, dup, prov[2] if prov else None, id_blocks):
                if r.get("json_error"):
                    res.file_problems = [r["json_error"]]
                    return _finish(res, t0, {})
                for i, k, d in r["problems"]:
                    problems[i].append((k, d))
                image_of += r["images"]
                turns += r["turns"]
                lengths += r["lengths"]
                bar.update(len(r["turns"]))
    except ValueError as e:  # the scanner's whole-file fallback: HTML / invalid JSON / not a list
        msg = str(e)
        kind = "file_html" if "HTML" in msg else "file_not_list" if "not a list" in msg else "file_not_json"
        bad_utf8 = utf8_error(path) if "UTF-8" in msg else None
        res.file_problems = [("file_encoding", bad_utf8) if bad_utf8 else (kind, msg)]
        return _finish(res, t0, {})
    res.num_records = len(turns)
    if not res.num_records:
        res.file_problems = [("file_empty", f"{path}: an empty list; re-run merge on sources that hold records")]
        return _finish(res, t0, {})
    t_records = time.perf_counter()
    pairs, _ = dup.confirm(with_ids=0)
    for first, loc in pairs.tolist():
        problems[loc].append(("duplicate_id", f"the id of record #{first}"))
    unique = set(image_of)
    unique.discard(None)
    if images not in IMAGE_CHECKS:
        raise ValueError(f"unknown image check {images!r}; choose one of {sorted(IMAGE_CHECKS)}")
    mode = IMAGE_CHECKS[images]
    checked = check_images(
        data_root, sorted(unique), decode=mode == "decode", header=mode != "exists", workers=image_workers
    )
    bad = {rel: found for rel, (found, _info) in checked.items() if found}
    for i in [i for i, img in enumerate(image_of) if img in bad] if bad else ():
        problems[i] += bad[image_of[i]]
    t_images = time.perf_counter()
    res.images = {
        "mode": mode,
        "unique": len(unique),
        "with_problems": len(bad),
        "root": str(data_root),
        "per_second": round(len(unique) / max(t_images - t_records, 1e-9), 1),
    }
    if prov and len(prov[0]) != res.num_records:
        log.warning("%s has %d lines for %d records: ignored", provenance, len(prov[0]), res.num_records)
        prov = None
    _summarise(res, problems, np.array(turns), lengths, prov, setup, length_skip_reason, stride)
    _write_records(res, path, outputs, problems, prov, policy, id_blocks)
    return _finish(res, t0, {"records": t_records - t0, "images": t_images - t_records})


def _summarise(
    res: ValidationResult, problems: dict, turns: np.ndarray, lengths: list, prov, setup, skip_reason: str, stride: int
) -> None:
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
            "records": int(mine.sum()),
            "errors": int((err & mine).sum()),
            "warnings": int((warn & mine).sum()),
            "turns_mean": round(float(turns[mine].mean()), 2) if mine.any() else 0.0,
            "kinds": dict(kinds_by_src.get(c, {})),
            "tokens": _token_stats(tok, setup),
        }
    if setup is None:
        res.lengths = {"status": "skipped", "reason": skip_reason or "no tokenizer"}
    else:
        res.lengths = {
            "status": "done",
            "source": setup.source,
            "model_max_length": setup.model_max_length,
            "num_image_tokens": setup.num_image_tokens,
            "measured": int(len(lens)),
            "sampled_every": stride,
            "truncated": per_kind.get("truncated", 0),
            "answer_cut": per_kind.get("answer_cut", 0),
        }


def _token_stats(tok: np.ndarray, setup: LengthSetup | None) -> dict:
    if setup is None or not len(tok):
        return {}
    return {
        "sampled": int(len(tok)),
        "mean": round(float(tok.mean()), 1),
        "p50": int(np.percentile(tok, 50)),
        "p95": int(np.percentile(tok, 95)),
        "max": int(tok.max()),
        "over_max_length": int((tok > setup.model_max_length).sum()),
    }


class _IdsOnly(NamedTuple):
    """A block as kept by the first pass: where it starts and its records' id keys."""

    first: int
    id_keys: np.ndarray
    id_offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.id_offsets) - 1


def _write_records(
    res: ValidationResult, path: Path, out: ValidationOutputs, problems: dict, prov, policy: str, blocks: list
) -> None:
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
        write_inputs_stamp(out.clean, [path])  # train reads the clean file only while it matches its input


def _finish(res: ValidationResult, t0: float, seconds: dict) -> ValidationResult:
    res.seconds = {**{k: round(v, 2) for k, v in seconds.items()}, "total": round(time.perf_counter() - t0, 2)}
    if res.file_problems:
        res.counts = {k: 1 for k, _ in res.file_problems}
    report = {
        "input": str(res.input),
        "policy": res.policy,
        "ok": res.ok,
        "num_records": res.num_records,
        "records_with_errors": res.records_with_errors,
        "records_with_warnings": res.records_with_warnings,
        "kept": res.kept,
        "file_problems": res.file_problems,
        "problems": {
            k: {**KINDS[k]._asdict(), "count": n, "examples": res.examples.get(k, [])}
            for k, n in sorted(res.counts.items())
        },
        "per_source": res.per_source,
        "lengths": res.lengths,
        "images": res.images,
        "seconds": res.seconds,
        "outputs": {
            k: str(v) if v else None
            for k, v in (("problems", res.problems_file), ("clean", res.clean_file), ("rejects", res.rejects_file))
        },
    }
    atomic_write_json(res.report, report)
    if Path(res.input).is_file():  # readers of the report (inspect) can tell it belongs to this train.json
        write_inputs_stamp(res.report, [Path(res.input)])
    return res


def run(
    cfg: RunConfig, *, images: str | None = None, workers: int | None = None, length_sample: int = 2000
) -> ValidationResult:
    """Validate stage entry point: check ``paths.merged_json(cfg)`` and apply ``cfg.data.invalid_records``.

    Args:
        cfg: the run config.
        images: image check depth (see :func:`validate_file`); default ``cfg.data.image_check``.
        workers: processes for the record pass.
        length_sample: records measured for the length statistics.

    Returns:
        The :class:`ValidationResult` (the report is written in every case).

    Raises:
        DataValidationError: the file is unusable, or (``stop`` policy) records have errors; the
            message is the report summary. Under ``drop`` only an unusable file raises.
    """
    with run_dir_lock(cfg, "validate"):
        return _run(cfg, images, workers, length_sample)


def _run(cfg: RunConfig, images: str, workers: int | None, length_sample: int) -> ValidationResult:
    setup, reason = length_setup_for(cfg)
    if setup is None:
        log.warning("length check skipped: %s", reason)
    res = validate_file(
        paths.merged_json(cfg),
        data_root=cfg.data.root,
        family=cfg.model.family,
        outputs=ValidationOutputs.for_config(cfg),
        policy=cfg.data.invalid_records,
        setup=setup,
        length_skip_reason=reason,
        images=images or cfg.data.image_check,
        workers=workers,
        length_sample=length_sample,
        provenance=paths.provenance_jsonl(cfg),
    )
    log.info("%s", res.summary())
    if not res.file_problems and res.clean_file and not res.kept:
        raise DataValidationError(
            res.summary()
            + f"\nevery record was dropped: nothing left to train on; fix the records ({res.rejects_file})"
        )
    if res.file_problems or (cfg.data.invalid_records == "stop" and res.records_with_errors):
        raise DataValidationError(
            res.summary() + "\n(set data.invalid_records: drop to train without these records)"
            if not res.file_problems
            else res.summary()
        )
    return res
