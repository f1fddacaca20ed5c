"""RecordStore (offsets into the mapped merged JSON) reads exactly what the list-of-dicts reading did.

The train stage's dataset used ``read_json`` (a list of dicts) and :func:`modality_length` per
record; :class:`RecordStore` must give the same records in the same order and the same modality
lengths (the grouped sampler's input), so a run's samples, order and losses stay the same.
"""

from __future__ import annotations

import pickle
import random

import numpy as np
import orjson
import pytest
import tiny_train_setup as T

from icmlab.demo.bundle import generate_bundle
from icmlab.inputs.recordstore import RecordStore, modality_length
from icmlab.io import atomic_write_json, read_json

# Strings that exercise the word counting: escapes, Unicode whitespace, multi-byte text, quotes.
PIECES = ["word", " ", "  ", "\n", "\t", "\r", "\x0c", "\x08", "\\", '"', "/", "\u00a0", "\u0085", "\u1680",
          "\u2003", "\u200a", "\u2028", "\u202f", "\u205f", "\u3000", "\x1c", "é", "’", "—", "中文", "<image>"]  # fmt: skip


def _same_as_list_reading(path) -> RecordStore:
    records = read_json(path)
    store = RecordStore.open(path, workers=0)
    assert len(store) == len(records)
    assert [store[i] for i in range(len(store))] == records
    assert store.modality_lengths.tolist() == [modality_length(r) for r in records]
    return store


def _tricky_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)

    def text() -> str:
        return "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 10)))

    out = []
    for i in range(n):
        r: dict = {"id": str(i) if i % 7 else i}
        if rng.random() < 0.5:
            r["image"] = rng.choice(["a.jpg", None])
        if rng.random() < 0.9:
            r["conversations"] = [{"from": "human", "value": text()} for _ in range(rng.randint(0, 4))]
            if rng.random() < 0.1:
                r["conversations"].append({"from": "gpt", "value": rng.choice([None, 3, 1.5, text()])})
            if rng.random() < 0.1:
                r["conversations"].append({"from": "gpt", "value": text(), "meta": {"value": text()}})
        if rng.random() < 0.1:
            r["meta"] = {"value": text(), "image": 1}
        if rng.random() < 0.1:
            r["tags"] = ["image", "conversations", {"value": "x y"}]
        out.append(r)
    return out


def test_demo_records_equal_the_list_reading(tmp_path):
    bundle = generate_bundle(seed=0, scale=0.2)
    records = [r for ds in (bundle.q_instruct, bundle.icm_instruct) for r in ds.payload]
    path = atomic_write_json(tmp_path / "merged.json", records, indent=True)
    _same_as_list_reading(path)


def test_training_records_with_text_only_samples(tmp_path):
    records = T.build_records(tmp_path / "data")
    path = atomic_write_json(tmp_path / "train.json", records)
    store = _same_as_list_reading(path)
    assert (store.modality_lengths > 0).any() and (store.modality_lengths < 0).any()


@pytest.mark.parametrize("indent", [False, True])
def test_tricky_text_counts_words_like_str_split(tmp_path, indent):
    path = atomic_write_json(tmp_path / "t.json", _tricky_records(1500), indent=indent)
    _same_as_list_reading(path)


def test_small_blocks_and_threads(tmp_path):
    """Many scan blocks (tiny chunks, several threads): offsets and lengths still line up."""
    records = _tricky_records(400, seed=1)
    path = atomic_write_json(tmp_path / "t.json", records)
    from icmlab.inputs import recordstore

    starts, ends, lengths = [], [], []
    for block in recordstore.iter_blocks(path, chunk_bytes=512, workers=2, extra=recordstore.scan_modality_lengths):
        starts.append(block.starts), ends.append(block.ends), lengths.append(block.extra)
    assert len(starts) > 10
    assert np.concatenate(lengths).tolist() == [modality_length(r) for r in records]
    buf = path.read_bytes()
    assert [orjson.loads(buf[s:e]) for s, e in zip(np.concatenate(starts), np.concatenate(ends))] == records


