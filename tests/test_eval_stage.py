"""The evaluate stage end to end on a tiny run (tests/tiny_eval_setup.py): every benchmark (Q-Bench,
ICM-Val, ICM-Test from the bring-your-own folders, MQA, MEQ judged by the loopback FakeJudge), the
report's provenance and relative paths, and the Q-Bench test split writing the maintainers' submission."""

from __future__ import annotations

import json

import pytest
from fakeservers import FakeJudge
from tiny_eval_setup import eval_run

from icmlab import paths
from icmlab.evaluate import stage
from icmlab.evaluate.report import build_report
from icmlab.io import read_json, read_jsonl

pytestmark = pytest.mark.slow


def test_all_benchmarks_with_a_judge_and_an_honest_report(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # paths in the report are relative to the working directory
    monkeypatch.setenv("ICMLAB_JUDGE_KEY", "sk-never-written")
    with FakeJudge() as srv:
        cfg = eval_run(
            tmp_path, ("qbench_a1", "moderation", "icm_test", "mqa", "meq"), controls=["blank"], judge_url=srv.url
        )
        result = stage.run(cfg)
        judged = [r for r in srv.requests if r["scores"]]
    ft = result.evaluations["fine-tuned"]
    assert ft.icm_test.n == 5 and set(ft.icm_test.per_category) == {"UGC", "AIGC"}
    assert ft.icm_test.confusion["tp"] + ft.icm_test.confusion["fn"] + ft.icm_test.confusion["unknown_pos"] == 2
    assert ft.mqa.n == 2 and ft.meq.n == 3 and len(judged) == 2 * 3  # baseline and fine-tuned, no control MEQ
    assert ft.controls["blank"].meq is None and ft.controls["blank"].mqa is not None
    page = result.report.read_text(encoding="utf-8")
    for text in ("icmlab commit", "parameters file", "recipe", "protocol upstream", "ICM-Test", "MEQ", "Wilson"):
        assert text in page
    saved = (paths.eval_dir(cfg) / "scores.json").read_text() + page
    assert "sk-never-written" not in saved and str(tmp_path) not in saved  # no key, no absolute path
    saved_report = read_json(paths.report_dir(cfg) / "scores.json")  # carries its context: rebuildable
    again = build_report(tmp_path / "again", saved_report).read_text(encoding="utf-8")
    assert "icmlab commit" in again and "ICM-Test" in again
    explanations = read_jsonl(paths.eval_dir(cfg) / "meq_explanations.fine-tuned.jsonl")
    assert [e["reference"] for e in explanations] == [
        it["reference"]
        for it in read_json(paths.icm_eval_dir(cfg) / "icm_val_questions.json")
        if it["kind"] == "explanation"
    ]


def test_test_split_writes_the_submission_instead_of_crashing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = eval_run(tmp_path, ("qbench_a1",), split="test")
    result = stage.run(cfg)
    assert result.evaluations["fine-tuned"].qbench is None
    test_items = read_json(paths.qbench_json(cfg, "test"))
    lines = (paths.eval_dir(cfg) / "qbench_test_submission.fine-tuned.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [{k: v for k, v in r.items() if k != "response"} for r in rows] == test_items
    assert all(isinstance(r["response"], str) for r in rows)
    assert "submission" in result.report.read_text(encoding="utf-8")
