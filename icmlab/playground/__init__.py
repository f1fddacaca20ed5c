"""Playground stage: ask the baseline, the fine-tuned model, a checkpoint or another run's model about
one image and compare the answers (notebook ``07_playground``; headless through ``icmlab run``).

Usage::

    from icmlab import playground
    playground.playground(cfg)          # the widgets (last expression of a notebook cell)
    result = playground.run(cfg)        # headless: playground.pairs -> runs/<run>/playground/answers.html
    print(result.table())
"""

from icmlab.playground.stage import (
    TEMPLATES,
    PlaygroundResult,
    answers_html,
    ask,
    load_model,
    model_choices,
    playground,
    run,
)

__all__ = ["TEMPLATES", "PlaygroundResult", "answers_html", "ask", "load_model", "model_choices", "playground", "run"]