def test_duplicate_keys_and_odd_values_follow_the_parser(tmp_path):
    """Duplicate keys (the parser keeps the last), non-array conversations: decoded, same answer."""
    text = (
        b'[{"id":"a","conversations":[{"from":"human","value":"one two","value":"three"}]},'
        b'{"id":"b","conversations":[{"value":"x"}],"conversations":[{"value":"p q r"}],"image":"i.png"},'
        b'{"id":"c","conversations":[]},{"id":"d"},{"id":"e","image":null,"conversations":[{"value":"\\\\n a\\u00a0b"}]}]'
    )
    path = tmp_path / "d.json"
    path.write_bytes(text)
    store = _same_as_list_reading(path)
    assert store.modality_lengths.tolist() == [modality_length(r) for r in orjson.loads(text)]


def test_fallback_layouts_and_empty(tmp_path):
    empty = tmp_path / "e.json"
    empty.write_bytes(b"[]")
    assert len(RecordStore.open(empty)) == 0
    nested = tmp_path / "n.json"  # whitespace the scan does not accept between records: parsed whole
    nested.write_bytes(b'[{"id":"a","conversations":[{"value":"x y"}]} , , ]')
    with pytest.raises(ValueError, match="n.json"):
        RecordStore.open(nested)
    scalar = tmp_path / "s.json"
    scalar.write_bytes(b'[{"id":"a","conversations":[]}, 3]')
    with pytest.raises(ValueError, match="record 1"):
        RecordStore.open(scalar)
    with pytest.raises(FileNotFoundError):
        RecordStore.open(tmp_path / "missing.json")


def test_bad_offsets_and_indices(tmp_path):
    path = atomic_write_json(tmp_path / "t.json", [{"id": "a"}, {"id": "b"}])
    store = RecordStore.open(path)
    assert store[-1] == {"id": "b"}
    with pytest.raises(IndexError, match="out of range"):
        store[2]
    s, e, m = store.starts, store.ends, store.modality_lengths
    for starts, ends in ((s + 1, e), (s, e + 100), (s[::-1].copy(), e[::-1].copy()), (s, e[:1])):
        with pytest.raises(ValueError, match="t.json"):
            RecordStore(store.buf, starts, ends, m, path)


def test_pickles_by_path_and_notices_a_changed_file(tmp_path):
    path = atomic_write_json(tmp_path / "t.json", [{"id": "a", "conversations": [{"value": "x"}]}])
    store = RecordStore.open(path)
    blob = pickle.dumps(store)
    assert len(blob) < 2000  # offsets and the path, not the file
    assert pickle.loads(blob)[0] == store[0]
    atomic_write_json(path, [{"id": "changed"}, {"id": "more"}])
    with pytest.raises(ValueError, match="changed since"):
        pickle.loads(blob)
    mem = RecordStore.from_records([{"id": "m", "image": "x", "conversations": [{"value": "a b"}]}])
    assert pickle.loads(pickle.dumps(mem))[0]["id"] == "m" and mem.modality_lengths.tolist() == [2]
    with pytest.raises(ValueError, match="list of records"):
        RecordStore.from_records([1, 2])


def test_offsets_are_kept_beside_the_file_and_redone_when_it_changes(tmp_path, caplog):
    records = _tricky_records(200, seed=2)
    path = atomic_write_json(tmp_path / "t.json", records)
    first = RecordStore.open(path)
    sidecar = tmp_path / "t.json.offsets.npz"
    assert sidecar.is_file()
    again = RecordStore.open(path)  # from the sidecar
    assert np.array_equal(again.starts, first.starts) and np.array_equal(again.modality_lengths, first.modality_lengths)
    assert [again[i] for i in range(len(again))] == records
    changed = records[::-1]
    atomic_write_json(path, changed)  # another file now: the sidecar's stamp no longer matches
    assert [r for r in RecordStore.open(path)] == changed
    sidecar.write_bytes(b"not an npz")
    assert [r for r in RecordStore.open(path)] == changed and "scanning t.json again" in caplog.text
    RecordStore.open(atomic_write_json(tmp_path / "u.json", records), cache=False)
    assert not (tmp_path / "u.json.offsets.npz").exists()


# Pieces for the compiled word count's edge cases: runs longer than its 8-byte words, escapes and
# multi-byte characters that cross them, a 4-byte character.
LONG_PIECES = PIECES + ["x" * 9, " " * 9, "abcdefgh", "😀", "\n" * 5]


