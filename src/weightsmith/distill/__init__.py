"""Distillation: train a small student from a teacher's logits (online or from an offline
top-k cache) or from its generations, as a full, LoRA or QLoRA student; Zephyr-style dSFT →
AI feedback → DPO, and step-by-step distillation from teacher rationales.

Python API::

    from weightsmith.distill import DistillConfig, LossConfig, distill
    distill("teacher/", "student/", "train.txt", "out/",
            DistillConfig(loss=LossConfig(loss="fkl", temperature=2.0, alpha=0.5), steps=100))
"""

from weightsmith.distill.cache import CacheConfig, TeacherCache, build_cache
from weightsmith.distill.config import DistillConfig, LoraSettings
from weightsmith.distill.dpo import DPO_LOSSES, DpoSettings, dpo_loss
from weightsmith.distill.losses import DIVERGENCES, LossConfig, distillation_loss
from weightsmith.distill.methods import (
    DISTILL_METHODS,
    DistillMethod,
    DistillRun,
    distill_method,
)
from weightsmith.distill.trainer import DistillResult, distill

__all__ = [
    "DISTILL_METHODS",
    "DIVERGENCES",
    "DPO_LOSSES",
    "CacheConfig",
    "DistillConfig",
    "DistillMethod",
    "DistillResult",
    "DistillRun",
    "DpoSettings",
    "LoraSettings",
    "LossConfig",
    "TeacherCache",
    "build_cache",
    "distill",
    "distill_method",
    "distillation_loss",
    "dpo_loss",
]
