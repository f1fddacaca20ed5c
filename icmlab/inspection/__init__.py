"""Inspect stage: statistics, figures and a live browser of the exact model input (``icmlab inspect P``).

Modules: :mod:`~icmlab.inspection.stage` (statistics, sample rendering, the widget browser) and
:mod:`~icmlab.inspection.figures` (matplotlib figures).

Usage (notebook ``04_inspect``)::

    from icmlab import inspection
    result = inspection.run(cfg)
    inspection.browser(cfg, result)
"""

from icmlab.inspection.stage import InspectResult, browser, model_input_html, run, samples_html

__all__ = ["InspectResult", "browser", "model_input_html", "run", "samples_html"]
