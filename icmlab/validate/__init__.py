"""Validate stage: a preflight report on the merged training file (``icmlab validate P``).

Modules: :mod:`~icmlab.validate.stage` (orchestration, report, policies),
:mod:`~icmlab.validate.records` (pure record checks and the problem kinds) and
:mod:`~icmlab.validate.images` (image checks).

Usage (notebook ``03_validate``)::

    from icmlab import validate
    result = validate.run(cfg)
"""

from icmlab.validate.stage import DataValidationError, ValidationResult, run, validate_file

__all__ = ["DataValidationError", "ValidationResult", "run", "validate_file"]
