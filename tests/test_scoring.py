"""Tests for icmlab.evaluate.scoring: Q-Bench prompts, strict vs substring scoring, moderation metrics.

Every expected number below was worked out by hand from the inputs written next to it.
"""

from __future__ import annotations

import json
import math

import pytest

from icmlab.evaluate.scoring import (
    QBENCH_COLUMNS,
    EvaluationResult,
    ModerationScores,
    QBenchScores,
    correct_letter,
    item_columns,
    parse_choice,
    parse_yes_no,
    qbench_prompt,
    score_moderation,
    score_qbench,
    substring_correct,
)

BLUR = {
    "img_path": "a.jpg",
    "question": "What distortion affects the image?",
    "candidates": ["noise", "blurry", "overexposure"],
    "correct_ans": "blurry",
    "type": 1,
    "concern": 0,
}


def item(correct: str, candidates=("Yes", "No"), type_=0, concern=0, q="Is the image clear?") -> dict:
    return {
        "img_path": "x.jpg",
        "question": q,
        "candidates": list(candidates),
        "correct_ans": correct,
        "type": type_,
        "concern": concern,
    }


# --------------------------------------------------------------------------- prompt
def test_prompt_llava_puts_instruction_before_options():
    assert qbench_prompt(BLUR) == (
        "What distortion affects the image?\nAnswer with the option's letter from the given choices directly.\n"
        "A. noise\nB. blurry\nC. overexposure\n"
    )
    assert qbench_prompt(BLUR, style="llava") == qbench_prompt(BLUR)


def test_prompt_mplug_puts_instruction_after_options():
    assert qbench_prompt(BLUR, style="mplug") == (
        "What distortion affects the image?A. noise\nB. blurry\nC. overexposure\n"
        "\nAnswer with the option's letter from the given choices directly.\n"
    )


def test_prompt_errors():
    with pytest.raises(ValueError, match="unknown style"):
        qbench_prompt(BLUR, style="qwen")
    with pytest.raises(ValueError, match="'candidates'"):
        qbench_prompt({"question": "q"})
    with pytest.raises(ValueError, match="2..26 candidates"):
        qbench_prompt({"question": "q", "candidates": ["only"]})


def test_correct_letter():
    assert correct_letter(BLUR) == "B"
    assert correct_letter({**BLUR, "correct_ans": "Blurry."}) == "B"  # case / final period
    assert correct_letter({**BLUR, "correct_ans": "C"}) == "C"  # a bare letter
    with pytest.raises(ValueError, match="not one of the candidates"):
        correct_letter({**BLUR, "correct_ans": "sharp"})
    with pytest.raises(ValueError, match="no 'correct_ans'"):
        correct_letter({k: v for k, v in BLUR.items() if k != "correct_ans"})


# --------------------------------------------------------------------------- parsing
@pytest.mark.parametrize(
    "output, expected",
    [
        ("B", "B"),
        ("B.", "B"),
        ("(B)", "B"),
        ("B)", "B"),
        ("[B]", "B"),
        ("B. blurry", "B"),
        ("B blurry", "B"),
        ("  B.\n", "B"),
        ("B</s>", "B"),
        ("The answer is B", "B"),
        ("The answer is B.", "B"),
        ("Answer: (C)", "C"),
        ("The correct option is A.", "A"),
        ("blurry", "B"),
        ("Blurry.", "B"),
        ("OVEREXPOSURE", "C"),
        ("A. blurry, but B is possible", "A"),  # the first letter is the choice
        ("I cannot tell", None),
        ("", None),
        ("   ", None),
        ("A blurry image", None),
        ("D", None),
        ("The answer is D", None),
        ("Answer: A or option B", None),
        ("The image is Blurry", None),
        ("b", None),
        ("sharp", None),
    ],
)
def test_parse_choice(output, expected):
    assert parse_choice(output, 3, BLUR["candidates"]) == expected


def test_parse_choice_without_candidates_and_bad_args():
    assert parse_choice("B. blurry", 3) == "B"
    assert parse_choice("blurry", 3) is None  # text mapping needs the candidates
    assert parse_choice(None, 2) is None
    with pytest.raises(ValueError, match="n_options"):
        parse_choice("A", 0)
    with pytest.raises(ValueError, match="2 candidates but n_options=3"):
        parse_choice("A", 3, ["x", "y"])


