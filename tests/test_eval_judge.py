"""MEQ against a loopback OpenAI-compatible judge (tests/fakeservers.py FakeJudge): the prompt follows
ICM-Assistant's, the verdict table is read as upstream's eval_meq/eval.py reads it, the key goes only
into the Authorization header and never into the scores."""

from __future__ import annotations

import json

import pytest
from fakeservers import FakeJudge
from oracles import FIXTURES

from icmlab.evaluate.judge import ChatJudge, JudgeError, judge_explanations, judge_prompt, parse_verdict
from icmlab.evaluate.scoring import MEQ_CRITERIA, EvaluationResult
from icmlab.io import read_json

CASES = read_json(FIXTURES / "eval" / "meq_cases.json")


def test_prompt_carries_the_upstream_task_criteria_and_both_descriptions():
    text = judge_prompt("REF TEXT", "CANDIDATE TEXT")
    for phrase in CASES["prompt_must_contain"]:
        assert phrase in text
    assert text.index("Real person's description: REF TEXT") < text.index("Algorithm's description: CANDIDATE TEXT")


@pytest.mark.parametrize("case", CASES["verdicts"], ids=lambda c: c["name"])
def test_verdict_tables_are_read_as_upstream_reads_them(case):
    assert parse_verdict(case["text"]) == case["scores"]


def test_meq_against_the_fake_judge(monkeypatch):
    items = CASES["items"]
    outputs = [it["reference"] for it in items[:1]] + ["", "a completely different story about cats"]
    secret = "sk-test-" + "x" * 20
    monkeypatch.setenv("ICMLAB_TEST_JUDGE_KEY", secret)
    with FakeJudge(fail_times=1) as srv:  # the first request gets a 503: retried
        judge = ChatJudge(srv.url, "judge-model", key_env="ICMLAB_TEST_JUDGE_KEY", retries=3, backoff=0.01)
        scores = judge_explanations(items, outputs, judge)
        answered = [r for r in srv.requests if r["scores"] is not None]
    assert len(answered) == len(items) and all(r["auth"] == f"Bearer {secret}" for r in srv.requests)
    assert answered[0]["body"]["model"] == "judge-model" and answered[0]["body"]["temperature"] == 0
    assert answered[0]["body"]["messages"][0]["content"] == judge_prompt(items[0]["reference"], outputs[0])
    for name in MEQ_CRITERIA:
        assert scores.criteria[name] == pytest.approx(sum(r["scores"][name] for r in answered) / len(items))
    assert scores.meq == pytest.approx(sum(scores.criteria.values()) / 4 / 100)
    assert scores.records[0]["scores"]["Accuracy"] == 100  # the reference itself matches fully
    saved = json.dumps(EvaluationResult(meq=scores).to_dict())
    assert secret not in saved and scores.judge == {"model": "judge-model", "host": srv.url.split("/")[2]}
    assert EvaluationResult.from_dict(json.loads(saved)).meq.meq == pytest.approx(scores.meq)


def test_judge_errors_name_the_endpoint_not_the_key(monkeypatch):
    monkeypatch.setenv("ICMLAB_TEST_JUDGE_KEY", "sk-hidden")
    with FakeJudge() as srv:
        judge = ChatJudge(srv.url.replace("/v1", "/nope"), "m", key_env="ICMLAB_TEST_JUDGE_KEY", retries=1)
        with pytest.raises(JudgeError, match="HTTP 404") as err:
            judge("hello")
    assert "sk-hidden" not in str(err.value) and "/nope/chat/completions" in str(err.value)
    with pytest.raises(ValueError, match="no 'reference'"):
        judge_explanations([{"image": "a.png"}], ["x"], lambda p: "")
