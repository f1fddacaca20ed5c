"""Tests for icmlab.evaluate.report: files written, numbers shown, figures decodable, gallery contents."""

from __future__ import annotations

import base64
import io
import re

import pytest
from matplotlib.figure import Figure
from PIL import Image

from icmlab.evaluate.report import (
    HTML,
    GalleryItem,
    build_report,
    confusion_figure,
    controls_figure,
    gallery_from_records,
    gallery_html,
    moderation_table_html,
    qbench_bar_figure,
    qbench_table_html,
)
from icmlab.evaluate.scoring import EvaluationResult, score_moderation, score_qbench
from icmlab.io import read_json

ITEMS = [
    {
        "question": "Is the image <b>clear</b>?",
        "candidates": ["Yes", "No"],
        "correct_ans": "No",
        "type": 0,
        "concern": 0,
    },
    {
        "question": "What distortion?",
        "candidates": ["noise", "blur", "glare"],
        "correct_ans": "blur",
        "type": 1,
        "concern": 1,
    },
    {"question": "How is the light?", "candidates": ["good", "poor"], "correct_ans": "good", "type": 2, "concern": 2},
    {"question": "Is it noisy?", "candidates": ["Yes", "No"], "correct_ans": "Yes", "type": 0, "concern": 3},
    {
        "question": "What is wrong?",
        "candidates": ["nothing", "blur"],
        "correct_ans": "nothing",
        "type": 1,
        "concern": 0,
    },
]
MOD_ITEMS = [
    {"category": "symbol", "label": True, "question": "Forbidden symbol?"},
    {"category": "symbol", "label": False, "question": "Forbidden symbol?"},
    {"category": "plain", "label": False, "question": "Forbidden symbol?"},
    {"category": "plain", "label": True, "question": "Forbidden symbol?"},
]


@pytest.fixture(scope="module")
def evaluations():
    # baseline: strict 2/5 = 40 %, substring 3/5 = 60 % ("A. Yes, but B" is B by substring only)
    base_q = score_qbench(ITEMS, ["A. Yes, but B", "B", "B", "A", "I cannot tell"])
    # fine-tuned: all right
    ft_q = score_qbench(ITEMS, ["B", "B.", "(A)", "A", "A"])
    blank_q = score_qbench(ITEMS, ["A", "A", "A", "A", "A"])  # always A: 3/5
    base_m = score_moderation(MOD_ITEMS, ["Yes", "Yes", "No", "dunno"])  # acc 2/4
    ft_m = score_moderation(MOD_ITEMS, ["Yes", "No", "No", "Yes"])  # acc 4/4
    blank_m = score_moderation(MOD_ITEMS, ["No", "No", "No", "No"])  # acc 2/4
    return {
        "baseline": EvaluationResult(qbench=base_q, moderation=base_m, meta={"checkpoint": "llava-1.5-7b"}),
        "fine-tuned": EvaluationResult(
            qbench=ft_q,
            moderation=ft_m,
            meta={"checkpoint": "runs/x"},
            controls={"blank": EvaluationResult(qbench=blank_q, moderation=blank_m)},
        ),
    }


@pytest.fixture(scope="module")
def images():
    return [Image.new("RGB", (32 + 4 * i, 32), (40 * i, 100, 200)) for i in range(len(ITEMS))]


@pytest.fixture(scope="module")
def report(tmp_path_factory, evaluations, images):
    out = tmp_path_factory.mktemp("report")
    gallery = gallery_from_records(ITEMS, images, evaluations, task="qbench", n=3)
    path = build_report(out, evaluations, gallery, title="tiny <eval>")
    return out, path, path.read_text(encoding="utf-8")


def _cells(page: str, row_label: str) -> list[str]:
    """Cell texts of the first table row whose first cell is ``row_label``."""
    m = re.search(r"<tr[^>]*><td>" + re.escape(row_label) + r"</td>(.*?)</tr>", page)
    assert m, f"row {row_label!r} not found"
    return re.findall(r"<td>(.*?)</td>", m.group(1))


def test_files_exist_and_pngs_decode(report):
    out, path, _ = report
    assert path == out / "report.html"
    for name in ("qbench_strict", "qbench_substring", "qbench_exact", "moderation_confusion", "controls"):
        png = out / f"{name}.png"
        with Image.open(png) as im:
            im.verify()
        with Image.open(png) as im:
            assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200
    assert not list(out.glob(".*.tmp"))  # atomic writes left no temporaries


def test_html_embeds_the_figures(report):
    out, _, page = report
    srcs = re.findall(r'<img class="fig" alt="([^"]+)" src="data:image/png;base64,([^"]+)"', page)
    assert {alt for alt, _ in srcs} == {
        "qbench_strict",
        "qbench_substring",
        "qbench_exact",
        "moderation_confusion",
        "controls",
    }
    for alt, b64 in srcs:
        assert base64.b64decode(b64) == (out / f"{alt}.png").read_bytes()
    assert not re.search(r'src="(?!data:)', page)  # self-contained: nothing loaded from elsewhere


def _acc(cell: str) -> str:
    """The accuracy of a "40.00 [11.8, 76.9]" cell."""
    return cell.split(" [")[0]