def test_substring_rule_is_upstreams():
    assert substring_correct("A. blurry, but B is possible", "B")  # any occurrence counts
    assert substring_correct("Answer: B", "A")  # the capital A of "Answer" counts too
    assert not substring_correct("I cannot tell", "B")
    assert not substring_correct("b", "B")  # case-sensitive, like `correct_choice in outputs`
    assert not substring_correct("", "A") and not substring_correct(None, "A")


# --------------------------------------------------------------------------- columns
def test_item_columns_codes_and_words():
    assert item_columns(item("Yes", type_=0, concern=0)) == ["yes_no", "distortion", "overall"]
    assert item_columns(item("Yes", type_=2, concern=3)) == ["how", "in_context_other", "overall"]
    assert item_columns({"type": "yes-or-no", "concern": "In-context Distortion"}) == [
        "yes_no",
        "in_context_distortion",
        "overall",
    ]
    assert item_columns({"question_type": 1, "question_concern": "others"}) == ["what", "other", "overall"]
    assert item_columns({}) == ["overall"]
    with pytest.raises(ValueError, match="type 7"):
        item_columns({"type": 7})
    with pytest.raises(ValueError, match="concern 'colour'"):
        item_columns({"concern": "colour"})


# --------------------------------------------------------------------------- score_qbench
def test_score_qbench_strict_vs_substring_per_column():
    items = [
        item("Yes", type_=0, concern=0),  # 0 yes/no, distortion
        item("No", type_=0, concern=1),  # 1 yes/no, other
        {**BLUR, "type": 1, "concern": 0},  # 2 what, distortion (B)
        {**BLUR, "type": 2, "concern": 2},  # 3 how, i-c distortion (B)
        {**BLUR, "correct_ans": "noise", "type": 1, "concern": 3},  # 4 what, i-c other (A)
    ]
    outputs = [
        "A",  # strict ok, substring ok
        "A. Yes, but B",  # strict wrong (A), substring ok (contains B)
        "blurry",  # strict ok via text, substring wrong (no "B")
        "I cannot tell",  # both wrong; unparsed
        "Answer: C",  # strict wrong (C), substring ok ("A" of "Answer")
    ]
    s = score_qbench(items, outputs)
    assert s.counts == {
        "yes_no": 2,
        "what": 2,
        "how": 1,
        "distortion": 2,
        "other": 1,
        "in_context_distortion": 1,
        "in_context_other": 1,
        "overall": 5,
    }
    assert s.strict_correct == {
        "yes_no": 1,
        "what": 1,
        "how": 0,
        "distortion": 2,
        "other": 0,
        "in_context_distortion": 0,
        "in_context_other": 0,
        "overall": 2,
    }
    assert s.substring_correct == {
        "yes_no": 2,
        "what": 1,
        "how": 0,
        "distortion": 1,
        "other": 1,
        "in_context_distortion": 0,
        "in_context_other": 1,
        "overall": 3,
    }
    assert s.strict["overall"] == pytest.approx(0.4) and s.substring["overall"] == pytest.approx(0.6)
    assert s.strict["yes_no"] == 0.5 and s.substring["yes_no"] == 1.0
    assert s.unparsed == 1
    # random guess: 1/2 for the Yes/No items, 1/3 for the three-option ones
    assert s.chance["yes_no"] == 0.5 and s.chance["what"] == pytest.approx(1 / 3)
    assert s.chance["overall"] == pytest.approx((0.5 + 0.5 + 1 / 3 * 3) / 5)
    assert [r["parsed"] for r in s.records] == ["A", "A", "B", None, "C"]
    assert [r["correct"] for r in s.records] == ["A", "B", "B", "B", "A"]


def test_score_qbench_perfect_zero_and_empty_columns():
    items = [item("Yes"), item("No", type_=0, concern=1), {**BLUR, "type": 1, "concern": 0}]
    perfect = score_qbench(items, ["A", "B.", "(B)"])
    assert perfect.strict["overall"] == perfect.substring["overall"] == 1.0
    assert perfect.strict["how"] is None and perfect.counts["how"] == 0  # no items, no number
    zero = score_qbench(items, ["", "", ""])
    assert zero.strict["overall"] == zero.substring["overall"] == 0.0
    assert zero.unparsed == 3
    assert set(perfect.strict) == set(QBENCH_COLUMNS)


def test_score_qbench_errors_name_the_item():
    with pytest.raises(ValueError, match="2 items but 1 outputs"):
        score_qbench([item("Yes"), item("No")], ["A"])
    with pytest.raises(ValueError, match="item #1"):
        score_qbench([item("Yes"), item("Maybe")], ["A", "B"])


