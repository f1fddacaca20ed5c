"""Evaluate stage: Q-Bench A1 and moderation, baseline vs fine-tuned, controls, report (``icmlab evaluate P``).

Modules: :mod:`~icmlab.evaluate.stage` (orchestration), :mod:`~icmlab.evaluate.generation` (greedy
answers, prompt formats), :mod:`~icmlab.evaluate.scoring` (strict and substring scorers),
:mod:`~icmlab.evaluate.report` (tables, figures, HTML report) and :mod:`~icmlab.evaluate.icm_val`
(ICM-Val questions from folders).

Usage (notebook ``06_evaluate``)::

    from icmlab import evaluate
    from icmlab.evaluate import report
    result = evaluate.run(cfg)
"""

from icmlab.evaluate.stage import EvaluateResult, run

__all__ = ["EvaluateResult", "run"]
