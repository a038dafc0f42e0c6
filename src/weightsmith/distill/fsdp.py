"""FSDP2 students (and teachers) for ``distill kd|seqkd|sft``: what is refused, what is sharded,
what each process reports. The sharding itself is :mod:`weightsmith.core.training.fsdp`.

The student (full or LoRA) is sharded per decoder layer then at the root, its AdamW states
follow its DTensor parameters; an online ``kd`` teacher is sharded the same way and runs
forward only (a ``--teacher-cache`` needs no teacher at all; ``seqkd``'s teacher writes its
completions before the student is sharded and is then dropped). At the end the full state dict
is gathered on rank 0 and saved exactly as a one-process run saves.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from weightsmith.core.report import peak_rss_bytes
from weightsmith.core.training import LoopConfig, make_optimizer
from weightsmith.core.training.distributed import ProcessGroup, gather_objects
from weightsmith.core.training.fsdp import (
    decoder_layers,
    fsdp_requested,
    full_state_dict,
    layer_names,
    shard,
    shard_stats,
)
from weightsmith.errors import ConfigError
from weightsmith.io.reader import open_checkpoint

FSDP_METHODS = ("kd", "seqkd", "sft")


def check_fsdp_options(method: str, cfg, *, eval_data: bool) -> None:
    """Refuse, before any work, what FSDP does not run (yet)."""
    if method not in FSDP_METHODS:
        raise ConfigError(f"--fsdp is for distill {'|'.join(FSDP_METHODS)}, not {method}")
    refused = [
        (cfg.qlora, "--qlora (NF4 bases are not sharded)"),
        (cfg.optim != "adamw", f"--optim {cfg.optim}"),
        (cfg.lmbda > 0, "--lmbda (ranks would generate different lengths)"),
        (cfg.hidden is not None, "--hidden-layers"),
        (eval_data, "--eval-data (evaluate the saved model with `weightsmith eval`)"),
    ]
    for bad, what in refused:
        if bad:
            raise ConfigError(f"--fsdp does not run with {what}")


@dataclass
class FsdpPlan:
    """The decoder layers to shard in the student and the online teacher (None: no teacher)."""

    world: int
    student_layers: list[list[str]]  # alternatives: core.training.fsdp.layer_names
    teacher_layers: list[list[str]] | None = None

    def shard(self, student, teacher=None) -> None:
        """fully_shard the student and (forward only) the teacher, in place."""
        shard(student, decoder_layers(student, self.student_layers), self.world)
        if teacher is not None and self.teacher_layers is not None:
            shard(teacher, decoder_layers(teacher, self.teacher_layers), self.world)

    def optimizer(self, model, loop: LoopConfig) -> torch.optim.Optimizer:
        """AdamW over the (sharded) trainable parameters: its states are sharded too."""
        return make_optimizer([p for p in model.parameters() if p.requires_grad], loop)

    def report(self, model, optimizer, pg: ProcessGroup) -> dict:
        """Per process: parameter / optimizer-state elements it holds, its peak RSS."""
        mine = shard_stats(model, optimizer, pg.rank)
        mine = {**asdict(mine), "peak_rss": peak_rss_bytes()}
        ranks = gather_objects(mine, pg.world)
        return {"backend": "fsdp2" if self.world > 1 else "fsdp2 (one process: unsharded)",
                "world_size": self.world, "student_layers": len(self.student_layers[0]),
                "teacher_sharded": self.teacher_layers is not None, "ranks": ranks}  # fmt: skip

    def gather(self, model) -> dict[str, torch.Tensor]:
        """The full state dict on rank 0 (collective; empty on the other ranks)."""
        return full_state_dict(model, self.world)


def plan_fsdp(run, cfg, pg: ProcessGroup, *, online_teacher: bool) -> FsdpPlan | None:
    """The FSDP plan of a run, or None when FSDP was not asked (``--fsdp`` / accelerate env).

    Every refusal happens here, before any model is loaded."""
    if not fsdp_requested(run.fsdp):
        return None
    check_fsdp_options(cfg.method, cfg, eval_data=run.eval_data is not None)
    plan = FsdpPlan(pg.world, _layers(run.student, "student"))
    if online_teacher:
        plan.teacher_layers = _layers(run.teacher, "teacher")
    return plan


def _layers(path, role: str) -> list[list[str]]:
    with open_checkpoint(path) as ckpt:
        return layer_names(ckpt.arch, ckpt.config, f"the {role} {path}")
