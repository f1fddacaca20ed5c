"""Tests of the parallel byte scanner (icmlab.inputs.jsonscan + icmlab.inputs.jsonscan_parallel) against a json.loads reference.

The scan cuts the file into fixed chunks scanned on threads; a chunk boundary may fall anywhere:
inside a string, between a run of backslashes and the quote it escapes, inside a multi-byte
character. These tests move every tricky byte onto a chunk boundary and check the records, their
ids and the block grouping (which merge's byte-identical output depends on).
"""

from __future__ import annotations

import itertools
import json
import random
import threading

import numpy as np
import orjson
import pytest

from icmlab.inputs.jsonscan import (
    DuplicateIds,
    _equal_keys,
    _hash_keys,
    id_hash,
    id_key,
    iter_blocks,
    iter_record_chunks,
)
from icmlab.inputs.jsonscan_parallel import chunk_events
from icmlab.merge.provenance import ProvenanceLines
from icmlab.merge.stage import MergeSource, convert_dialect, merge_files

# Strings that end in backslash runs, hold escaped quotes, braces, "id" look-alikes and multi-byte characters.
TRICKY_VALUES = [
    "\\",
    "\\\\",
    'a\\"b',
    '\\"',
    "}{",
    '{"id": "x"}',
    '"id"',
    "é中😀",
    "|image|",
    "<|image|>",
    '\\\\\\"}',
    "",
    '"',
    "]},{",
]


