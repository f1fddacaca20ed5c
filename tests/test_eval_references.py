"""The papers' numbers (icmlab.evaluate.references) equal the issue's table, and the report puts them
beside ours with Δ for a real recipe (tests/fixtures/eval/paper_numbers.json)."""

from __future__ import annotations

import re

import pytest
from oracles import FIXTURES

from icmlab.config import load_run_config
from icmlab.evaluate.protocol import resolve_protocol
from icmlab.evaluate.records import report_context
from icmlab.evaluate.references import icm_reference, qbench_reference
from icmlab.evaluate.report import context_references, moderation_table_html, qbench_table_html
from icmlab.evaluate.scoring import EvaluationResult, score_moderation, score_qbench
from icmlab.io import read_json

PAPER = read_json(FIXTURES / "eval" / "paper_numbers.json")


@pytest.mark.parametrize(("family", "size", "split", "label", "overall"), PAPER["qbench_overall"])
def test_qbench_overall(family, size, split, label, overall):
    assert qbench_reference(family, size, split, label)["overall"] == pytest.approx(overall / 100)


def test_icm_numbers():
    for label, numbers in PAPER["icm_llava15"].items():
        assert icm_reference("llava15", label) == numbers
    assert qbench_reference("llava15", "tiny", "dev", "baseline") is None


def test_report_tables_show_the_paper_rows_and_deltas():
    cfg = load_run_config("parameters/llava15-7b__icm-instruct__after.yaml")
    items = [{"question": "q", "candidates": ["a", "b"], "correct_ans": "a", "type": 0, "concern": 0}] * 4
    mod = [{"label": True, "category": "c"}, {"label": False, "category": "c"}]
    evals = {
        "baseline": EvaluationResult(
            qbench=score_qbench(items, ["A", "A", "B", "B"]), moderation=score_moderation(mod, ["Yes", "Yes"])
        ),
        "fine-tuned": EvaluationResult(
            qbench=score_qbench(items, ["A"] * 4), moderation=score_moderation(mod, ["Yes", "No"])
        ),
    }
    context = report_context(cfg, resolve_protocol(cfg), [], {})
    q_refs, icm_refs, sources = context_references(context)
    val_refs = {k: v["val_r1"] for k, v in icm_refs.items()}
    page = qbench_table_html(evals, "strict", q_refs, sources["qbench"])
    page += moderation_table_html(evals, "moderation", val_refs, sources["icm"])
    dev = {(f, s, sp, lab): v for f, s, sp, lab, v in PAPER["qbench_overall"]}
    for label, theirs in (("baseline", "baseline"), ("fine-tuned", "after")):
        row = re.search(rf"<tr[^>]*><td>paper: {label}</td>(.*?)</tr>", page).group(1)
        assert re.findall(r"<td>(.*?)</td>", row)[7] == f"{dev[('llava15', '7b', 'dev', theirs)]:.2f}"
    ours = 100 * evals["fine-tuned"].qbench.strict["overall"]
    delta = re.search(r"<tr[^>]*><td>Δ fine-tuned − paper</td>(.*?)</tr>", page).group(1)
    assert re.findall(r"<td>(.*?)</td>", delta)[7] == f"{ours - dev[('llava15', '7b', 'dev', 'after')]:+.2f}"
    assert "Q-Instruct benchmark_results" in page and "ICM-Assistant" in page
    assert f"{100 * PAPER['icm_llava15']['after']['val_r1']:.2f}" in page  # ICM-Val beside Table 2's R1
    assert not context["demo"]
