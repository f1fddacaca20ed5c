"""The added readings and helpers: VLMEvalKit-style exact matching, ICM-Assistant's MQA rule, the 95 %
Wilson interval, the ICM-Test bring-your-own layout, relative report paths and the report's notes
(oracles in tests/fixtures/eval/)."""

from __future__ import annotations

import pytest
from oracles import FIXTURES
from PIL import Image

from icmlab.evaluate.icm_val import icm_test_from_folders
from icmlab.evaluate.report import qbench_notes, relative, wilson
from icmlab.evaluate.scoring import EvaluationResult, exact_choice, mqa_correct, score_mqa, score_qbench
from icmlab.io import read_json

CASES = read_json(FIXTURES / "eval" / "scorer_cases.json")


@pytest.mark.parametrize(("output", "letter"), CASES["exact"])
def test_exact_choice(output, letter):
    assert exact_choice(output, CASES["candidates"]) == letter


@pytest.mark.parametrize(("output", "answer", "ok"), CASES["mqa"])
def test_mqa_rule(output, answer, ok):
    assert mqa_correct(output, answer) is ok


def test_score_mqa_per_kind():
    items = [{"answer": a, "kind": "mc" if a[0] in "ABCD" else "open"} for _, a, _ in CASES["mqa"]]
    scores = score_mqa(items, [o for o, _, _ in CASES["mqa"]])
    assert scores.correct == sum(ok for _, _, ok in CASES["mqa"]) and scores.n == len(items)
    assert sum(r["n"] for r in scores.per_kind.values()) == len(items)
    with pytest.raises(ValueError, match="MQA item #0: no 'answer'"):
        score_mqa([{"question": "q"}], ["A"])


def test_wilson_matches_newcombe():
    for correct, n, lo, hi in read_json(FIXTURES / "eval" / "wilson.json")["cases"]:
        got = wilson(correct, n)
        assert got == pytest.approx((lo, hi), abs=1e-4)
    assert wilson(0, 0) is None


def test_icm_test_layout(tmp_path):
    for rel in ("UGC/sexy/a.png", "UGC/not-sexy/b.jpg", "Porn/sexy/c.PNG"):
        (tmp_path / "test" / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4)).save(tmp_path / "test" / rel, format="PNG")
    items = icm_test_from_folders(tmp_path)
    assert [(it["category"], it["answer"]) for it in items] == [("Porn", "Yes"), ("UGC", "No"), ("UGC", "Yes")]
    Image.new("RGB", (4, 4)).save(tmp_path / "test" / "UGC" / "stray.png")
    with pytest.raises(ValueError, match="must lie at test/<subset"):
        icm_test_from_folders(tmp_path)
    with pytest.raises(FileNotFoundError, match="put ICM-Test under"):
        icm_test_from_folders(tmp_path / "nowhere")


def test_relative_paths(tmp_path):
    assert relative(tmp_path / "runs" / "x", tmp_path) == "runs/x"
    assert relative("liuhaotian/llava-v1.5-7b") == "liuhaotian/llava-v1.5-7b"
    assert relative("https://host/a") == "https://host/a"


def test_notes_explain_empty_columns_and_an_untrained_baseline():
    items = [{"question": "q", "candidates": ["a", "b"], "correct_ans": "a", "type": 0, "concern": 0}] * 4
    evals = {
        "baseline": EvaluationResult(qbench=score_qbench(items, ["?"] * 4)),
        "fine-tuned": EvaluationResult(
            qbench=score_qbench(items, ["A"] * 4),
            controls={"blank": EvaluationResult(qbench=score_qbench(items, ["B"] * 4))},
        ),
    }
    notes = qbench_notes(evals)
    assert any("I-C Distortion, I-C Other column(s) are empty" in n for n in notes)
    assert any("100 % of its answers" in n and "honest comparison" in n for n in notes)


def test_an_icm_record_without_image_is_named(tmp_path):
    from icmlab.evaluate.stage import _icm_set

    with pytest.raises(ValueError, match=r"mqa item #1 .*no image; every item needs 'image'"):
        _icm_set("mqa", tmp_path, [{"image": "a.png", "question": "q"}, {"question": "q", "answer": "B."}], score_mqa)
