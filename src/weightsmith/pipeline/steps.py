"""Step kinds as data: which CLI command a step runs and how its input is passed."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepKind:
    """One kind of recipe step, e.g. ``quantize`` -> ``weightsmith compress quantize``."""

    name: str
    command: tuple[str, ...]  # command path under `weightsmith`
    subcommand_key: str | None = None  # option naming a subcommand (merge: ``method``)
    default_subcommand: str | None = None  # when the step does not name one (None: required)
    input_as: str = "positional"  # "positional" | an option's python name | "none"
    writes_model: bool = True  # False: the step measures (eval) and passes its input on


STEP_KINDS: dict[str, StepKind] = {
    k.name: k
    for k in [
        StepKind("convert", ("convert",)),
        StepKind("merge", ("merge",), subcommand_key="method", input_as="none"),
        StepKind("prune", ("compress", "prune")),
        StepKind("quantize", ("compress", "quantize")),
        StepKind("qat", ("compress", "qat")),
        StepKind("bitnet", ("compress", "bitnet")),
        # distill: `method:` picks `distill kd|seqkd|sft|dpo|step-by-step` (kd when absent)
        StepKind(
            "distill",
            ("distill",),
            subcommand_key="method",
            default_subcommand="kd",
            input_as="student",
        ),
        StepKind(
            "eval", ("eval",), subcommand_key="metric", default_subcommand="ppl", writes_model=False
        ),
    ]
}

# Option values that name models or files: a step id there means that step's output, and a
# relative path is taken relative to the recipe file.
PATH_KEYS = frozenset(
    {"args", "input", "reference", "teacher", "student", "base", "ref", "teacher_cache",
     "data", "eval_data", "calib", "imatrix", "prompts", "template", "adapter",
     "include_path"}
)  # fmt: skip
# The keys among them that name models: a value there may be a hub id (org/name[@revision]).
MODEL_KEYS = frozenset({"args", "input", "reference", "teacher", "student", "base", "ref"})
