"""Tests of the inspect stage: statistics, figures, the exact-model-input rendering and the browser."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import orjson
import pytest
from matplotlib.figure import Figure
from PIL import Image
from test_validate import image_bytes, rec, tok  # noqa: F401  (tok is a fixture)

from icmlab import merge, validate
from icmlab.config import load_run_config
from icmlab.inputs.encode import encode_conversation, segments_for_display
from icmlab.inputs.lengths import record_length
from icmlab.inspection import stage as inspection

FIGURES = {"source_mix", "turns", "token_lengths", "image_sizes", "samples"}


def make_run(tmp_path: Path, tok, model: bool = True):
    """A data root with two small datasets (one record broken), merged and validated (drop)."""
    root = tmp_path / "data"
    (root / "imgs").mkdir(parents=True)
    sizes = {}
    for i in range(4):
        sizes[f"imgs/q{i}.png"] = (20 + 4 * i, 16 + i)
        (root / f"imgs/q{i}.png").write_bytes(image_bytes("PNG", sizes[f"imgs/q{i}.png"], (40 * i, 90, 200)))
    q = [
        rec(f"q{i}", image=f"imgs/q{i % 4}.png", answer="The clarity is good." if i % 2 else "Yes.") for i in range(10)
    ]
    q.append(rec("q-missing", image="imgs/none.png"))
    icm = [
        rec(
            f"i{i}",
            question="Is it blurry?\nA. yes\nB. no\nAnswer with the letter.",
            answer="B.",
            image=f"imgs/q{i % 4}.png",
        )
        for i in range(6)
    ] + [rec("i-text", image=None)]
    (root / "cleaned_labels.json").write_bytes(orjson.dumps(q))
    (root / "icm_llava_train.json").write_bytes(orjson.dumps(icm))
    mdir = tmp_path / "model"
    tok.save_pretrained(mdir)
    (mdir / "config.json").write_text(json.dumps({"model_type": "llava", "image_seq_length": 16}))
    cfg = load_run_config(
        "parameters/demo.yaml",
        {
            "runs_root": str(tmp_path / "runs"),
            "data.root": str(root),
            "data.invalid_records": "drop",
            "model.base": str(mdir if model else tmp_path / "absent"),
        },
    )
    merge.run(cfg)
    validate.run(cfg, workers=1)
    return cfg, sizes


def test_run_statistics_and_figures(tmp_path, tok):
    cfg, sizes = make_run(tmp_path, tok)
    res = inspection.run(cfg)
    assert res.num_records == 18 and res.datasets == {"q_instruct": 11, "icm_instruct": 7}
    assert {s.index for s in res.samples} == set(range(18))
    assert set(res.figures) == FIGURES and all(isinstance(f, Figure) for f in res.figures.values())
    assert all(f._repr_png_().startswith(b"\x89PNG") for f in res.figures.values())  # shows in papermill
    for name, f in res.figure_files.items():
        assert f.read_bytes().startswith(b"\x89PNG") and Image.open(f).size[0] > 300
    assert res.categories["icm_instruct"] == {"multiple choice": 6, "text-only": 1}
    assert res.categories["q_instruct"] == {"yes/no": 5, "open question": 6}
    assert res.turns["q_instruct"].tolist() == [1] * 11
    setup = res.setup
    expected = [record_length(s.record, setup)["untruncated"] for s in res.samples if s.dataset == "icm_instruct"]
    assert res.token_lengths["icm_instruct"].tolist() == expected
    got = sorted(map(tuple, res.image_sizes["q_instruct"].tolist()))
    assert got == sorted(sizes[f"imgs/q{i % 4}.png"] for i in range(10))  # the missing image has no size
    missing = [s for s in res.samples if s.record.get("id") == "q-missing"][0]
    assert [k for k, _ in missing.problems] == ["image_missing"]
    table = {row["dataset"]: row for row in res.table()}
    assert table["q_instruct"]["records"] == 11 and "done" in res.length_status
    assert json.loads((cfg.run_dir / "inspect" / "inspect.json").read_text())["datasets"] == res.datasets
    html = inspection.samples_html(res, 2)
    assert html.count("data:image/png;base64,") == 2 and "image ×16" in html


def test_model_input_matches_the_trainer(tmp_path, tok):
    cfg, _ = make_run(tmp_path, tok)
    res = inspection.run(cfg, save=False)
    record = next(s.record for s in res.samples if s.record.get("id") == "q1")
    markup = inspection.model_input_html(record, res.setup)
    enc = encode_conversation(
        record,
        tok,
        template="vicuna_v1",
        dialect="llava15",
        image_token_id=-200,
        num_image_tokens=16,
        model_max_length=cfg.data.model_max_length,
    )
    runs = segments_for_display(enc, tok)
    trained = "".join(t for t, k in runs if k == "trained")
    assert trained == " The clarity is good.</s>"
    assert f'title="trained">{trained.replace("<", "&lt;").replace(">", "&gt;")}</span>' in markup
    assert 'title="image">&lt;image ×16&gt;</span>' in markup
    assert f"{enc.num_tokens} tokens" in markup and f"{enc.num_supervised} trained" in markup
    broken = {"id": "x", "conversations": [{"from": "gpt", "value": "a"}, {"from": "gpt", "value": "b"}]}
    assert "cannot encode" in inspection.model_input_html(broken, res.setup)
    assert "no tokenizer" in inspection.model_input_html(record, None)


def test_filters_and_browser(tmp_path, tok):
    cfg, _ = make_run(tmp_path, tok)
    res = inspection.run(cfg, save=False)
    s = res.samples
    assert len(inspection.matches(s, dataset="icm_instruct")) == 7
    assert len(inspection.matches(s, category="multiple choice")) == 6
    assert [s[p].record["id"] for p in inspection.matches(s, problem="image_missing")] == ["q-missing"]
    assert len(inspection.matches(s, problem="none")) == 17 and len(inspection.matches(s, problem="any")) == 1
    assert [s[p].record["id"] for p in inspection.matches(s, text="I-TEXT")] == ["i-text"]
    w = inspection.browser(cfg, res)
    filters, nav, view, model = w.children
    dataset, category, problem, search = filters.children
    status = nav.children[3]
    assert "image_missing" in problem.options and "icm_instruct" in dataset.options
    assert status.value.startswith("1 / 18")
    first = view.children[1].value
    nav.children[1].click()  # next
    assert status.value.startswith("2 / 18") and view.children[1].value != first
    problem.value = "image_missing"
    assert status.value.startswith("1 / 1") and "q-missing" in view.children[1].value
    assert bytes(view.children[0].value) == b""  # no image to show, but the record is browsable
    problem.value, dataset.value = "all", "icm_instruct"
    assert status.value.startswith("1 / 7") and "image ×16" in model.value
    assert bytes(view.children[0].value).startswith(b"\x89PNG")
    search.value = "nothing matches this"
    assert "no record matches" in status.value


def test_without_tokenizer_the_lengths_are_reported_skipped(tmp_path, tok):
    cfg, _ = make_run(tmp_path, tok, model=False)
    res = inspection.run(cfg)
    assert res.length_status.startswith("skipped") and all(len(v) == 0 for v in res.token_lengths.values())
    assert set(res.figure_files) == FIGURES


def test_missing_merged_file_names_the_stage(tmp_path):
    cfg = load_run_config("parameters/demo.yaml", {"runs_root": str(tmp_path / "runs")})
    with pytest.raises(FileNotFoundError, match="run the merge stage"):
        inspection.run(cfg)


def test_record_category():
    assert inspection.record_category(rec("a", image=None)) == "text-only"
    assert inspection.record_category(rec("a", answer="No, it is not.")) == "yes/no"
    assert inspection.record_category(rec("a", answer=" ".join(["word"] * 50))) == "description"
    assert inspection.record_category([1]) == "malformed"
    assert np.isscalar(inspection.record_category(rec("a")))