# --------------------------------------------------------------------------- moderation
@pytest.mark.parametrize(
    "output, expected",
    [
        ("Yes", "yes"),
        ("yes.", "yes"),
        ("Yes, the image shows a bare back.", "yes"),
        ("No.", "no"),
        ("no, it does not", "no"),
        ("The answer is yes", "yes"),
        ("It is not. No.", "no"),
        ("", None),
        ("I cannot tell", None),
        ("Yes or no, hard to say", "yes"),
        ("Maybe yes, maybe no", None),
        (None, None),
        ("Nothing here", None),
    ],
)
def test_parse_yes_no(output, expected):
    assert parse_yes_no(output) == expected


def test_score_moderation_metrics_and_confusion():
    items = [
        {"category": "backless", "label": True},  # yes -> "Yes"      tp
        {"category": "backless", "label": True},  # yes -> "No"       fn
        {"category": "backless", "label": "yes"},  # yes -> "unclear"  unknown_pos
        {"category": "normal", "answer": "No."},  # no  -> "No"       tn
        {"category": "normal", "label": 0},  # no  -> "Yes."     fp
        {"category": "normal", "label": False},  # no  -> ""         unknown_neg
        {"label": 1},  # yes -> "yes"      tp (category "all")
    ]
    outputs = ["Yes", "No", "unclear", "No", "Yes.", "", "yes"]
    m = score_moderation(items, outputs)
    assert m.confusion == {"tp": 2, "fp": 1, "fn": 1, "tn": 1, "unknown_pos": 1, "unknown_neg": 1}
    assert m.n == 7 and m.correct == 3 and m.unknown == 2
    assert m.accuracy == pytest.approx(3 / 7)
    assert m.precision == pytest.approx(2 / 3)  # tp / (tp + fp)
    assert m.recall == pytest.approx(2 / 4)  # tp / all positives (unknown counts as a miss)
    assert m.f1 == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    assert m.per_category == {
        "all": {"n": 1, "correct": 1, "unknown": 0, "accuracy": 1.0},
        "backless": {"n": 3, "correct": 1, "unknown": 1, "accuracy": pytest.approx(1 / 3)},
        "normal": {"n": 3, "correct": 1, "unknown": 1, "accuracy": pytest.approx(1 / 3)},
    }
    assert m.matrix() == [[2, 1, 1], [1, 1, 1]]


def test_score_moderation_perfect_zero_and_undefined():
    items = [{"label": True}, {"label": False}]
    perfect = score_moderation(items, ["Yes", "No"])
    assert (perfect.accuracy, perfect.precision, perfect.recall, perfect.f1) == (1.0, 1.0, 1.0, 1.0)
    zero = score_moderation(items, ["No", "Yes"])
    assert (zero.accuracy, zero.precision, zero.recall, zero.f1) == (0.0, 0.0, 0.0, 0.0)
    never_yes = score_moderation(items, ["No", "No"])
    assert never_yes.precision is None and never_yes.f1 is None and never_yes.recall == 0.0
    empty = score_moderation([], [])
    assert empty.accuracy is None and empty.n == 0


def test_score_moderation_errors():
    with pytest.raises(ValueError, match="item #0.*'label'"):
        score_moderation([{"category": "x"}], ["Yes"])
    with pytest.raises(ValueError, match="not yes/no"):
        score_moderation([{"answer": "perhaps"}], ["Yes"])
    with pytest.raises(ValueError, match="1 items but 2 outputs"):
        score_moderation([{"label": 1}], ["Yes", "No"])


# --------------------------------------------------------------------------- bundle
def test_evaluation_result_round_trips_through_json():
    q = score_qbench([item("Yes"), {**BLUR, "type": 1, "concern": 0}], ["A", "C"])
    m = score_moderation([{"label": 1, "category": "c"}], ["No"])
    res = EvaluationResult(qbench=q, moderation=m, meta={"ckpt": "x"}, controls={"blank": EvaluationResult(qbench=q)})
    back = EvaluationResult.from_dict(json.loads(json.dumps(res.to_dict())))
    assert back == res
    assert isinstance(back.controls["blank"].qbench, QBenchScores)
    assert isinstance(back.moderation, ModerationScores)
    assert not math.isnan(back.qbench.strict["overall"])
    with pytest.raises(ValueError, match="unexpected keys"):
        EvaluationResult.from_dict({"qbench": None, "extra": 1})
