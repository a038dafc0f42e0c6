"""Distillation: train a small student from a teacher's logits (online or from an offline
top-k cache) or from its generations, as a full, LoRA or QLoRA student.

Python API::

    from weightsmith.distill import DistillConfig, LossConfig, distill
    distill("teacher/", "student/", "train.txt", "out/",
            DistillConfig(loss=LossConfig(loss="fkl", temperature=2.0, alpha=0.5), steps=100))
"""

from weightsmith.distill.cache import CacheConfig, TeacherCache, build_cache
from weightsmith.distill.config import DistillConfig, LoraSettings
from weightsmith.distill.losses import DIVERGENCES, LossConfig, distillation_loss
from weightsmith.distill.trainer import DistillResult, distill

__all__ = [
    "DIVERGENCES",
    "CacheConfig",
    "DistillConfig",
    "DistillResult",
    "LoraSettings",
    "LossConfig",
    "TeacherCache",
    "build_cache",
    "distill",
    "distillation_loss",
]
