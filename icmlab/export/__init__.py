"""Export stage: the trained model in the layouts other tools read, a model card, the serving
handoff and the hub push (``icmlab export P``).

Modules: :mod:`~icmlab.export.stage` (``run(cfg)``, the layouts), :mod:`~icmlab.export.card` (the
model card), :mod:`~icmlab.export.serving` (vLLM / SGLang commands and checks),
:mod:`~icmlab.export.hub` (the push).

Usage (notebook ``07_playground``, last section)::

    from icmlab import export
    result = export.run(cfg)
    print(result.summary())
"""

from icmlab.export.stage import ExportResult, run

__all__ = ["ExportResult", "run"]
