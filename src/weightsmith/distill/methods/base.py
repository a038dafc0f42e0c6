"""The distillation-method registry and what every method shares: the run's inputs, the student
(full, LoRA or QLoRA), the result and the atomic save with provenance.

A method is one function ``train(run: DistillRun) -> DistillResult`` registered with
``@distill_method("name", inputs=..., options=...)``; it builds its data and a
:class:`~weightsmith.core.training.TrainingTask` (a loss step) and hands them to the shared
engine :func:`weightsmith.core.training.train`. :func:`weightsmith.distill.distill` dispatches
on ``cfg.method`` and the CLI takes its choices from :data:`DISTILL_METHODS`.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from weightsmith.core.models import load_model
from weightsmith.core.report import peak_rss_bytes
from weightsmith.core.training import LoopConfig, TrainResult
from weightsmith.core.training.fsdp import fsdp_requested
from weightsmith.core.training.save import (
    full_weights,
    merged_weights,
    write_adapter,
    write_student,
)
from weightsmith.distill.config import DistillConfig
from weightsmith.distill.fsdp import FSDP_METHODS
from weightsmith.distill.lora import lora_deltas, wrap_lora
from weightsmith.distill.registry import DISTILL_METHODS, INPUT_FLAGS, DistillMethod, distill_method  # noqa: F401
from weightsmith.distill.vocab import tokenizer_hash
from weightsmith.errors import ConfigError
from weightsmith.io.paths import check_output_location
from weightsmith.io.reader import open_checkpoint
from weightsmith.io.writer import DEFAULT_MAX_SHARD_SIZE


@dataclass(frozen=True)
class DistillRun:
    """One call of :func:`weightsmith.distill.distill`: its inputs and options."""

    student: str | os.PathLike[str]
    data: str | os.PathLike[str]
    out: str | os.PathLike[str]
    cfg: DistillConfig
    teacher: str | os.PathLike[str] | None = None
    teacher_cache: str | os.PathLike[str] | None = None
    eval_data: str | os.PathLike[str] | None = None
    ref: str | os.PathLike[str] | None = None
    ref_cache: str | os.PathLike[str] | None = None
    device: str = "auto"
    force: bool = False
    progress: bool = True
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE
    fsdp: bool = False  # FSDP2 (also asked by `accelerate launch --use_fsdp`): distill.fsdp
    start: float = field(default_factory=time.perf_counter)

    def given(self) -> list[str]:
        """The optional inputs this run was given (keys of :data:`INPUT_FLAGS`)."""
        return [k for k in INPUT_FLAGS if getattr(self, k) is not None]


@dataclass
class DistillResult:
    """What a run did and cost; ``eval_*`` are held-out CE/perplexity/KL when asked."""

    out: str
    steps: int
    train_tokens: int  # completion positions trained on (all processes)
    tokens_per_s: float  # input tokens through the student per second (all processes)
    wall_s: float
    peak_rss: int
    losses: list[float]
    eval_before: dict | None = None
    eval_after: dict | None = None
    notes: list[str] = field(default_factory=list)
    world_size: int = 1
    train_peak_rss: int = 0  # peak RSS through loading and training, before eval and saving
    fsdp: dict | None = None  # per process: parameter/optimizer elements held, peak RSS

    def to_dict(self) -> dict:
        return asdict(self)


def check_run(method: DistillMethod, run: DistillRun) -> None:
    """Refuse inputs the method does not take, and multi-process runs of one-process methods."""
    if not method.multi_process and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(f"--method {method.name} runs in one process (no torchrun yet)")
    if fsdp_requested(run.fsdp) and method.name not in FSDP_METHODS:
        raise ConfigError(f"--fsdp is for distill {'|'.join(FSDP_METHODS)}, not {method.name}")
    for key in run.given():
        if key in method.inputs:
            continue
        if key in method.refuse:
            raise ConfigError(method.refuse[key])
        takers = [m.name for m in DISTILL_METHODS.values() if key in m.inputs]
        raise ConfigError(f"{INPUT_FLAGS[key]} is for --method {' or '.join(takers)}, not "
                          f"{method.name}")  # fmt: skip


def check_output(run: DistillRun, inputs: list) -> None:
    """Fail on a bad output location (inside or equal to an input…) before any work."""
    paths = [Path(p) for p in inputs if p is not None]
    check_output_location(Path(run.out).absolute(), paths, run.force)


def load_student(run: DistillRun, dev: torch.device):
    """The trainable student in float32 (NF4 base for QLoRA), not yet LoRA-wrapped."""
    return load_model(run.student, dev, nf4=run.cfg.qlora, trainable=True)


def add_lora(model, cfg: DistillConfig):
    """Wrap the student's target Linears with LoRA adapters when ``cfg.lora`` asks for it."""
    if cfg.lora is None:
        return model
    return wrap_lora(model, cfg.lora, nf4=cfg.qlora, seed=cfg.seed)