def tricky_records(n: int, seed: int = 0) -> list[dict]:
    """Records with tricky strings everywhere, nested objects with their own "id", ids of several types."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        value = "".join(rng.choice(TRICKY_VALUES) for _ in range(rng.randint(0, 4)))
        rid = rng.choice([f"r{i}", f'r{i}\\"q', i, float(i) + 0.5, None, True, "é" * (i % 3), ""])
        rec = {"conversations": [{"from": "human", "value": value}, {"id": "inner", "value": {"id": 3}}]}
        if rng.random() < 0.3:
            rec["meta"] = {"id": value, "deep": [{"id": i}]}
        if rng.random() < 0.9:
            rec["id"] = rid
        keys = list(rec)
        rng.shuffle(keys)  # the id is sometimes after the nested objects
        out.append({k: rec[k] for k in keys})
    return out


def reference(path) -> tuple[list, list[bytes]]:
    """Records and id keys according to the standard library parser."""
    data = json.loads(path.read_bytes())
    return data, [id_key(r.get("id")) if isinstance(r, dict) else b"" for r in data]


def scanned(path, chunk: int, workers: int) -> tuple[list, list[bytes], list]:
    blocks = list(iter_blocks(path, chunk, workers=workers))
    records = [json.loads(b.record(i)) for b in blocks for i in range(len(b))]
    keys = [b.id_keys[b.id_offsets[j] : b.id_offsets[j + 1]].tobytes() for b in blocks for j in range(len(b))]
    return records, keys, blocks


# --------------------------------------------------------------------------- exactness at chunk boundaries
@pytest.mark.parametrize("indent", [False, True])
def test_every_byte_on_a_chunk_boundary(tmp_path, indent):
    """Shift the document by 0..k-1 bytes for several chunk sizes k: every byte meets a boundary."""
    recs = tricky_records(12)
    text = orjson.dumps(recs, option=orjson.OPT_INDENT_2 if indent else 0)
    for chunk in (3, 7, 8, 13):
        for shift in range(chunk):
            f = tmp_path / f"t{chunk}_{shift}.json"
            f.write_bytes(b" " * shift + text)
            records, keys, _ = scanned(f, chunk, workers=2)
            want, want_keys = reference(f)
            assert records == want, (chunk, shift)
            assert keys == want_keys, (chunk, shift)


@pytest.mark.parametrize("run", range(1, 7))
def test_backslash_run_split_before_its_quote(tmp_path, run):
    """A run of backslashes cut from the quote it may escape by a chunk boundary, at every split point."""
    value = "x" + "\\" * run + ('"' if run % 2 else "") + "}{"
    text = json.dumps([{"id": "a", "v": value}, {"v": value, "id": value}, {"id": 7}]).encode()
    quote = text.index(b"\\" * run) + run  # the byte after the run
    for cut in range(quote - run - 1, quote + 2):
        for chunk in (max(1, cut), cut + 1):
            f = tmp_path / "b.json"
            f.write_bytes(text)
            records, keys, _ = scanned(f, chunk, workers=3)
            want, want_keys = reference(f)
            assert (records, keys) == (want, want_keys), (cut, chunk)


def test_chunk_events_parity_is_relative_to_the_chunk():
    """Inside a string the braces are flagged odd relative to a chunk that starts in it."""
    a = np.frombuffer(b'[{"a": "x{y}z"}, {"b": 1}]', np.uint8)
    start = 9  # inside the string "x{y}z", just before "{"
    ev = chunk_events(a, start, len(a))
    # Starting inside the string: its closing quote comes first, so the two string braces have
    # even parity (inside) and the record braces after it odd parity (outside).
    assert a[ev.braces].tobytes() == b"{}}{}"
    assert ev.odd.tolist() == [False, False, True, True, True]
    assert ev.q.tolist() == [i for i in range(start, len(a)) if a[i] == ord('"')]


@pytest.mark.parametrize("workers, chunk", [(2, 1), (0, 5), (1, 5), (3, 5), (2, 64), (0, 1 << 20), (2, 1 << 20)])
def test_scan_matches_json_reference(tmp_path, workers, chunk):
    recs = tricky_records(40, seed=chunk + workers)
    for indent in (False, True):
        f = tmp_path / f"r{indent}.json"
        f.write_bytes(orjson.dumps(recs, option=orjson.OPT_INDENT_2 if indent else 0))
        records, keys, blocks = scanned(f, chunk, workers)
        want, want_keys = reference(f)
        assert records == want and keys == want_keys
        hashes = np.concatenate([b.id_hash for b in blocks]).tolist()
        assert hashes == [id_hash(r.get("id")) for r in want]
        text = f.read_bytes()
        pipes = np.concatenate([b.pipes for b in blocks]).tolist()
        assert pipes == [i for i in range(len(text)) if text[i] == ord("|")]


def test_random_documents_against_reference(tmp_path):
    """Random layouts: whitespace between every token, duplicate-free keys, non-object elements, unicode escapes."""
    rng = random.Random(5)
    for case in range(40):
        recs = tricky_records(rng.randint(0, 15), seed=case)
        ws = [" ", "\n", "\t", "\r\n  ", ""]
        text = json.dumps(
            recs,
            ensure_ascii=rng.random() < 0.5,
            indent=rng.choice([None, 1, 4]),
            separators=(rng.choice([",", ", ", " ,\n"]), rng.choice([":", ": ", " : "])),
        )
        if rng.random() < 0.2 and recs:  # a non-object element: valid JSON the scan hands to the full parse
            text = text[:-1].rstrip() + ', 5, "}{"]'
        text = rng.choice(ws) + text + rng.choice(ws)
        f = tmp_path / "r.json"
        f.write_text(text, encoding="utf-8")
        chunk = rng.choice([3, 9, 33, 200])
        got = [r for c in iter_record_chunks(f, chunk) for r in c]
        assert got == json.loads(text), case
        n = sum(len(b) for b in iter_blocks(f, chunk, workers=rng.choice([0, 2])))
        assert n == len(json.loads(text))


def test_workers_do_not_change_blocks(tmp_path):
    f = tmp_path / "w.json"
    f.write_bytes(orjson.dumps(tricky_records(300), option=orjson.OPT_INDENT_2))
    runs = []
    for workers in (0, 1, 4):
        runs.append(
            [
                (b.first, b.starts.tolist(), b.ends.tolist(), b.id_keys.tobytes(), b.id_hash.tolist())
                for b in iter_blocks(f, 512, workers=workers)
            ]
        )
    assert runs[0] == runs[1] == runs[2]


def test_blocks_group_records_by_the_chunk_of_their_closing_brace(tmp_path):
    """Block k = records whose "}" lies in chunk k+1 (chunks 0 and 1 together): merge's runs depend on it."""
    f = tmp_path / "g.json"
    f.write_bytes(orjson.dumps(tricky_records(200), option=orjson.OPT_INDENT_2))
    for chunk in (50, 300, 1000):
        blocks = list(iter_blocks(f, chunk, workers=2))
        ends = np.concatenate([b.ends for b in blocks])
        group = np.maximum(0, (ends - 1) // chunk - 1)
        expected = [len(list(g)) for _, g in itertools.groupby(group.tolist())]
        assert [len(b) for b in blocks] == expected
        assert [b.first for b in blocks] == np.cumsum([0] + expected[:-1]).tolist()


# --------------------------------------------------------------------------- broken files and fallback
@pytest.mark.parametrize(
    "content",
    [
        b'[{"id": "a", "v": "never closed}]',  # unterminated string
        b'[{"id": "a"}, {"id": "b"',  # truncated record
        b'[{"id": "a"}}, {"id": "b"}]',  # a stray closing brace
        b'[{"id": "a"} {"id": "b"}]',  # missing comma
        b'[{"id": "a"},, {"id": "b"}]',  # two commas
        b'[{"id": "a"}] {"id": "b"}',  # content after the array
        b'[{"id": "a\\"}, {"id": "b"}]',  # an escaped quote leaves the string open
    ],
)
@pytest.mark.parametrize("chunk", [3, 16, 4096])
def test_broken_files_name_file_and_offset(tmp_path, content, chunk):
    f = tmp_path / "broken.json"
    f.write_bytes(content)
    with pytest.raises(ValueError, match=r"broken\.json: not valid JSON at byte \d+") as err:
        list(iter_blocks(f, chunk, workers=2))
    assert str(err.value).startswith(str(f))


def test_valid_non_object_elements_fall_back_after_the_blocks_before(tmp_path):
    recs = [{"id": f"a{i}", "t": "x" * 30} for i in range(30)]
    data = recs[:20] + [5, "}{", None] + recs[20:]
    f = tmp_path / "mixed.json"
    f.write_bytes(orjson.dumps(data))
    blocks = list(iter_blocks(f, 64, workers=2))
    assert [r for b in blocks for r in b.records()] == data
    assert any(b.offset is None for b in blocks) and blocks[0].offset == 0  # scanned first, then parsed


def test_empty_and_whitespace_files(tmp_path):
    (tmp_path / "e.json").write_bytes(b"")
    with pytest.raises(ValueError, match="e.json: not valid JSON at byte 0"):
        list(iter_blocks(tmp_path / "e.json"))
    (tmp_path / "s.json").write_bytes(b" \n [ \n ] \n")
    assert list(iter_blocks(tmp_path / "s.json", 2, workers=2)) == []


def test_abandoned_scan_leaves_no_thread(tmp_path):
    f = tmp_path / "big.json"
    f.write_bytes(orjson.dumps(tricky_records(500)))
    it = iter_blocks(f, 256, workers=3)
    next(it)
    it.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("jsonscan")]


