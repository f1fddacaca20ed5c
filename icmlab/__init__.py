"""icmlab: a notebook-driven workbench for low-level visual instruction tuning.

Stages (each a module with ``run(cfg)``): download, merge, validate, inspect, train, evaluate.
Run the whole pipeline with ``icmlab run parameters/demo.yaml``; see README.md.
"""

__version__ = "0.1.0"
