"""Distillation methods, one registered function each (``@distill_method("name")``).

Importing this package registers the built-in methods; :data:`DISTILL_METHODS` maps each name to
its :class:`DistillMethod` (training function, accepted inputs, own options).
"""

from weightsmith.distill.methods import dpo, kd, step_by_step  # noqa: F401  (registers them)
from weightsmith.distill.methods.base import (
    DISTILL_METHODS,
    DistillMethod,
    DistillResult,
    DistillRun,
    distill_method,
)

__all__ = ["DISTILL_METHODS", "DistillMethod", "DistillResult", "DistillRun", "distill_method"]
