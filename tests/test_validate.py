"""Tests of the validate stage: every problem kind on a hand-made broken tree, counted exactly.

The tree (``build_tree``) holds good records plus one deliberately broken copy per problem kind:
missing image, case-mismatched image, GIF named .jpg, truncated JPEG, empty and HTML "images",
a 2x2 image, HTML/garbage instead of JSON, unconverted dialect, over-long answers and questions,
bad roles... The expected count of every kind is declared next to the records that cause it.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import orjson
import pytest
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from icmlab import paths
from icmlab.config import load_run_config
from icmlab.inputs.lengths import LengthSetup, record_length
from icmlab.models.spec import DIALECTS
from icmlab.validate.records import KINDS, check_file, check_record
from icmlab.validate.stage import DataValidationError, ValidationOutputs, run, validate_file

WORDS = "what is the quality of this image blurry noise sharp yes no answer question good poor very a b c d".split()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE trained in-process; specials <unk> <s> </s> <pad> <image>."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 4 + ["USER: ASSISTANT: A chat between"]
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<unk>", "<s>", "</s>", "<pad>", "<image>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


@pytest.fixture(scope="session")
def tok() -> PreTrainedTokenizerFast:
    return tiny_tokenizer()


def image_bytes(fmt: str, size=(24, 16), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def rec(
    rid, question="What is the quality of this image?", answer="Good.", image="imgs/good0.png", token="<image>", **extra
) -> dict:
    out = {
        "id": rid,
        "conversations": [
            {"from": "human", "value": (f"{token}\n" if image else "") + question},
            {"from": "gpt", "value": answer},
        ],
        **extra,
    }
    if image is not None:
        out["image"] = image
    return out


def build_tree(root: Path, setup: LengthSetup | None) -> tuple[Path, dict[str, int], int]:
    """A data root with images and a broken ``train.json``: ``(json path, expected counts, records)``."""
    imgs = root / "imgs"
    imgs.mkdir(parents=True)
    for i in range(3):
        (imgs / f"good{i}.png").write_bytes(image_bytes("PNG", (30 + i, 20)))
    (imgs / "photo.jpg").write_bytes(image_bytes("JPEG", (40, 30)))
    (imgs / "anim.jpg").write_bytes(image_bytes("GIF"))  # GIF named .jpg (OCR-VQA style)
    noise = Image.frombytes("RGB", (96, 96), bytes(range(256)) * 108)
    buf = io.BytesIO()
    noise.save(buf, format="JPEG", quality=90)
    (imgs / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) * 2 // 3])  # truncated download
    (imgs / "empty.png").write_bytes(b"")
    (imgs / "page.jpg").write_bytes(b"<html><body>404</body></html>")
    (imgs / "Case.JPG").write_bytes(image_bytes("JPEG"))
    (imgs / "dot.png").write_bytes(image_bytes("PNG", (2, 2)))
    long_answer = " ".join(WORDS * 6)
    records = [rec(f"ok{i}", image=f"imgs/good{i % 3}.png") for i in range(6)] + [
        rec("ok-jpg", image="imgs/photo.jpg"),
        rec("ok-text", image=None),
        rec("ok-multi", image="imgs/good1.png")
        | {
            "conversations": [
                {"from": "human", "value": "Q1?\n<image>"},
                {"from": "gpt", "value": "A1."},
                {"from": "human", "value": "Q2?"},
                {"from": "gpt", "value": "A2."},
            ]
        },
    ]
    expected: dict[str, int] = {}

    def bad(kind: str, n: int, *recs: dict) -> None:
        records.extend(recs)
        expected[kind] = expected.get(kind, 0) + n

    bad("missing_id", 2, {k: v for k, v in rec("x").items() if k != "id"}, rec("  "))
    bad("missing_conversations", 2, {"id": "nc1", "image": "imgs/good0.png"}, {"id": "nc2", "conversations": []})
    bad("bad_turn", 1, rec("bt") | {"conversations": [{"from": "human"}, {"from": "gpt", "value": "x"}]})
    bad(
        "unknown_role",
        1,
        rec("ur") | {"conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "bot", "value": "A"}]},
    )
    bad(
        "first_turn_not_human",
        1,
        rec("ft")
        | {
            "conversations": [
                {"from": "gpt", "value": "Hi."},
                {"from": "human", "value": "<image>\nQ"},
                {"from": "gpt", "value": "A"},
            ]
        },
    )
    bad(
        "roles_not_alternating",
        1,
        rec("ra")
        | {
            "conversations": [
                {"from": "human", "value": "<image>\nQ"},
                {"from": "human", "value": "Q again"},
                {"from": "gpt", "value": "A"},
            ]
        },
    )
    bad(
        "empty_value",
        1,
        rec("ev")
        | {
            "conversations": [
                {"from": "human", "value": "<image>\nQ"},
                {"from": "gpt", "value": "A"},
                {"from": "human", "value": "Q2"},
                {"from": "gpt", "value": "  "},
            ]
        },
    )
    bad("no_answer", 1, rec("na") | {"conversations": [{"from": "human", "value": "<image>\nQ"}]})
    bad(
        "ends_with_human",
        1,
        rec("eh")
        | {
            "conversations": [
                {"from": "human", "value": "<image>\nQ"},
                {"from": "gpt", "value": "A"},
                {"from": "human", "value": "Q2"},
            ]
        },
    )
    bad(
        "bad_image_field",
        1,
        rec("bi", image=None) | {"image": ["imgs/good0.png"], "conversations": rec("")["conversations"]},
    )
    bad(
        "image_token_count",
        3,
        rec("tc0", token=""),
        rec("tc1", image=None, question="<image>\nQ"),
        rec("tc2", question="<image> twice"),
    )
    bad("wrong_dialect", 2, rec("wd0", token="<|image|>"), rec("wd1", token="<|image|>", image="imgs/good2.png"))
    bad("duplicate_id", 2, rec("ok0"), rec("ok1", image="imgs/good1.png"))
    bad(
        "image_missing",
        3,
        rec("im0", image="imgs/nothere.jpg"),
        rec("im1", image="imgs/nothere.jpg"),
        rec("im2", image="imgs/case.jpg"),
    )
    bad("image_format_mismatch", 1, rec("fm", image="imgs/anim.jpg"))
    bad("image_corrupt", 1, rec("cj", image="imgs/cut.jpg"))
    bad("image_unreadable", 2, rec("ue", image="imgs/empty.png"), rec("uh", image="imgs/page.jpg"))
    bad("image_degenerate", 1, rec("dg", image="imgs/dot.png"))
    if setup is not None:
        bad("truncated", 1, rec("tr", answer=long_answer))
        bad("answer_cut", 1, rec("ac", question=long_answer, answer="Yes."))
        for r in records[-2:]:  # the lengths must really fall where the kinds say
            assert record_length(r, setup)["untruncated"] > setup.model_max_length
    path = root / "train.json"
    path.write_bytes(orjson.dumps(records, option=orjson.OPT_INDENT_2))
    return path, expected, len(records)


@pytest.fixture
def setup(tok) -> LengthSetup:
    base = record_length(rec("probe"), LengthSetup(tok, "llava15", 16, 10_000))["untruncated"]
    return LengthSetup(tok, "llava15", 16, base + 30, source="tiny test tokenizer")


@pytest.mark.parametrize("workers", [1, 2])
def test_every_problem_kind_is_counted(tmp_path, setup, workers):
    path, expected, n = build_tree(tmp_path / "data", setup)
    res = validate_file(
        path,
        data_root=tmp_path / "data",
        family="llava15",
        setup=setup,
        workers=workers,
        outputs=ValidationOutputs.in_dir(tmp_path / "out"),
        images="decode",
    )
    assert res.num_records == n
    assert res.counts == expected
    report = json.loads(res.report.read_text())
    assert {k: v["count"] for k, v in report["problems"].items()} == expected
    for kind, entry in report["problems"].items():
        assert entry["examples"] and entry["severity"] == KINDS[kind].severity
    case = report["problems"]["image_missing"]["examples"]
    assert any("on disk: imgs/Case.JPG" in e["detail"] for e in case)
    assert res.lengths["status"] == "done" and res.images["mode"] == "decode"
    (row,) = res.per_source_table()
    assert row["records"] == n and row["errors"] == res.records_with_errors and "image_missing 3" in row["kinds"]
    rows = [json.loads(line) for line in res.problems_file.read_text().splitlines()]
    assert len(rows) == sum(1 for _ in rows) and all(r["problems"] for r in rows)
    errors = {r["index"] for r in rows if any(KINDS[k].severity == "error" for k, _ in r["problems"])}
    assert res.records_with_errors == len(errors)


def test_drop_policy_writes_clean_file_and_reasons(tmp_path, setup):
    path, expected, n = build_tree(tmp_path / "data", setup)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    out = ValidationOutputs.in_dir(tmp_path / "out")
    res = validate_file(path, data_root=tmp_path / "data", family="llava15", setup=setup, outputs=out, policy="drop")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before  # never in place
    clean = json.loads(out.clean.read_text())
    rejects = [json.loads(line) for line in out.rejects.read_text().splitlines()]
    assert len(clean) + len(rejects) == n == res.num_records
    assert len(rejects) == res.records_with_errors and res.kept == len(clean)
    original = orjson.loads(path.read_bytes())
    dropped = {r["index"] for r in rejects}
    assert clean == [r for i, r in enumerate(original) if i not in dropped]
    for r in rejects:
        assert r["reasons"] and r["record"] == original[r["index"]]
        assert all(KINDS[reason.split(":")[0]].severity == "error" for reason in r["reasons"])
    kept_ids = {r.get("id") for r in clean}
    assert {"tr", "fm", "dg", "eh"} <= kept_ids  # warnings never drop a record
    # Validating the cleaned file finds no error left.
    again = validate_file(
        out.clean,
        data_root=tmp_path / "data",
        family="llava15",
        setup=setup,
        outputs=ValidationOutputs.in_dir(tmp_path / "out2"),
    )
    assert again.records_with_errors == 0 and again.ok


def test_mplug_dialect_flips_the_dialect_kinds(tmp_path, setup):
    path, expected, n = build_tree(tmp_path / "data", None)
    res = validate_file(
        path,
        data_root=tmp_path / "data",
        family="mplug_owl2",
        images="exists",
        outputs=ValidationOutputs.in_dir(tmp_path / "out"),
    )
    llava_records = [
        r
        for r in orjson.loads(path.read_bytes())
        if isinstance(r, dict)
        and any("<image>" in str(t.get("value")) for t in r.get("conversations") or [] if isinstance(t, dict))
    ]
    assert res.counts["wrong_dialect"] == len(llava_records)
    assert res.lengths == {"status": "skipped", "reason": "no tokenizer"}
    assert res.images["mode"] == "exists" and "image_corrupt" not in res.counts


@pytest.mark.parametrize(
    "content, kind, detail",
    [
        (b"<!DOCTYPE html>\n<html><head><title>llava_v1_5_mix665k.json</title>", "file_html", "HTML"),
        (
            b'[{"id": "a", "conversations": []}, {"id": "b", "conversations": [}]',
            "file_not_json",
            "byte 65",
        ),  # the "}" after "["
        (b'{"id": "a", "conversations": []}', "file_not_list", "not a list"),
        (b'[{"id": "caf\xe9", "conversations": []}]', "file_encoding", "byte 12"),
        (b'\xef\xbb\xbf[{"id": "a"}]', "file_encoding", "byte 0"),
    ],
)
def test_file_level_problems(tmp_path, content, kind, detail):
    f = tmp_path / "train.json"
    f.write_bytes(content)
    res = validate_file(f, data_root=tmp_path, family="llava15", outputs=ValidationOutputs.in_dir(tmp_path / "o"))
    assert [k for k, _ in res.file_problems] == [kind]
    assert detail in res.file_problems[0][1]
    assert not res.ok and json.loads(res.report.read_text())["file_problems"]
    assert check_file(tmp_path / "none.json")[0][0] == "file_missing"


def test_check_record_is_pure_and_specific():
    ok = rec("a")
    assert check_record(ok, "<image>") == []
    assert [k for k, _ in check_record(rec("a", token="<|image|>"), "<image>")] == ["wrong_dialect"]
    assert [k for k, _ in check_record(rec("a", token="<|image|>"), "<|image|>")] == []
    assert [k for k, _ in check_record(rec("a", answer="<image>"), "<image>")] == ["image_token_count"]
    assert check_record([1, 2], "<image>") == [("not_object", "a JSON list")]
    assert ok == rec("a")  # not mutated


def _cfg(tmp_path: Path, tok, **over):
    model = tmp_path / "model"
    tok.save_pretrained(model)
    (model / "config.json").write_text(json.dumps({"model_type": "llava", "image_seq_length": 16}))
    base = {"runs_root": str(tmp_path / "runs"), "data.root": str(tmp_path / "data"), "model.base": str(model)}
    return load_run_config("parameters/demo.yaml", {**base, **over})


def test_run_stop_policy_raises_after_writing_the_report(tmp_path, tok, setup):
    path, expected, _ = build_tree(tmp_path / "data", None)
    cfg = _cfg(tmp_path, tok, **{"data.model_max_length": 64})
    paths.merged_json(cfg).parent.mkdir(parents=True)
    paths.merged_json(cfg).write_bytes(path.read_bytes())
    with pytest.raises(DataValidationError, match="with errors") as err:
        run(cfg, workers=1)
    assert "image_missing" in str(err.value) and "data.invalid_records: drop" in str(err.value)
    report = json.loads(paths.validation_report(cfg).read_text())
    assert report["lengths"]["status"] == "done" and "16 image tokens" in report["lengths"]["source"]
    assert not paths.clean_json(cfg).exists() and paths.training_json(cfg) == paths.merged_json(cfg)


def test_run_reports_a_skipped_length_check(tmp_path, tok):
    cfg = _cfg(tmp_path, tok, **{"model.base": str(tmp_path / "no-model"), "data.invalid_records": "drop"})
    paths.merged_json(cfg).parent.mkdir(parents=True)
    paths.merged_json(cfg).write_bytes(orjson.dumps([rec("a", image=None)]))
    res = run(cfg)
    assert res.lengths["status"] == "skipped" and "no-model" in res.lengths["reason"]
    assert "skipped" in res.summary() and paths.training_json(cfg) == paths.clean_json(cfg)


def test_image_cut_is_reported(tmp_path, setup):
    """A cut through the image placeholders (image in a later turn) is flagged, not silently mangled."""
    for k in range(200):
        r = rec("ic") | {
            "conversations": [
                {"from": "human", "value": "Q " + " ".join(WORDS[: k % len(WORDS)] * (1 + k // len(WORDS)))},
                {"from": "gpt", "value": "A."},
                {"from": "human", "value": "<image>\nQ2"},
                {"from": "gpt", "value": "B."},
            ]
        }
        got = record_length(r, setup)
        if got["image_cut"]:
            break
    else:
        pytest.fail("no filler length puts the cut inside the image span")
    f = tmp_path / "train.json"
    f.write_bytes(orjson.dumps([r]))
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "good0.png").write_bytes(image_bytes("PNG"))
    res = validate_file(
        f, data_root=tmp_path, family="llava15", setup=setup, outputs=ValidationOutputs.in_dir(tmp_path / "o")
    )
    assert res.counts == {"image_cut": 1, "truncated": 1} and res.records_with_errors == 0


def test_demo_and_its_broken_copies(tmp_path):
    """The demo's own data validate without errors; broken copies of it are caught, each counted exactly."""
    from icmlab import merge
    from icmlab.demo import build_demo_tree, demo_tokenizer

    root, mdir = tmp_path / "data", tmp_path / "model"
    build_demo_tree(root, seed=0, scale=0.02)
    demo_tokenizer().save_pretrained(mdir)
    (mdir / "config.json").write_text(json.dumps({"model_type": "llava", "image_seq_length": 64}))
    cfg = load_run_config(
        "parameters/demo.yaml",
        {
            "runs_root": str(tmp_path / "runs"),
            "data.root": str(root),
            "model.base": str(mdir),
            "data.invalid_records": "drop",
        },
    )
    merge.run(cfg)
    res = run(cfg, workers=2)
    assert res.records_with_errors == 0 and set(res.counts) <= {"truncated"}, res.summary()
    train = paths.merged_json(cfg)
    records = orjson.loads(train.read_bytes())
    refs: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        refs.setdefault(r["image"], []).append(i)
    jpgs = [p for p in refs if p.endswith(".jpg") and p not in (records[5]["image"], records[6]["image"])]
    gone, gif, cut = jpgs[0], jpgs[1], jpgs[2]
    (root / gone).unlink()
    (root / gif).write_bytes(image_bytes("GIF", (64, 64)))
    data = (root / cut).read_bytes()
    (root / cut).write_bytes(data[: len(data) // 2])
    records[5]["conversations"][1]["from"] = "human"  # bad roles
    records[6]["conversations"][0]["value"] += " extra" * 400  # over-long question: no answer token left
    train.write_bytes(orjson.dumps(records))
    res = run(cfg, workers=2)
    assert res.counts["image_missing"] == len(refs[gone])
    assert res.counts["image_format_mismatch"] == len(refs[gif])
    assert res.counts["image_corrupt"] == len(refs[cut])
    assert res.counts["roles_not_alternating"] == 1 and res.counts["answer_cut"] == 1
    assert res.records_with_errors == len(refs[gone]) + len(refs[cut]) + 2
    assert len(orjson.loads(paths.clean_json(cfg).read_bytes())) == len(records) - res.records_with_errors
    # The same (LLaVA-dialect) file given to mPLUG-Owl2: every image record has the wrong token.
    owl = validate_file(
        train, data_root=root, family="mplug_owl2", images="exists", outputs=ValidationOutputs.in_dir(tmp_path / "owl")
    )
    assert owl.counts["wrong_dialect"] == sum(DIALECTS["llava15"] in json.dumps(r) for r in records)
    (tmp_path / "html.json").write_text("<!DOCTYPE html><html>blob page</html>")
    page = validate_file(
        tmp_path / "html.json", data_root=root, family="llava15", outputs=ValidationOutputs.in_dir(tmp_path / "h")
    )
    assert page.file_problems[0][0] == "file_html"


@pytest.mark.parametrize("image_workers", [1, 2])
def test_every_image_is_decoded_and_a_truncated_jpeg_names_its_records(tmp_path, image_workers):
    """The default check decodes every image (in worker processes), with no cap on their number;
    a truncated JPEG is reported on each record that uses it. ``header`` is the explicit fast option."""
    root = tmp_path / "data"
    (root / "imgs").mkdir(parents=True)
    for i in range(40):
        (root / "imgs" / f"{i}.png").write_bytes(image_bytes("PNG", (20 + i, 20)))
    noise = Image.frombytes("RGB", (96, 96), bytes(range(256)) * 108)
    buf = io.BytesIO()
    noise.save(buf, format="JPEG", quality=90)
    (root / "imgs" / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    records = [rec(f"r{i}", image=f"imgs/{i}.png") for i in range(40)]
    records[7:7] = [rec("uses-cut", image="imgs/cut.jpg")]
    records.append(rec("uses-cut-again", image="imgs/cut.jpg"))
    path = tmp_path / "train.json"
    path.write_bytes(orjson.dumps(records))
    out = ValidationOutputs.in_dir(tmp_path / "out")
    res = validate_file(path, data_root=root, family="llava15", outputs=out, image_workers=image_workers)
    assert res.images["mode"] == "decode" and res.images["unique"] == 41 and res.images["per_second"] > 0
    assert res.counts == {"image_corrupt": 2}
    rows = [json.loads(line) for line in res.problems_file.read_text().splitlines()]
    assert [(r["index"], [k for k, _ in r["problems"]]) for r in rows] == [
        (7, ["image_corrupt"]),
        (41, ["image_corrupt"]),
    ]
    assert all("truncated" in d for r in rows for _, d in r["problems"])
    header = validate_file(path, data_root=root, family="llava15", outputs=out, images="header")
    assert header.images["mode"] == "header" and "image_corrupt" not in header.counts
    with pytest.raises(ValueError, match="image check"):
        validate_file(path, data_root=root, family="llava15", outputs=out, images="auto")