def test_html_shows_the_input_numbers(report):
    _, _, page = report
    # the strict table comes first, then the substring and exact ones: the same row labels appear in all
    strict = page[page.index("Q-Bench A1, scorer: strict") :]
    strict_base = _cells(strict, "baseline")
    assert _acc(strict_base[-2]) == "40.00" and strict_base[-1] == "1"  # overall; unparsed: "I cannot tell"
    assert _acc(strict_base[0]) == "50.00"  # Yes/No, see test_yes_no_column_by_hand
    substring_part = page[page.index("Q-Bench A1, scorer: Q-Instruct substring") :]
    assert _acc(_cells(substring_part, "baseline")[-2]) == "60.00"
    exact_part = page[page.index("Q-Bench A1, scorer: VLMEvalKit-style exact") :]
    assert _acc(_cells(exact_part, "fine-tuned")[-2]) == "100.00"  # B, B., (A), A, A are all exact
    assert _acc(_cells(strict, "fine-tuned")[-2]) == "100.00"
    assert _cells(strict, "Δ fine-tuned vs baseline")[-2:] == ["+60.00", ""]
    assert _cells(strict, "Δ fine-tuned vs fine-tuned · blank")[-2:] == ["+40.00", ""]
    assert _acc(_cells(strict, "fine-tuned · blank")[-2]) == "60.00"
    assert _cells(strict, "items") == ["2", "2", "1", "2", "1", "1", "1", "5", ""]
    # the controls sit right after the baseline, before the fine-tuned row
    assert strict.index("<td>fine-tuned · blank</td>") < strict.index("<td>fine-tuned</td>")
    # moderation: n, accuracy [CI], precision, recall, F1, TP, FP, FN, TN, unknown
    mod = page[page.index("<h2>ICM-Val moderation</h2>") :]
    cells = _cells(mod, "baseline")
    assert [cells[0], _acc(cells[1])] + cells[2:] == ["4", "50.00", "50.00", "50.00", "50.00", "1", "1", "0", "1", "1"]
    assert [_cells(mod, "fine-tuned")[0], _acc(_cells(mod, "fine-tuned")[1])] == ["4", "100.00"]
    assert "tiny &lt;eval&gt;" in page and "llava-1.5-7b" in page


def test_yes_no_column_by_hand(evaluations):
    # Yes/No items are #0 (correct B) and #3 (correct A); baseline answered "A. Yes, but B" and "A":
    # strict 1/2 (item 3), substring 2/2 (item 0 contains "B", item 3 is "A").
    q = evaluations["baseline"].qbench
    assert q.strict["yes_no"] == 0.5 and q.substring["yes_no"] == 1.0


def test_gallery(report, evaluations, images):
    _, _, page = report
    gallery = gallery_from_records(ITEMS, images, evaluations, task="qbench", n=3)
    assert len(gallery) == 3
    # the models disagree (strict) on items 0, 2 and 4 (baseline wrong, fine-tuned right): those come first
    assert {g.reference for g in gallery} == {"B. No", "A. good", "A. nothing"}
    g0 = next(g for g in gallery if g.reference == "B. No")
    assert g0.predictions == {"baseline": "A. Yes, but B", "fine-tuned": "B"}
    assert g0.correct == {"baseline": False, "fine-tuned": True}
    assert "Is the image &lt;b&gt;clear&lt;/b&gt;?" in page  # question text escaped
    assert page.count('alt="example image"') == 3 and page.count("data:image/png;base64,") == 5 + 3
    assert "✓" in page and "✗" in page
    mod = gallery_from_records(MOD_ITEMS, images[:4], evaluations, task="moderation", n=10)
    assert len(mod) == 4 and {g.reference for g in mod} == {"yes", "no"}


def test_rebuild_from_scores_json(report, tmp_path):
    out, _, page = report
    saved = read_json(out / "scores.json")
    assert saved["baseline"]["qbench"]["strict"]["overall"] == pytest.approx(0.4)
    again = build_report(tmp_path, saved).read_text(encoding="utf-8")
    assert _cells(again, "Δ fine-tuned vs baseline") == _cells(page, "Δ fine-tuned vs baseline")
    assert 'alt="example image"' not in again


def test_qbench_only_report_has_no_moderation(tmp_path, evaluations):
    only_q = {k: EvaluationResult(qbench=v.qbench) for k, v in evaluations.items()}
    page = build_report(tmp_path, only_q).read_text(encoding="utf-8")
    assert "<h2>ICM-Val moderation</h2>" not in page and not (tmp_path / "moderation_confusion.png").exists()
    assert not (tmp_path / "controls.png").exists()
    assert (tmp_path / "qbench_strict.png").exists()


def test_notebook_helpers(evaluations):
    table = qbench_table_html(evaluations, "substring")
    assert isinstance(table, HTML) and table._repr_html_().startswith("<table")
    assert "60.00" in table and "random guess" in table
    assert "precision" in moderation_table_html(evaluations)
    for fig in (qbench_bar_figure(evaluations, "strict"), controls_figure(evaluations), confusion_figure(evaluations)):
        assert isinstance(fig, Figure) and fig.axes
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        assert buf.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"
    # three confusion panels: baseline, fine-tuned, fine-tuned · blank
    assert [ax.get_title() for ax in confusion_figure(evaluations).axes] == [
        "baseline",
        "fine-tuned",
        "fine-tuned · blank",
    ]


def test_errors(tmp_path, evaluations, images):
    with pytest.raises(ValueError, match="no evaluations"):
        build_report(tmp_path, {})
    with pytest.raises(ValueError, match="expected EvaluationResult"):
        build_report(tmp_path, {"x": 3})
    with pytest.raises(FileNotFoundError, match="nope.png"):
        gallery_html([GalleryItem(image=tmp_path / "nope.png", question="q", reference="A")])
    with pytest.raises(ValueError, match="5 items but 2 images"):
        gallery_from_records(ITEMS, images[:2], evaluations)
    with pytest.raises(ValueError, match="no moderation scores"):
        gallery_from_records(ITEMS, images, evaluations, task="moderation")
