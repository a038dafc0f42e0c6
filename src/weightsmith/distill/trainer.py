"""``distill``: train a student from a teacher's logits (online or cached), its generations,
preference pairs or rationales, with the method ``cfg.method`` names.

Each method is one registered function in :mod:`weightsmith.distill.methods`; every one of them
trains through the shared engine :func:`weightsmith.core.training.train` (micro-batching, global
token normalisation, gradient accumulation, warm-up + cosine schedule, clipping, data-parallel
all-reduce, evaluation before and after) and saves atomically with provenance.
"""

from __future__ import annotations

import os

from weightsmith.distill.config import DistillConfig
from weightsmith.distill.methods import DISTILL_METHODS, DistillResult, DistillRun
from weightsmith.distill.methods.base import check_run
from weightsmith.io.writer import DEFAULT_MAX_SHARD_SIZE

__all__ = ["DistillResult", "distill"]


def distill(
    teacher: str | os.PathLike[str] | None,
    student: str | os.PathLike[str],
    data: str | os.PathLike[str],
    out: str | os.PathLike[str],
    cfg: DistillConfig,
    *,
    teacher_cache: str | os.PathLike[str] | None = None,
    eval_data: str | os.PathLike[str] | None = None,
    device: str = "auto",
    force: bool = False,
    progress: bool = True,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    ref: str | os.PathLike[str] | None = None,
    ref_cache: str | os.PathLike[str] | None = None,
    fsdp: bool = False,
) -> DistillResult:
    """Train ``student`` on ``data`` with method ``cfg.method`` and write it to ``out``.

    ``kd`` distils the teacher's logits (``teacher`` or a ``teacher_cache``); ``seqkd`` trains
    on the teacher's generations; ``sft`` is cross-entropy on prompt/completion pairs; ``dpo``
    trains on preference pairs against ``ref`` (default: the student itself) through a
    reference log-prob cache (``ref_cache``, built when absent); ``step-by-step`` trains on
    rationales. ``eval_data`` is measured before and after training where the method takes it.
    ``fsdp``: shard the student (and an online teacher) with FSDP2 over the launched processes
    (:mod:`weightsmith.distill.fsdp`; also asked by ``accelerate launch --use_fsdp``).
    """
    run = DistillRun(student=student, data=data, out=out, cfg=cfg, teacher=teacher,
                     teacher_cache=teacher_cache, eval_data=eval_data, ref=ref,
                     ref_cache=ref_cache, device=device, force=force, progress=progress,
                     max_shard_size=max_shard_size, fsdp=fsdp)  # fmt: skip
    method = DISTILL_METHODS[cfg.method]
    check_run(method, run)
    return method.train(run)
