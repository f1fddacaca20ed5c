"""The papers' own numbers, to print beside ours with a Δ column.

Sources (every value is a fraction 0..1, as the report's accuracies):

- Q-Bench A1, Q-Instruct repository ``benchmark_results/mcq_dev.png`` and ``mcq_test.png``
  (Q-Future/Q-Instruct, transcribed in ``shared/reference/upstream-recipes.md`` §1.8): per paper
  column for the dev split; the test split's table gives Overall for every model and Yes/No, What,
  How for the 7B "mix" models only (the other cells are None: not published in text we could read).
- ICM-Assistant ``benchmark_results/table2.jpg``-``table4.jpg`` (zhaoyuzhi/ICM-Assistant): ICM-Val
  R1/R2, ICM-Test UGC/AIGC/Porn, MEQ and MQA for LLaVA-v1.5 and mPLUG-Owl2 before and after ICM
  tuning.

Lookup::

    from icmlab.evaluate.references import qbench_reference, icm_reference
    qbench_reference("llava15", "7b", "dev", "baseline")["overall"]    # 0.5866
    icm_reference("llava15", "after")["mqa"]                            # 0.922

The labels are ``baseline`` (the starting checkpoint) and the training strategy (``mix`` /
``after``) for Q-Bench; ``baseline`` / ``after`` (the ICM-tuned model) for ICM. There is no
reference for the tiny demo model: the demo's reference columns stay empty.
"""

from __future__ import annotations

QBENCH_SOURCE = "Q-Instruct benchmark_results/mcq_dev.png, mcq_test.png (github.com/Q-Future/Q-Instruct)"
ICM_SOURCE = "ICM-Assistant benchmark_results/table2-4 (github.com/zhaoyuzhi/ICM-Assistant)"

_COLS = ("yes_no", "what", "how", "distortion", "other", "in_context_distortion", "in_context_other", "overall")


def _row(*pct: float | None) -> dict[str, float | None]:
    return {c: (None if v is None else round(v / 100, 4)) for c, v in zip(_COLS, pct)}


_N = None
# (family, size, split) -> label -> column -> accuracy
_QBENCH: dict[tuple[str, str, str], dict[str, dict[str, float | None]]] = {
    ("llava15", "7b", "dev"): {
        "baseline": _row(66.36, 58.19, 50.51, 49.42, 65.74, 54.61, 70.61, 58.66),
        "mix": _row(76.18, 66.37, 57.61, 65.18, 67.59, 64.80, 73.06, 67.09),
        "after": _row(76.91, 65.04, 55.78, 64.01, 67.13, 64.80, 71.84, 66.35),
    },
    ("llava15", "13b", "dev"): {
        "baseline": _row(65.27, 64.38, 56.59, 56.03, 67.13, 61.18, 67.35, 62.14),
        "mix": _row(76.18, 65.71, 59.23, 64.39, 69.91, 62.50, 75.51, 67.42),
        "after": _row(76.36, 65.04, 58.42, 65.56, 66.44, 64.47, 74.29, 67.02),
    },
    ("mplug_owl2", "7b", "dev"): {
        "baseline": _row(72.18, 57.96, 56.19, 56.68, 69.21, 53.29, 72.65, 61.61),
        "mix": _row(75.64, 67.04, 59.03, 71.01, 65.28, 63.16, 69.80, 67.56),
        "after": _row(76.00, 65.04, 61.66, 65.95, 68.75, 65.46, 73.88, 67.96),
    },
    ("llava15", "7b", "test"): {
        "baseline": _row(_N, _N, _N, _N, _N, _N, _N, 60.07),
        "mix": _row(78.65, 63.99, 63.79, _N, _N, _N, _N, 69.30),
        "after": _row(_N, _N, _N, _N, _N, _N, _N, 67.42),
    },
    ("llava15", "13b", "test"): {
        "baseline": _row(_N, _N, _N, _N, _N, _N, _N, 61.40),
        "mix": _row(_N, _N, _N, _N, _N, _N, _N, 70.70),
        "after": _row(_N, _N, _N, _N, _N, _N, _N, 70.43),
    },
    ("mplug_owl2", "7b", "test"): {
        "baseline": _row(_N, _N, _N, _N, _N, _N, _N, 62.68),
        "mix": _row(78.47, 67.90, 63.37, _N, _N, _N, _N, 70.30),
        "after": _row(_N, _N, _N, _N, _N, _N, _N, 69.10),
    },
}

# (family, label) -> metric -> value (ICM-Val R1/R2 accuracy, ICM-Test per subset, MEQ, MQA)
_ICM: dict[tuple[str, str], dict[str, float]] = {
    ("llava15", "baseline"): {
        "val_r1": 0.794,
        "val_r2": 0.680,
        "UGC": 0.896,
        "AIGC": 0.940,
        "Porn": 0.923,
        "meq": 0.696,
        "mqa": 0.801,
    },
    ("llava15", "after"): {
        "val_r1": 0.987,
        "val_r2": 0.971,
        "UGC": 0.958,
        "AIGC": 0.970,
        "Porn": 0.983,
        "meq": 0.844,
        "mqa": 0.922,
    },
    ("mplug_owl2", "baseline"): {
        "val_r1": 0.821,
        "val_r2": 0.735,
        "UGC": 0.828,
        "AIGC": 0.953,
        "Porn": 0.916,
        "meq": 0.666,
        "mqa": 0.767,
    },
    ("mplug_owl2", "after"): {
        "val_r1": 0.984,
        "val_r2": 0.962,
        "UGC": 0.937,
        "AIGC": 0.965,
        "Porn": 0.906,
        "meq": 0.831,
        "mqa": 0.922,
    },
}


def qbench_reference(family: str, size: str, split: str, label: str) -> dict[str, float | None] | None:
    """The paper's Q-Bench A1 accuracies per column, or None when there is no such row."""
    return _QBENCH.get((family, size, split), {}).get(label)


def icm_reference(family: str, label: str) -> dict[str, float] | None:
    """The paper's ICM numbers (``val_r1``, ``val_r2``, ``UGC``, ``AIGC``, ``Porn``, ``meq``, ``mqa``), or None."""
    return _ICM.get((family, label))
