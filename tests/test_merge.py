"""Tests of the merge stage: jq semantics, exact byte scanning, provenance, sampling, dialects, safety."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import orjson
import pytest

from icmlab import paths
from icmlab.config import load_run_config
from icmlab.inputs.jsonscan import DuplicateIds, count_records, id_hash, id_key, iter_blocks, iter_record_chunks
from icmlab.merge.stage import MergeSource, merge_files, merge_sources, run

JQ = shutil.which("jq")

# Records chosen to trip a byte scanner: braces, quotes, backslashes and "id" keys inside strings,
# nested objects with their own "id", non-string ids, unicode, odd whitespace and key orders.
TRICKY = [
    {
        "id": "a1",
        "image": "x/a.jpg",
        "conversations": [
            {"from": "human", "value": '<image>\nWhat is } , { "id": 3?'},
            {"from": "gpt", "value": 'A brace: {"id": "fake"}, ok \\\\'},
        ],
    },
    {
        "conversations": [
            {"from": "human", "value": 'text only \\" quote'},
            {"from": "gpt", "value": "\u00e9\u4e2d\U0001f600"},
        ],
        "id": 17,
    },
    {"meta": {"id": "nested", "k": [1, {"id": 2}]}, "id": 'b"2\\', "conversations": []},
    {"id": "", "conversations": [{"from": "human", "value": "}}}]]]"}]},
    {"id": "c3", "conversations": [{"value": '\\\\\\"', "from": "gpt"}], "image": "y/b.png"},
    {"x": None, "conversations": [{"from": "human", "value": "no id here"}]},
    {"id": 2.5, "conversations": [{"from": "human", "value": "ends with backslash \\\\"}]},
]


def write(path: Path, obj, indent: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(obj, option=orjson.OPT_INDENT_2 if indent else 0))
    return path


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def record(rid: str, image: str | None = "img/a.jpg", token: str = "<image>") -> dict:
    rec = {
        "id": rid,
        "conversations": [
            {"from": "human", "value": (f"{token}\n" if image else "") + f"Question {rid}?"},
            {"from": "gpt", "value": f"Answer {rid}."},
        ],
    }
    if image:
        rec["image"] = image
    return rec


# --------------------------------------------------------------------------- the byte scanner
@pytest.mark.parametrize("indent", [False, True])
@pytest.mark.parametrize("chunk", [16, 97, 4096])
def test_scanner_is_exact(tmp_path, indent, chunk):
    f = write(tmp_path / "t.json", TRICKY * 5, indent)
    got = [r for c in iter_record_chunks(f, chunk) for r in c]
    assert got == orjson.loads(f.read_bytes())
    blocks = list(iter_blocks(f, chunk))
    hashes = np.concatenate([b.id_hash for b in blocks])
    assert hashes.tolist() == [id_hash(r.get("id")) for r in TRICKY * 5]
    keys = [b.id_keys[b.id_offsets[j] : b.id_offsets[j + 1]].tobytes() for b in blocks for j in range(len(b))]
    assert keys == [id_key(r.get("id")) for r in TRICKY * 5]
    assert hashes[3] == 0 and hashes[5] == 0  # empty and missing ids count as missing
    assert count_records(f) == len(TRICKY) * 5


def test_scanner_handles_odd_whitespace_and_empty(tmp_path):
    f = tmp_path / "ws.json"
    f.write_bytes(b' \n[ {"id" : "a" ,"conversations":[]} ,\n\t{ "id":"b"}\r\n]\n')
    assert [r["id"] for c in iter_record_chunks(f, 8) for r in c] == ["a", "b"]
    assert np.concatenate([b.id_hash for b in iter_blocks(f, 8)]).tolist() == [id_hash("a"), id_hash("b")]
    (tmp_path / "empty.json").write_bytes(b"[ ]")
    assert list(iter_record_chunks(tmp_path / "empty.json")) == []


def test_scanner_falls_back_for_non_object_elements(tmp_path):
    data = [1, "two", {"id": "x"}, [3], None]
    f = write(tmp_path / "mixed.json", data)
    assert [r for c in iter_record_chunks(f, 8) for r in c] == data


@pytest.mark.parametrize(
    "content, message",
    [
        (b"<!DOCTYPE html><html><body>blob page</body></html>", "HTML"),
        (b'[{"id": "a", "conversations": []}, {"id": "b", "conv', "not valid JSON at byte"),
        (b'{"id": "a"}', "not a list"),
        (b'[{"id": "a"}] trailing', "not valid JSON"),
    ],
)
def test_bad_files_raise_naming_the_file(tmp_path, content, message):
    f = tmp_path / "bad.json"
    f.write_bytes(content)
    with pytest.raises(ValueError, match=message) as err:
        list(iter_record_chunks(f, 16))
    assert "bad.json" in str(err.value)


# --------------------------------------------------------------------------- jq semantics
def test_merge_equals_jq_slurp_add(tmp_path):
    if JQ is None:
        pytest.skip("jq is not installed (apt-get install -y jq): the jq comparison cannot run")
    a = write(tmp_path / "a.json", TRICKY + [record(f"a{i}") for i in range(50)], indent=True)
    b = write(tmp_path / "b.json", [record(f"b{i}", None if i % 3 == 0 else "img/b.jpg") for i in range(80)])
    out = tmp_path / "out" / "train.json"
    merge_files(
        [MergeSource("q", a), MergeSource("m", b)],
        out,
        tmp_path / "out" / "prov.jsonl",
        image_token="<image>",
        chunk_bytes=256,
    )
    jq_out = subprocess.run([JQ, "-s", "add", str(a), str(b)], capture_output=True, check=True).stdout
    assert orjson.loads(out.read_bytes()) == orjson.loads(jq_out)
    assert json.loads(out.read_text()) == orjson.loads(jq_out)  # the stdlib loader of the original repos reads it


def test_merge_is_deterministic_and_never_touches_inputs(tmp_path):
    a = write(tmp_path / "a.json", [record(f"a{i}") for i in range(30)])
    b = write(tmp_path / "b.json", [record(f"b{i}", token="<|image|>") for i in range(30)])
    before = {p: sha(p) for p in (a, b)}
    srcs = [MergeSource("q", a, 1.7), MergeSource("m", b, 0.4)]
    r1 = merge_files(srcs, tmp_path / "o1.json", tmp_path / "p1.jsonl", image_token="<image>", seed=3)
    r2 = merge_files(srcs, tmp_path / "o2.json", tmp_path / "p2.jsonl", image_token="<image>", seed=3)
    assert sha(tmp_path / "o1.json") == sha(tmp_path / "o2.json") and sha(tmp_path / "p1.jsonl") == sha(
        tmp_path / "p2.jsonl"
    )
    assert {p: sha(p) for p in (a, b)} == before
    assert r1.num_records == r2.num_records == 30 + 21 + 12
    with pytest.raises(ValueError, match="also an input"):
        merge_files([MergeSource("q", a)], a, tmp_path / "p.jsonl", image_token="<image>")
    assert sha(a) == before[a]
    assert not list(tmp_path.glob(".*.tmp"))


def test_failed_merge_leaves_no_output(tmp_path):
    good = write(tmp_path / "a.json", [record("a")])
    bad = tmp_path / "b.json"
    bad.write_bytes(b'[{"id": "x", "conversations": [')
    out = tmp_path / "out" / "train.json"
    with pytest.raises(ValueError, match="b.json"):
        merge_files(
            [MergeSource("q", good), MergeSource("m", bad)], out, out.with_name("p.jsonl"), image_token="<image>"
        )
    assert not out.exists() and not list(out.parent.iterdir())


# --------------------------------------------------------------------------- provenance, sampling, duplicates
def test_provenance_sampling_and_duplicates(tmp_path):
    a = write(tmp_path / "data" / "a.json", [record(f"a{i}") for i in range(10)])
    b = write(tmp_path / "data" / "b.json", [record(f"b{i}") for i in range(20)] + [record("a3"), record("b5")])
    out, prov = tmp_path / "train.json", tmp_path / "prov.jsonl"
    res = merge_files(
        [MergeSource("q", a, 2.5), MergeSource("m", b, 0.5)],
        out,
        prov,
        image_token="<image>",
        seed=0,
        root=tmp_path / "data",
    )
    merged = orjson.loads(out.read_bytes())
    rows = [orjson.loads(line) for line in prov.read_bytes().splitlines()]
    assert len(merged) == len(rows) == res.num_records == 25 + 11
    originals = {"a.json": orjson.loads(a.read_bytes()), "b.json": orjson.loads(b.read_bytes())}
    for rec, row in zip(merged, rows):
        assert originals[row["file"]][row["index"]] == rec
    q_rows = [r for r in rows if r["source"] == "q"]
    assert [r["copy"] for r in q_rows] == [0] * 10 + [1] * 10 + [2] * 5
    assert [r["index"] for r in q_rows[:20]] == list(range(10)) * 2
    m_idx = [r["index"] for r in rows if r["source"] == "m"]
    assert m_idx == sorted(m_idx) and len(set(m_idx)) == 11
    # The repeated copies of q are intentional; only the cross-file reuses of a3 / b5 count.
    assert res.duplicate_ids == (20 in m_idx) + (21 in m_idx and 5 in m_idx)
    assert res.duplicate_ids > 0
    for ex in res.duplicate_examples:
        assert ex["first"]["source"] in ("q", "m") and ex["again"]["source"] == "m"
    other = merge_files(
        [MergeSource("m", b, 0.5)], tmp_path / "o3.json", tmp_path / "p3.jsonl", image_token="<image>", seed=1
    )
    assert [r["id"] for r in orjson.loads((tmp_path / "o3.json").read_bytes())] != [
        r["id"] for r in merged[25:]
    ]  # another seed, another sample
    assert other.num_records == 11


def test_duplicates_within_one_file(tmp_path):
    a = write(
        tmp_path / "a.json",
        [
            record("x"),
            record("y"),
            record("x"),
            {"id": 7, "conversations": []},
            {"id": "7", "conversations": []},
            {"id": 7, "conversations": []},
        ],
    )
    res = merge_files([MergeSource("q", a)], tmp_path / "o.json", tmp_path / "p.jsonl", image_token="<image>")
    assert res.duplicate_ids == 2
    assert [(e["id"], e["first"]["index"], e["again"]["index"]) for e in res.duplicate_examples] == [
        ("x", 0, 2),
        (7, 3, 5),
    ]


# --------------------------------------------------------------------------- dialects
def test_dialect_applied_to_every_record(tmp_path):
    mixed = [
        record("l", token="<image>"),
        record("o", token="<|image|>"),
        record("t", None),
        {
            "id": "e",
            "image": "i.jpg",
            "conversations": [{"from": "human", "value": "Q\n\\u003cimage\\u003e"}, {"from": "gpt", "value": "A"}],
        },
    ]
    src = tmp_path / "in.json"
    src.write_text(json.dumps(mixed).replace("\\\\u003c", "\\u003c").replace("\\\\u003e", "\\u003e"))
    parsed = json.loads(src.read_text())
    assert parsed[3]["conversations"][0]["value"] == "Q\n<image>"  # the escape spells "<image>"
    for token, other in (("<|image|>", "<image>"), ("<image>", "<|image|>")):
        out = tmp_path / f"out{len(token)}.json"
        res = merge_files([MergeSource("custom", src)], out, tmp_path / "p.jsonl", image_token=token)
        recs = orjson.loads(out.read_bytes())
        values = [t["value"] for r in recs for t in r["conversations"]]
        assert sum(v.count(token) for v in values) == 3 and not any(other in v for v in values)
        assert res.tokens_converted == 2 if token == "<|image|>" else 1
        assert [r["id"] for r in recs] == ["l", "o", "t", "e"]


def _cfg(tmp_path: Path, **over):
    base = {
        "run_name": "m",
        "runs_root": str(tmp_path / "runs"),
        "data.root": str(tmp_path / "data"),
        "model.base": str(tmp_path / "model"),
        "data.datasets": "[q_instruct, icm_instruct]",
    }
    return load_run_config("parameters/demo.yaml", {**base, **over})


def test_run_uses_recipe_order_and_model_dialect(tmp_path):
    root = tmp_path / "data"
    write(root / paths.DATASET_JSON["q_instruct"], [record(f"q{i}") for i in range(3)])
    write(root / paths.DATASET_JSON["icm_instruct"], [record(f"i{i}") for i in range(2)])
    write(
        root / paths.DATASET_JSON["llava_v1_5_mix665k"],
        [record(f"m{i}", None if i else "coco/1.jpg") for i in range(4)],
    )
    # "after" for mPLUG-Owl2: the low-level files only, converted too (upstream forgets this one).
    res = run(_cfg(tmp_path, **{"model.family": "mplug_owl2", "train.strategy": "after"}))
    recs = orjson.loads(res.output.read_bytes())
    assert [r["id"] for r in recs] == ["q0", "q1", "q2", "i0", "i1"]
    assert all(r["conversations"][0]["value"].startswith("<|image|>") for r in recs)
    assert json.loads(res.summary_file.read_text())["num_records"] == 5
    cfg = _cfg(
        tmp_path,
        **{"model.family": "mplug_owl2", "train.strategy": "mix", "data.datasets": "[icm_instruct, q_instruct]"},
    )
    assert [s.name for s in merge_sources(cfg)] == ["icm_instruct", "q_instruct", "llava_v1_5_mix665k"]
    recs = orjson.loads(run(cfg).output.read_bytes())
    assert [r["id"] for r in recs] == ["i0", "i1", "q0", "q1", "q2", "m0", "m1", "m2", "m3"]
    assert res.output == paths.merged_json(cfg) and paths.provenance_jsonl(cfg).is_file()


def test_missing_source_names_the_dataset(tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(FileNotFoundError, match="q_instruct.*cleaned_labels.json"):
        merge_sources(_cfg(tmp_path))


def test_duplicate_detector_survives_hash_collisions(tmp_path):
    """Force every id onto one hash: the exact-bytes check must still find only the true duplicates."""
    f = write(tmp_path / "a.json", [{"id": i} for i in ["p", "q", "p", "r", "q", "p"]] + [{"id": 1}, {"id": "1"}])
    blocks = list(iter_blocks(f, 16))
    for colliding in (False, True):
        dup = DuplicateIds()
        for b in blocks:
            if colliding:
                b.id_hash = np.full(len(b), 7, np.uint64)
            dup.add(b, np.arange(len(b)), b.first + np.arange(len(b)))
        pairs, ids = dup.confirm()
        assert pairs.tolist() == [[0, 2], [1, 4], [0, 5]] and ids == ["p", "q", "p"]
