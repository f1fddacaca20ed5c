"""Evaluate stage: Q-Bench A1 and the ICM benchmarks, baseline vs fine-tuned, controls, report (``icmlab evaluate P``).

Modules: :mod:`~icmlab.evaluate.stage` (orchestration), :mod:`~icmlab.evaluate.protocol` (upstream /
demo protocols: prompt, pixels, budget), :mod:`~icmlab.evaluate.generation` (greedy answers, prompt
formats), :mod:`~icmlab.evaluate.scoring` (strict, substring and exact scorers; ICM MQA),
:mod:`~icmlab.evaluate.judge` (MEQ with an OpenAI-compatible judge), :mod:`~icmlab.evaluate.references`
(the papers' numbers), :mod:`~icmlab.evaluate.records` (Q-Bench test submission, provenance),
:mod:`~icmlab.evaluate.parallel` (data-parallel answers under torchrun), :mod:`~icmlab.evaluate.report`
(tables, figures, HTML report) and :mod:`~icmlab.evaluate.icm_val` (ICM-Val / ICM-Test / MEQ items from
folders). See ``docs/evaluation.md``.

Usage (notebook ``06_evaluate``)::

    from icmlab import evaluate
    from icmlab.evaluate import report
    result = evaluate.run(cfg)
"""

from icmlab.evaluate.stage import EvaluateResult, run

__all__ = ["EvaluateResult", "run"]
