"""Merge stage: the recipe's JSON files as one training file in the model's dialect (``icmlab merge P``).

Modules: :mod:`~icmlab.merge.stage` (the byte-level merge) and :mod:`~icmlab.merge.provenance`
(the ``train.provenance.jsonl`` sidecar: its writer and its reader, which validate and inspect use).

Usage (notebook ``02_merge``)::

    from icmlab import merge
    result = merge.run(cfg)
"""

from icmlab.merge.provenance import read_provenance
from icmlab.merge.stage import MergeResult, run

__all__ = ["MergeResult", "read_provenance", "run"]
