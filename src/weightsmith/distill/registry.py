"""The registry of distillation methods: ``@distill_method("kd")`` adds one.

Kept apart from :mod:`weightsmith.distill.methods.base` (the shared run helpers) so that
:mod:`weightsmith.distill.config` can list the method names without importing the methods.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# the optional inputs of distill(), as the CLI spells them
INPUT_FLAGS = {
    "teacher": "--teacher",
    "teacher_cache": "--teacher-cache",
    "eval_data": "--eval-data",
    "ref": "--ref",
    "ref_cache": "--ref-cache",
}


@dataclass(frozen=True)
class DistillMethod:
    """A registered method: its training function and what it accepts."""

    name: str
    train: Callable[[Any], Any]  # (DistillRun) -> DistillResult
    inputs: tuple[str, ...]  # the optional inputs it takes (keys of INPUT_FLAGS)
    options: tuple[str, ...]  # DistillConfig fields only this method reads
    multi_process: bool  # runs under torchrun / accelerate launch
    summary: str
    refuse: dict[str, str] = field(default_factory=dict)  # input -> why this method refuses it


DISTILL_METHODS: dict[str, DistillMethod] = {}


def distill_method(
    name: str,
    *,
    inputs: tuple[str, ...] = (),
    options: tuple[str, ...] = (),
    multi_process: bool = False,
    refuse: dict[str, str] | None = None,
) -> Callable[[Callable[[Any], Any]], Callable[[Any], Any]]:
    """Register ``train(run) -> DistillResult`` as ``--method name`` (``@distill_method("kd")``).

    ``inputs``: the optional inputs it takes; ``options``: the config fields only it reads;
    ``refuse``: a clearer message for an input it does not take (default: which methods do).
    """

    def register(fn: Callable[[Any], Any]):
        if name in DISTILL_METHODS:
            raise RuntimeError(f"distillation method {name!r} registered twice")
        unknown = set(inputs) - set(INPUT_FLAGS)
        if unknown:
            raise RuntimeError(f"{name}: unknown inputs {sorted(unknown)}")
        summary = (fn.__doc__ or name).strip().splitlines()[0]
        DISTILL_METHODS[name] = DistillMethod(name, fn, inputs, options, multi_process, summary,
                                              dict(refuse or {}))  # fmt: skip
        return fn

    return register