# --------------------------------------------------------------------------- ids: hashing and exact comparison
def reference_hash(key: bytes) -> int:
    """The documented id hash, with Python integers."""
    p, mask = 0x100000001B3, (1 << 64) - 1
    s = sum((b + 1) * pow(p, j, 1 << 64) for j, b in enumerate(key)) & mask
    return ((s ^ (len(key) * 0x9E3779B97F4A7C15)) & mask | 1) if key else 0


def packed(keys: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    return np.frombuffer(b"".join(keys), np.uint8), np.concatenate(([0], np.cumsum([len(k) for k in keys])))


def test_hash_matches_its_definition():
    keys = [b"", b"a", b"id17", "é中".encode(), b"x" * 5000, bytes(range(256))]
    assert _hash_keys(*packed(keys)).tolist() == [reference_hash(k) for k in keys]
    assert id_hash("id17") == reference_hash(b"id17") and id_hash(None) == id_hash("") == 0


def test_hash_of_ids_longer_than_the_power_tables(monkeypatch):
    """More id bytes than the power tables hold: hashed a few keys at a time, a huge id window by window."""
    import icmlab.inputs.jsonscan as js

    monkeypatch.setattr(js, "_MAX_POWERS", 1 << 12)
    monkeypatch.setattr(js, "_powers", (np.ones(1, np.uint64), np.ones(1, np.uint64)))
    rng = np.random.default_rng(1)
    keys = [bytes(rng.integers(0, 256, n, dtype=np.uint8)) for n in (0, 3, 4095, 4096, 9000, 50, 20000, 7)]
    assert _hash_keys(*packed(keys)).tolist() == [reference_hash(k) for k in keys]


def test_equal_keys_short_and_long():
    rng = np.random.default_rng(0)
    words = [bytes(rng.integers(97, 99, n, dtype=np.uint8)) for n in rng.integers(0, 40, 300)]
    flat = np.frombuffer(b"".join(words), np.uint8)
    off = np.concatenate(([0], np.cumsum([len(w) for w in words])))
    i, j = rng.integers(0, 300, 3000), rng.integers(0, 300, 3000)
    same_len = np.array([len(words[x]) == len(words[y]) for x, y in zip(i, j)])
    i, j = i[same_len], j[same_len]
    got = _equal_keys(flat, off[i], off[j], np.array([len(words[x]) for x in i]))
    assert got.tolist() == [words[x] == words[y] for x, y in zip(i, j)]
    assert got.any() and not got.all()


def test_duplicates_across_many_blocks(tmp_path):
    ids = [f"id{i % 37}" if i % 5 else f"long-identifier-beyond-sixteen-bytes-{i % 11}" for i in range(400)]
    f = tmp_path / "d.json"
    f.write_bytes(orjson.dumps([{"id": x} for x in ids], option=orjson.OPT_INDENT_2))
    dup = DuplicateIds()
    for b in iter_blocks(f, 128, workers=2):
        dup.add(b, np.arange(len(b)), b.first + np.arange(len(b)))
    pairs, _ = dup.confirm()
    first: dict[str, int] = {}
    want = [(first.setdefault(x, i), i) for i, x in enumerate(ids) if first.setdefault(x, i) != i]
    assert pairs.tolist() == [list(p) for p in want]


# --------------------------------------------------------------------------- merge output
def test_merge_equals_json_reference_and_keeps_block_runs(tmp_path):
    """Merged records equal json.loads(a) + json.loads(b); records inside a block keep their bytes."""
    a_recs, b_recs = tricky_records(120, seed=1), tricky_records(90, seed=2)
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_bytes(orjson.dumps(a_recs, option=orjson.OPT_INDENT_2))
    b.write_text(json.dumps(b_recs, separators=(" ,", ":")), encoding="utf-8")
    out, prov = tmp_path / "o" / "train.json", tmp_path / "o" / "prov.jsonl"
    res = merge_files([MergeSource("a", a), MergeSource("b", b)], out, prov, image_token="<image>", chunk_bytes=300)
    merged = json.loads(out.read_bytes())
    want = [convert_dialect(r, "<image>")[0] for src in (a, b) for r in json.loads(src.read_bytes())]
    assert merged == want and res.num_records == len(want) and res.tokens_converted > 0
    # Expected bytes: "[\n", each block's records as one verbatim run (a converted record is
    # re-serialised on its own and splits the run), ",\n" between runs, "\n]\n" at the end.
    pieces = []
    for src in (a, b):
        text = src.read_bytes()
        for blk in iter_blocks(src, 300):
            run: list[int] = []
            for i in range(len(blk)):
                converted, k = convert_dialect(json.loads(blk.record(i)), "<image>")
                if k:
                    pieces += [text[run[0] : run[1]]] if run else []
                    pieces.append(orjson.dumps(converted))
                    run = []
                else:
                    run = [run[0] if run else int(blk.starts[i]), int(blk.ends[i])]
            pieces += [text[run[0] : run[1]]] if run else []
    assert out.read_bytes() == b"[\n" + b",\n".join(pieces) + b"\n]\n"
    lines = prov.read_bytes().splitlines()
    assert [json.loads(x)["index"] for x in lines] == list(range(120)) + list(range(90))


def test_provenance_lines_match_formatting():
    lines = ProvenanceLines()  # one builder for all calls: its reused table must not leak old lines
    for prefix in (b'{"source":"q","file":"d/a.json","copy":1,"index":', b'{"source":"m","copy":0,"index":'):
        for idx in ([], [0], [0, 1, 9, 10, 11, 99, 100, 12345, 10**6, 2**40], list(range(95, 1005)), [7, 8]):
            got = b"".join(t.tobytes() for t in lines.build(prefix, np.array(idx, np.int64)))
            assert got == b"".join(prefix + b"%d}\n" % i for i in idx)