def loop_config(cfg: DistillConfig) -> LoopConfig:
    return LoopConfig.of(cfg)


def make_result(
    run: DistillRun, tr: TrainResult, train_tokens: int, notes: list[str], world: int = 1
) -> DistillResult:
    """The result of a finished training loop (wall time and peak RSS filled in at the end)."""
    return DistillResult(
        out=str(Path(run.out).absolute()),
        steps=tr.steps,
        train_tokens=train_tokens,
        tokens_per_s=round(tr.tokens / max(tr.wall_s, 1e-9), 1),
        wall_s=0.0,
        peak_rss=0,
        losses=[round(x, 6) for x in tr.losses],
        eval_before=tr.eval_before,
        eval_after=tr.eval_after,
        notes=notes,
        world_size=world,
        train_peak_rss=tr.peak_rss,
    )


def finish(run: DistillRun, result: DistillResult) -> DistillResult:
    result.wall_s = round(time.perf_counter() - run.start, 3)
    result.peak_rss = peak_rss_bytes()
    return result


def save_student(
    run: DistillRun, model, cfg: DistillConfig, fingerprint: str, tok, result: DistillResult, *,
    teacher=None, teacher_cache=None, state: dict | None = None,
) -> None:  # fmt: skip
    """Write the trained student (or its adapter) to ``run.out`` with provenance, atomically.
    ``state``: the model's full state dict when it is sharded (FSDP, gathered on rank 0)."""
    provenance = {
        "operation": "distill",
        "config": asdict(cfg),
        "teacher": str(teacher) if teacher else None,
        "teacher_cache": str(teacher_cache) if teacher_cache else None,
        "data_fingerprint": fingerprint,
        "tokenizer_hash": tokenizer_hash(tok),
        "training": {
            "steps": result.steps,
            "train_tokens": result.train_tokens,
            "first_loss": result.losses[0] if result.losses else None,
            "last_loss": result.losses[-1] if result.losses else None,
            "world_size": result.world_size,
        },
        "notes": result.notes,
    }
    if cfg.lora is not None and cfg.save_adapter:
        _write_lora_adapter(run, model, provenance, teacher, teacher_cache, state)
        return
    extra = [open_checkpoint(teacher)] if teacher else []
    try:
        with open_checkpoint(run.student) as ckpt:
            names, renames = set(ckpt.tensors), ckpt.arch.module_renames
        if cfg.lora is not None:
            weights = merged_weights(run.student, lora_deltas(model, state))
        else:  # a multimodal student: checkpoint names differ from its class's modules
            weights = full_weights(model, names, state, renames)
        write_student(run.student, run.out, new_weights=weights, provenance=provenance,
                      max_shard_size=run.max_shard_size, force=run.force,
                      progress=run.progress, extra_inputs=tuple(extra))  # fmt: skip
    finally:
        for c in extra:
            c.close()


def _write_lora_adapter(run: DistillRun, model, provenance: dict, teacher, teacher_cache,
                        full: dict | None = None) -> None:  # fmt: skip
    from peft import get_peft_model_state_dict

    adapter = get_peft_model_state_dict(model, state_dict=full)
    state = {k: v.detach().cpu().float() for k, v in adapter.items()}
    adapter_cfg = model.peft_config["default"].to_dict()
    adapter_cfg["base_model_name_or_path"] = str(Path(run.student).absolute())
    adapter_cfg = {k: sorted(v) if isinstance(v, set) else v for k, v in adapter_cfg.items()}
    inputs = tuple(Path(p) for p in (run.student, teacher, teacher_cache) if p)
    write_adapter(run.out, state, adapter_cfg, provenance, inputs=inputs, force=run.force)