def test_compiled_word_count_at_every_alignment():
    """Strings at every offset and length (empty, only whitespace, a multi-byte character or an escape at
    the very end, the file's last bytes that fill no whole 8-byte word) count as ``str.split()``."""
    from icmlab.inputs import recordstore_kernels as K

    rng = random.Random(3)
    texts = ["", " ", " " * 17, "\n", "\\n\t", "é", "a é", "a" * 16, "中", " 😀", "a\u3000", "x\u2028", "\u00a0" * 5]
    texts += ["".join(rng.choice(LONG_PIECES) for _ in range(rng.randint(0, 40))) for _ in range(300)]
    for text in texts:
        body = orjson.dumps(text)
        bad = b"\\\\" in body or b"\\u" in body
        for pad in range(9):
            for tail in (0, 1, 3, 9):  # tail < 8: the string may end past the last whole word
                a = np.frombuffer(b"[" * pad + body + b"]" * tail, np.uint8)
                w = a[: len(a) // 8 * 8].view(np.uint64)
                lo, hi = pad + 1, pad + len(body) - 1
                got = K.count_words(a, w, lo, hi)
                assert got == (-1 if bad else len(text.split())), (text, pad, tail)
                assert K._count_words_exact(a, lo, hi) == got


def test_long_strings_and_block_boundaries(tmp_path):
    """Long turns of every kind of piece, in tiny scan blocks: every record as ``modality_length``."""
    rng = random.Random(4)
    records = []
    for i in range(300):
        turns = [{"from": "human", "value": "".join(rng.choice(LONG_PIECES) for _ in range(rng.randint(0, 60)))}]
        turns += [{"from": "gpt", "value": rng.choice(["", " ", "\n\n", "a" * rng.randint(0, 70)])}]
        records.append({"id": str(i), "image": "x.jpg", "conversations": turns} if i % 2 else {"conversations": turns})
    for indent in (False, True):
        path = atomic_write_json(tmp_path / f"l{indent}.json", records, indent=indent)
        _same_as_list_reading(path)
        from icmlab.inputs import recordstore

        lengths = [
            b.extra
            for b in recordstore.iter_blocks(path, chunk_bytes=300, workers=2, extra=recordstore.scan_modality_lengths)
        ]
        assert np.concatenate(lengths).tolist() == [modality_length(r) for r in records]


def test_whitespace_around_keys_and_values(tmp_path):
    """JSON whitespace of any length between a key, its colon and its value (more than 16 bytes too)."""
    ws = " \n\t\r" * 5
    text = (
        f'[{{"id"{ws}:{ws}"a", "image"{ws}:{ws}"i.png",{ws}"conversations"{ws}:{ws}['
        f'{{"from"{ws}:{ws}"human",{ws}"value"{ws}:{ws}"one two three"{ws}}}{ws}]{ws}}},'
        f'{{"conversations":{ws}[{{"value":{ws}"a b"}}, {{"value":"c"}}],"image":{ws}null}}]'
    ).encode()
    path = tmp_path / "ws.json"
    path.write_bytes(text)
    assert _same_as_list_reading(path).modality_lengths.tolist() == [3, 3]


def test_escaped_keys_are_decoded(tmp_path):
    """A key spelled with escapes is the name it decodes to (``"im\\u0061ge"`` is ``image``)."""
    text = (
        b'[{"id":"a","im\\u0061ge":"x.png","conversations":[{"value":"a b"}]},'
        b'{"id":"b","conversation\\u0073":[{"v\\u0061lue":"a b c"}]},'
        b'{"id":"c","conversations":[{"value":"a"}],"conversation\\u0073":[{"value":"p q"}]},'
        b'{"id":"d","conversations":[{"value":"a","v\\u0061lue":"p q"}]},'
        b'{"id":"e","conversations":[{"\\u0076alue":"p q"}],"\\u0069mage":null}]'
    )
    path = tmp_path / "k.json"
    path.write_bytes(text)
    assert _same_as_list_reading(path).modality_lengths.tolist() == [2, -3, -2, -2, 2]


def test_importing_the_store_does_not_import_numba():
    """numba (~0.8 s to import) is loaded by the first scan, not by ``import icmlab.inputs.recordstore``."""
    import subprocess
    import sys

    code = "import sys, icmlab.inputs.recordstore; sys.exit('numba' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
