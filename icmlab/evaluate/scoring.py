"""Pure scorers for the evaluate stage: Q-Bench A1 (LLVisionQA) multiple choice and Yes/No moderation.

No disk, model or global state: items (dicts) and decoded outputs (strings) in, numbers or small
dataclasses out, so a 7B run on a GPU box and a hand-written unit-test case share one code path.

Q-Bench A1 (Q-Instruct ``eval_scripts/*/eval_qbench_mcq.py``):

- ``qbench_prompt(item, style)`` builds the question text ("llava": the instruction before the
  options, as the LLaVA script does; "mplug": after them, as the mPLUG-Owl2 script does).
- Upstream counts an answer as correct when the correct letter occurs *anywhere* in the output
  (``substring_correct``). That over-counts: "A. blurry, but B is possible" is right for A *and* B.
  We therefore report two accuracies side by side: ``substring`` (upstream's number, comparable with
  the paper) and ``strict`` (``parse_choice`` finds one chosen letter, or none).
- A third reading, ``exact`` (VLMEvalKit-style exact matching, :func:`exact_choice`), accepts only
  an output that *is* an option: the letter ("B", "B.", "(B)"), the letter with its text, or the
  text alone; "The answer is B" is None there. Every table names the scorer it shows.
- ``score_qbench(items, outputs)`` gives all three per column of the paper's table (Yes/No, What, How,
  Distortion, Other, In-context Distortion, In-context Other, Overall) with the counts.

Moderation (ICM-Instruct style Yes/No questions, positive = "yes, the image violates the rule"):

- ``parse_yes_no(output)`` -> "yes" | "no" | None.
- ``score_moderation(items, outputs)`` gives accuracy per category and overall, precision/recall/F1
  of the positive class and the confusion counts; unparseable answers are counted separately and
  scored as wrong.

``EvaluationResult`` bundles the scores of one model (plus its blank/shuffled-image controls); it
round-trips through ``to_dict``/``from_dict`` so ``evaluate.run`` can save it as JSON and the report
(``icmlab.evaluate.report``) can be rebuilt from that file in a notebook.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Sequence

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
QBENCH_INSTRUCTION = "Answer with the option's letter from the given choices directly."

# Column keys in the paper's order (upstream-recipes §1.8) with their display names.
QBENCH_COLUMN_NAMES: dict[str, str] = {
    "yes_no": "Yes/No",
    "what": "What",
    "how": "How",
    "distortion": "Distortion",
    "other": "Other",
    "in_context_distortion": "I-C Distortion",
    "in_context_other": "I-C Other",
    "overall": "Overall",
}
QBENCH_COLUMNS: tuple[str, ...] = tuple(QBENCH_COLUMN_NAMES)
_TYPE_CODES = {0: "yes_no", 1: "what", 2: "how"}
_CONCERN_CODES = {0: "distortion", 1: "other", 2: "in_context_distortion", 3: "in_context_other"}
# Spellings seen in LLVisionQA releases and re-packagings (ints in the JSON, words elsewhere).
_TYPE_WORDS = {"yesorno": "yes_no", "yesno": "yes_no", "what": "what", "how": "how"}
_CONCERN_WORDS = {
    "distortion": "distortion",
    "distortions": "distortion",
    "other": "other",
    "others": "other",
    "incontextdistortion": "in_context_distortion",
    "incontextdistortions": "in_context_distortion",
    "incontextother": "in_context_other",
    "incontextothers": "in_context_other",
}


# --------------------------------------------------------------------------- Q-Bench: prompt
def qbench_prompt(item: dict, style: Literal["llava", "mplug", "options_first"] = "llava") -> str:
    """Build the Q-Bench A1 question text exactly as the Q-Instruct eval scripts do.

    ``"llava"`` (default, ``eval_scripts/llava_v1.5``)::

        {question}\\nAnswer with the option's letter from the given choices directly.\\nA. …\\nB. …\\n

    ``"mplug"`` (``eval_scripts/mplug_owl_2``): the options come right after the question (upstream
    adds no newline between them) and the instruction follows::

        {question}A. …\\nB. …\\n\\nAnswer with the option's letter from the given choices directly.\\n

    ``"options_first"``: ``{question}\\nA. …\\nB. …\\nAnswer with …`` (Q-Instruct's training records).

    The result is the user turn's text only; the model family's chat template and image token are
    added by ``icmlab.evaluate.generation``.

    Args:
        item: an LLVisionQA record with ``question`` and ``candidates``.
        style: which upstream script to reproduce.

    Returns:
        The question text.

    Raises:
        ValueError: if the item lacks ``question``/``candidates`` or the style is unknown.
    """
    question, candidates = _question_and_candidates(item)
    options = "".join(f"{LETTERS[i]}. {c}\n" for i, c in enumerate(candidates))
    if style == "llava":
        return f"{question}\n{QBENCH_INSTRUCTION}\n{options}"
    if style == "mplug":
        return f"{question}{options}\n{QBENCH_INSTRUCTION}\n"
    if style == "options_first":  # the layout of Q-Instruct's multiple-choice training records
        return f"{question}\n{options}{QBENCH_INSTRUCTION}"
    raise ValueError(f"qbench_prompt: unknown style {style!r}; use 'llava', 'mplug' or 'options_first'")


def _question_and_candidates(item: dict) -> tuple[str, list[str]]:
    if not isinstance(item, dict) or "question" not in item or "candidates" not in item:
        raise ValueError(f"Q-Bench item {str(item)[:80]!r} needs 'question' and 'candidates' (LLVisionQA format)")
    candidates = [str(c) for c in item["candidates"]]
    if not 2 <= len(candidates) <= len(LETTERS):
        raise ValueError(f"Q-Bench item {item['question']!r}: needs 2..26 candidates, got {len(candidates)}")
    return str(item["question"]), candidates


def correct_letter(item: dict) -> str:
    """Return the letter of an item's correct answer.

    LLVisionQA stores the answer *text* in ``correct_ans``; it is matched against ``candidates``
    exactly, then ignoring case and surrounding spaces/periods. A bare letter ("B") is accepted
    when no candidate has that text.

    Raises:
        ValueError: if ``correct_ans`` is missing or matches no candidate. (The upstream LLaVA script
            silently reuses the previous item's letter in that case.)
    """
    _, candidates = _question_and_candidates(item)
    if "correct_ans" not in item:
        raise ValueError(f"Q-Bench item {item['question']!r}: no 'correct_ans' (the test split has none)")
    ans = str(item["correct_ans"])
    if ans in candidates:
        return LETTERS[candidates.index(ans)]
    normed = [_norm(c) for c in candidates]
    if _norm(ans) in normed:
        return LETTERS[normed.index(_norm(ans))]
    if len(ans) == 1 and ans in LETTERS[: len(candidates)]:
        return ans
    raise ValueError(
        f"Q-Bench item {item['question']!r}: correct_ans {ans!r} is not one of the candidates {candidates}"
    )


# --------------------------------------------------------------------------- Q-Bench: parsing
def _norm(text: str) -> str:
    """Casefold and drop surrounding whitespace, quotes and final punctuation."""
    return text.strip().strip("\"'`*").rstrip(".!;,").strip().casefold()


_LEADING = re.compile(r"^[(\[]?([A-Z])([)\]]?)(.*)$", re.S)
_STATED = re.compile(r"\b(?i:answer|option|choice)\b(?:\s+(?i:is))?\s*[:\-]?\s*[(\[]?([A-Z])\b")


def parse_choice(output: str, n_options: int, candidates: Sequence[str] | None = None) -> str | None:
    """Find the single option letter an output chooses (the strict reading), or None.

    Accepted, in this order:

    1. the output equals a candidate's text (case and final period ignored) -> that letter;
    2. the output starts with the letter, bare or bracketed, followed by the end, punctuation, or
       whitespace plus that option's text: "B", "B.", "(B)", "B) blurry", "B. blurry", "B blurry";
    3. it states the answer: "The answer is B", "Answer: (B)", "option B" — when all such phrases
       name the same letter.

    Anything else ("I cannot tell", "A blurry image", "", a letter beyond ``n_options``) is None.
    "A. blurry, but B is possible" reads as A (rule 2), while upstream's substring rule counts it
    right for both A and B.

    Args:
        output: the decoded model output.
        n_options: number of options; letters beyond it are rejected.
        candidates: the option texts, enabling rule 1 and the "B blurry" form of rule 2.

    Returns:
        The chosen letter ("A".."Z") or None.

    Raises:
        ValueError: if ``n_options`` is out of range or disagrees with ``len(candidates)``.
    """
    if not 1 <= n_options <= len(LETTERS):
        raise ValueError(f"parse_choice: n_options must be in 1..26, got {n_options}")
    if candidates is not None and len(candidates) != n_options:
        raise ValueError(f"parse_choice: {len(candidates)} candidates but n_options={n_options}")
    text = (output or "").strip()
    if text.endswith("</s>"):  # the mPLUG-Owl2 script decodes without skipping special tokens
        text = text[: -len("</s>")].strip()
    if not text:
        return None
    letters = LETTERS[:n_options]
    if candidates is not None:
        normed = [_norm(c) for c in candidates]
        if _norm(text) in normed:
            return letters[normed.index(_norm(text))]
    m = _LEADING.match(text)
    if m and m.group(1) in letters:
        letter, closed, rest = m.group(1), m.group(2), m.group(3)
        if rest == "" or rest[0] in ".):;," or closed:  # "B", "B.", "(B)", "B) blurry"
            return letter
        if rest[0].isspace() and candidates is not None and _norm(rest) == _norm(candidates[letters.index(letter)]):
            return letter
    stated = {s for s in _STATED.findall(text) if s in letters}
    if len(stated) == 1:
        return stated.pop()
    return None


def exact_choice(output: str, candidates: Sequence[str]) -> str | None:
    """VLMEvalKit-style exact matching: the letter when the whole output is one option, else None.

    Accepted (surrounding whitespace, a trailing ``</s>`` and a final period ignored): ``"B"``,
    ``"(B)"``, ``"B)"``, ``"B. blurry"`` / ``"B blurry"`` (letter plus that option's text) and
    ``"blurry"`` (the option's text). Anything with more words is None, so this is the strictest
    of the three readings.
    """
    text = (output or "").strip()
    if text.endswith("</s>"):
        text = text[: -len("</s>")].strip()
    letters = LETTERS[: len(candidates)]
    body = text.rstrip(".").strip()
    m = re.fullmatch(r"[(\[]?([A-Z])[)\]]?", body)
    if m and m.group(1) in letters:
        return m.group(1)
    for letter, cand in zip(letters, candidates):
        if _norm(text) == _norm(cand):
            return letter
        if text[:1] == letter and text[1:2] in (".", ")", " ") and _norm(text[1:].lstrip(".)")) == _norm(cand):
            return letter
    return None


def substring_correct(output: str, correct: str) -> bool:
    """Upstream's rule: right when the correct letter occurs anywhere in the output (case-sensitive).

    Note it also fires on capital letters inside words ("Answer: B" contains "A").
    """
    return bool(correct) and correct in (output or "")


# --------------------------------------------------------------------------- Q-Bench: scores
def _code(item: dict, keys: tuple[str, str], codes: dict[int, str], words: dict[str, str], what: str) -> str | None:
    value = item.get(keys[0], item.get(keys[1]))
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"Q-Bench item {item.get('question')!r}: {what} {value!r} is not a valid code")
    if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        if int(value) in codes:
            return codes[int(value)]
    elif isinstance(value, str):
        key = re.sub(r"[^a-z]", "", value.lower())
        if key in words:
            return words[key]
    raise ValueError(
        f"Q-Bench item {item.get('question')!r}: {what} {value!r} is not one of "
        f"{sorted(codes)} / {sorted(set(codes.values()))}"
    )


def item_columns(item: dict) -> list[str]:
    """Columns an item counts in: its type column, its concern column, and ``overall``.

    ``type`` (or ``question_type``): 0 yes-or-no, 1 what, 2 how; ``concern`` (or
    ``question_concern``): 0 distortion, 1 other, 2 in-context distortion, 3 in-context other. Word
    forms ("yes-or-no", "in-context others") are accepted. A missing field puts the item in Overall
    only (custom data without these tags).

    Raises:
        ValueError: on a present but unknown code.
    """
    cols = []
    t = _code(item, ("type", "question_type"), _TYPE_CODES, _TYPE_WORDS, "type")
    c = _code(item, ("concern", "question_concern"), _CONCERN_CODES, _CONCERN_WORDS, "concern")
    if t:
        cols.append(t)
    if c:
        cols.append(c)
    cols.append("overall")
    return cols


class _Serializable:
    """``to_dict``/``from_dict`` for the flat score dataclasses (JSON round trip)."""

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        """Inverse of ``to_dict``."""
        return cls(**d)


@dataclass
class QBenchScores(_Serializable):
    """Q-Bench A1 accuracies (fractions 0..1; None for a column with no items).

    Attributes:
        strict: per column, share of items whose ``parse_choice`` letter is the correct one.
        substring: per column, share counted correct by upstream's substring rule.
        counts: items per column.
        strict_correct, substring_correct: correct items per column.
        unparsed: outputs with no strict letter (they are wrong under ``strict``).
        chance: per column, expected accuracy of a uniform random guess (mean of 1/#options),
            the paper's "random guess" row.
        records: one dict per item (index, columns, n_options, correct, parsed, strict_ok,
            substring_ok, exact_ok, output).
        exact, exact_correct: as strict, under :func:`exact_choice` (VLMEvalKit-style).
    """

    strict: dict[str, float | None]
    substring: dict[str, float | None]
    counts: dict[str, int]
    strict_correct: dict[str, int]
    substring_correct: dict[str, int]
    unparsed: int
    chance: dict[str, float | None] = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)
    exact: dict[str, float | None] = field(default_factory=dict)
    exact_correct: dict[str, int] = field(default_factory=dict)


#: The Q-Bench scorers, in report order, with the name every table caption uses.
QBENCH_SCORERS: dict[str, str] = {
    "strict": "strict letter (icmlab: the one letter the answer chooses)",
    "substring": "Q-Instruct substring (eval_qbench_mcq.py: the correct letter anywhere in the output)",
    "exact": "VLMEvalKit-style exact (the whole answer is one option)",
}


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def score_qbench(items: Sequence[dict], outputs: Sequence[str]) -> QBenchScores:
    """Score model outputs on Q-Bench A1 items, strict and substring, per paper column.

    Args:
        items: LLVisionQA records (``question``, ``candidates``, ``correct_ans``, ``type``, ``concern``).
        outputs: decoded outputs, one per item, same order.

    Returns:
        QBenchScores.

    Raises:
        ValueError: if the lengths differ or an item is malformed (message names the item index).
    """
    if len(items) != len(outputs):
        raise ValueError(f"score_qbench: {len(items)} items but {len(outputs)} outputs")
    counts = dict.fromkeys(QBENCH_COLUMNS, 0)
    strict_ok = dict.fromkeys(QBENCH_COLUMNS, 0)
    sub_ok = dict.fromkeys(QBENCH_COLUMNS, 0)
    exact_ok = dict.fromkeys(QBENCH_COLUMNS, 0)
    chance_sum = dict.fromkeys(QBENCH_COLUMNS, 0.0)
    unparsed, records = 0, []
    for i, (item, out) in enumerate(zip(items, outputs)):
        try:
            _, candidates = _question_and_candidates(item)
            gold = correct_letter(item)
            cols = item_columns(item)
        except ValueError as e:
            raise ValueError(f"Q-Bench item #{i}: {e}") from None
        parsed = parse_choice(out, len(candidates), candidates)
        s_ok, u_ok = parsed == gold, substring_correct(out, gold)
        e_ok = exact_choice(out, candidates) == gold
        unparsed += parsed is None
        for col in cols:
            counts[col] += 1
            strict_ok[col] += s_ok
            sub_ok[col] += u_ok
            exact_ok[col] += e_ok
            chance_sum[col] += 1 / len(candidates)
        records.append(
            {
                "index": i,
                "columns": cols,
                "n_options": len(candidates),
                "correct": gold,
                "parsed": parsed,
                "strict_ok": s_ok,
                "substring_ok": u_ok,
                "exact_ok": e_ok,
                "output": out,
            }
        )
    return QBenchScores(
        strict={c: _ratio(strict_ok[c], counts[c]) for c in QBENCH_COLUMNS},
        substring={c: _ratio(sub_ok[c], counts[c]) for c in QBENCH_COLUMNS},
        counts=counts,
        strict_correct=strict_ok,
        substring_correct=sub_ok,
        unparsed=unparsed,
        chance={c: (chance_sum[c] / counts[c] if counts[c] else None) for c in QBENCH_COLUMNS},
        records=records,
        exact={c: _ratio(exact_ok[c], counts[c]) for c in QBENCH_COLUMNS},
        exact_correct=exact_ok,
    )


# --------------------------------------------------------------------------- moderation
_YES = {"yes", "yeah", "yep", "true"}
_NO = {"no", "nope", "false"}
_WORD = re.compile(r"[a-z]+")


def parse_yes_no(output: str) -> Literal["yes", "no"] | None:
    """Read a Yes/No answer: the first word decides ("Yes.", "no, it does not"), else a lone
    "yes" or "no" elsewhere in the text ("The answer is yes"); both or neither -> None."""
    words = _WORD.findall((output or "").lower())
    if not words:
        return None
    if words[0] in _YES:
        return "yes"
    if words[0] in _NO:
        return "no"
    has_yes, has_no = any(w in _YES for w in words), any(w in _NO for w in words)
    if has_yes != has_no:
        return "yes" if has_yes else "no"
    return None


def moderation_label(item: dict) -> Literal["yes", "no"]:
    """Ground truth of a moderation item: ``label`` (bool, 0/1, "yes"/"no") or the ``answer`` text.

    Raises:
        ValueError: if neither gives a clear yes/no.
    """
    if "label" in item:
        lab = item["label"]
        if isinstance(lab, bool) or lab in (0, 1):
            return "yes" if lab else "no"
        parsed = parse_yes_no(str(lab))
    elif "answer" in item:
        parsed = parse_yes_no(str(item["answer"]))
    else:
        raise ValueError("moderation item needs 'label' (true = violating) or 'answer' ('Yes.'/'No.')")
    if parsed is None:
        raise ValueError(f"moderation item label/answer {item.get('label', item.get('answer'))!r} is not yes/no")
    return parsed


@dataclass
class ModerationScores(_Serializable):
    """Yes/No moderation metrics; positive class = "yes" (violating).

    Attributes:
        n, correct, unknown: totals (unknown = output neither yes nor no; scored wrong).
        accuracy: correct / n.
        precision: tp / (tp + fp) — unknown outputs are not positive predictions.
        recall: tp / (all truly positive items) — an unknown answer on a positive is a miss.
        f1: harmonic mean of precision and recall.
        confusion: ``tp, fp, fn, tn, unknown_pos, unknown_neg``.
        per_category: category -> ``{n, correct, unknown, accuracy}``.
        records: one dict per item (index, category, truth, parsed, ok, output).
    """

    n: int
    correct: int
    unknown: int
    accuracy: float | None
    precision: float | None
    recall: float | None
    f1: float | None
    confusion: dict[str, int]
    per_category: dict[str, dict]
    records: list[dict] = field(default_factory=list)

    def matrix(self) -> list[list[int]]:
        """Rows truth [yes, no], columns prediction [yes, no, unknown]."""
        c = self.confusion
        return [[c["tp"], c["fn"], c["unknown_pos"]], [c["fp"], c["tn"], c["unknown_neg"]]]


def score_moderation(items: Sequence[dict], outputs: Sequence[str]) -> ModerationScores:
    """Score Yes/No moderation outputs.

    Args:
        items: dicts with ``label`` or ``answer`` (see ``moderation_label``) and optional ``category``
            (default ``"all"``).
        outputs: decoded outputs, one per item.

    Returns:
        ModerationScores.

    Raises:
        ValueError: on a length mismatch or an item without a yes/no truth (names the index).
    """
    if len(items) != len(outputs):
        raise ValueError(f"score_moderation: {len(items)} items but {len(outputs)} outputs")
    conf = dict.fromkeys(("tp", "fp", "fn", "tn", "unknown_pos", "unknown_neg"), 0)
    per_cat: dict[str, dict] = {}
    records = []
    for i, (item, out) in enumerate(zip(items, outputs)):
        try:
            truth = moderation_label(item)
        except ValueError as e:
            raise ValueError(f"moderation item #{i}: {e}") from None
        pred = parse_yes_no(out)
        key = {
            ("yes", "yes"): "tp",
            ("yes", "no"): "fn",
            ("yes", None): "unknown_pos",
            ("no", "yes"): "fp",
            ("no", "no"): "tn",
            ("no", None): "unknown_neg",
        }[(truth, pred)]
        conf[key] += 1
        cat = str(item.get("category", "all"))
        row = per_cat.setdefault(cat, {"n": 0, "correct": 0, "unknown": 0, "accuracy": None})
        row["n"] += 1
        row["correct"] += pred == truth
        row["unknown"] += pred is None
        records.append(
            {"index": i, "category": cat, "truth": truth, "parsed": pred, "ok": pred == truth, "output": out}
        )
    for row in per_cat.values():
        row["accuracy"] = _ratio(row["correct"], row["n"])
    n = len(items)
    correct = conf["tp"] + conf["tn"]
    precision = _ratio(conf["tp"], conf["tp"] + conf["fp"])
    recall = _ratio(conf["tp"], conf["tp"] + conf["fn"] + conf["unknown_pos"])
    if precision is None or recall is None:
        f1 = None
    else:
        f1 = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return ModerationScores(
        n=n,
        correct=correct,
        unknown=conf["unknown_pos"] + conf["unknown_neg"],
        accuracy=_ratio(correct, n),
        precision=precision,
        recall=recall,
        f1=f1,
        confusion=conf,
        per_category=dict(sorted(per_cat.items())),
        records=records,
    )


# --------------------------------------------------------------------------- ICM MQA and MEQ
_MQA_CHOICES = frozenset("ABCDYN")


def mqa_correct(output: str, answer: str) -> bool:
    """ICM-Assistant's MQA rule (``eval_data_analysis_mqa/eval_sexy_short_qa.py``): the first
    character of the output, upper-cased, must be one of A-D / Y / N and equal the first character
    of the reference ("B." vs "B", "Yes" vs "yes, it is")."""
    out, ref = (output or "").strip().upper(), (answer or "").strip().upper()
    return bool(out) and bool(ref) and out[0] in _MQA_CHOICES and out[0] == ref[0]


@dataclass
class MQAScores(_Serializable):
    """Moderation question answering (ICM-Assistant Table 4 "MQA acc."): accuracy overall and per
    ``kind`` (``mc`` multiple choice, ``open`` Yes/No open questions), with records."""

    n: int
    correct: int
    accuracy: float | None
    per_kind: dict[str, dict]
    records: list[dict] = field(default_factory=list)


def score_mqa(items: Sequence[dict], outputs: Sequence[str]) -> MQAScores:
    """Score MQA outputs with :func:`mqa_correct`.

    Raises:
        ValueError: on a length mismatch or an item without ``answer`` (names the index).
    """
    if len(items) != len(outputs):
        raise ValueError(f"score_mqa: {len(items)} items but {len(outputs)} outputs")
    per_kind: dict[str, dict] = {}
    records = []
    for i, (item, out) in enumerate(zip(items, outputs)):
        if not str(item.get("answer", "")).strip():
            raise ValueError(f"MQA item #{i}: no 'answer' (expected e.g. 'B.' or 'Yes.')")
        ok = mqa_correct(out, str(item["answer"]))
        kind = str(item.get("kind", "mc"))
        row = per_kind.setdefault(kind, {"n": 0, "correct": 0, "accuracy": None})
        row["n"] += 1
        row["correct"] += ok
        records.append({"index": i, "kind": kind, "answer": item["answer"], "ok": ok, "output": out})
    for row in per_kind.values():
        row["accuracy"] = _ratio(row["correct"], row["n"])
    correct = sum(r["ok"] for r in records)
    return MQAScores(len(items), correct, _ratio(correct, len(items)), dict(sorted(per_kind.items())), records)


MEQ_CRITERIA: tuple[str, ...] = ("Accuracy", "Preciseness", "Comprehensiveness", "Fluency")
"""The judge's four 0-100 criteria (ICM-Assistant ``eval_data_analysis_meq/prompting_ChatGPT.txt``)."""


@dataclass
class MEQScores(_Serializable):
    """Moderation explanation quality, judged by a chat model against the reference explanation.

    Attributes:
        n: explanations judged.
        criteria: criterion -> mean score 0-100 (an unparsable verdict counts 0, as upstream's
            ``eval_meq/eval.py``).
        meq: mean of the four criteria / 100 (our reading of the paper's single MEQ number).
        unparsed: verdicts without all four scores.
        judge: judge model name and endpoint host (never the key).
        records: index, category, output, scores, verdict text.
    """

    n: int
    criteria: dict[str, float]
    meq: float | None
    unparsed: int
    judge: dict[str, str] = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)


# --------------------------------------------------------------------------- bundle
@dataclass
class EvaluationResult:
    """Everything scored for one model: Q-Bench, moderation, and control runs of the same model.

    Attributes:
        qbench: Q-Bench A1 scores, or None if not run.
        moderation: ICM-Val yes/no moderation scores, or None if not run.
        icm_test: ICM-Test yes/no scores (``per_category`` = subset, e.g. UGC / AIGC / Porn).
        mqa: ICM moderation question answering accuracy.
        meq: ICM moderation explanation quality (judged).
        controls: control name ("blank", "shuffled") -> EvaluationResult of the same model with the
            images replaced; a model that reads pixels should fall towards chance there.
        meta: free-form facts (checkpoint path, decoding settings, timings).
    """

    qbench: QBenchScores | None = None
    moderation: ModerationScores | None = None
    controls: dict[str, "EvaluationResult"] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    icm_test: ModerationScores | None = None
    mqa: MQAScores | None = None
    meq: MEQScores | None = None

    def to_dict(self) -> dict:
        """JSON-ready dict (nested controls included)."""
        return {
            "qbench": self.qbench.to_dict() if self.qbench else None,
            "moderation": self.moderation.to_dict() if self.moderation else None,
            "icm_test": self.icm_test.to_dict() if self.icm_test else None,
            "mqa": self.mqa.to_dict() if self.mqa else None,
            "meq": self.meq.to_dict() if self.meq else None,
            "controls": {k: v.to_dict() for k, v in self.controls.items()},
            "meta": dict(self.meta),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "EvaluationResult":
        """Inverse of ``to_dict``.

        Raises:
            ValueError: if ``d`` has keys other than qbench/moderation/controls/meta.
        """
        extra = set(d) - {"qbench", "moderation", "icm_test", "mqa", "meq", "controls", "meta"}
        if extra:
            raise ValueError(f"EvaluationResult.from_dict: unexpected keys {sorted(extra)}")
        return cls(
            qbench=QBenchScores.from_dict(d["qbench"]) if d.get("qbench") else None,
            moderation=ModerationScores.from_dict(d["moderation"]) if d.get("moderation") else None,
            icm_test=ModerationScores.from_dict(d["icm_test"]) if d.get("icm_test") else None,
            mqa=MQAScores.from_dict(d["mqa"]) if d.get("mqa") else None,
            meq=MEQScores.from_dict(d["meq"]) if d.get("meq") else None,
            controls={k: cls.from_dict(v) for k, v in (d.get("controls") or {}).items()},
            meta=dict(d.get("meta") or {}),
        )
