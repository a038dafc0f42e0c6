"""Plan a recipe: resolve each step's inputs and output, build and check its command line,
and report every problem of the whole recipe in one error before anything runs."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from weightsmith.errors import ConfigError, WeightsmithError
from weightsmith.io.hub import parse_hub_id, resolve_model_reference
from weightsmith.pipeline.commands import StepRequest, Translate, translate_in_child
from weightsmith.pipeline.gates import validate_gates
from weightsmith.pipeline.recipe import Recipe, Step
from weightsmith.pipeline.steps import MODEL_KEYS, PATH_KEYS, STEP_KINDS


@dataclass
class PlannedStep:
    step: Step
    command: list[str]  # path under `weightsmith` + arguments, without --report/--force
    input: Path | None
    output: Path  # where the model ends up (the input, for steps that only measure)
    depends: list[str] = field(default_factory=list)  # ids of earlier steps it reads
    reference: Path | None = None  # the model its output is measured against in plots


@dataclass
class _Draft:
    """A step being planned: what the pipeline resolved, before the command line is checked."""

    step: Step
    where: str
    problems: list[str] = field(default_factory=list)
    request: StepRequest | None = None  # None: too broken to build a command line
    input: Path | None = None
    output: Path | None = None
    depends: list[str] = field(default_factory=list)
    reference: Path | None = None


@dataclass
class _Paths:
    """Resolves option values that name models or files: a step id -> that step's output; a
    relative path -> relative to the recipe file."""

    base_dir: Path
    outputs: dict[str, Path] = field(default_factory=dict)

    def resolve(self, value: Any, key: str, draft: _Draft) -> Any:
        if isinstance(value, list):
            return [self.resolve(v, key, draft) for v in value]
        if not isinstance(value, str) or key not in PATH_KEYS:
            return value
        if value in self.outputs:
            draft.depends.append(value)
            return str(self.outputs[value])
        made_by = {str(p): sid for sid, p in self.outputs.items()}
        if value in made_by:  # an earlier step's output, passed on as this step's input
            draft.depends.append(made_by[value])
            return value
        p = Path(os.path.expanduser(value))
        p = p if p.is_absolute() else self.base_dir / p
        as_hub = ""
        if not p.exists() and key in MODEL_KEYS and parse_hub_id(value) is not None:
            try:  # a hub id: its cache snapshot (downloaded only with --download)
                return resolve_model_reference(value)
            except WeightsmithError as e:
                as_hub = f"; as a hub id: {e}"
        if not p.exists():
            draft.problems.append(
                f"{draft.where}: {key} {value!r} is neither a step id nor a path that exists "
                f"({p}){as_hub}"
            )
        return str(p)


def plan_recipe(
    recipe: Recipe, workdir: Path, progress: bool = True, translate: Translate | None = None
) -> list[PlannedStep]:
    """Resolve inputs and outputs and build each step's command line; check them all with
    the commands' own options (through ``translate``; by default the ``weightsmith`` program
    in a child process) before anything runs, and report every problem in one error."""
    paths = _Paths(recipe.base_dir)
    drafts: list[_Draft] = []
    previous: Path | None = None
    for step in recipe.steps:
        draft = _draft_step(step, paths, previous, Path(workdir), progress)
        drafts.append(draft)
        if draft.request is not None:
            paths.outputs[step.id] = previous = draft.output
    built = [d for d in drafts if d.request is not None]
    answers = (translate or translate_in_child)([d.request for d in built])
    planned: list[PlannedStep] = []
    for draft, answer in zip(built, answers, strict=True):
        draft.problems += [f"{draft.where}: {p}" for p in answer.problems]
        has_reference = "reference" in draft.step.options
        draft.problems += [
            f"{draft.where}: {p}" for p in validate_gates(draft.step.gate, has_reference)
        ]
        command = [*draft.request.command, *answer.argv]
        planned.append(PlannedStep(draft.step, command, draft.input, draft.output,
                                   draft.depends, draft.reference))  # fmt: skip
    problems = [p for d in drafts for p in d.problems]
    if problems:
        raise ConfigError(f"{recipe.path}: {len(problems)} problem(s): " + "; ".join(problems))
    return planned


def _draft_step(
    step: Step, paths: _Paths, previous: Path | None, workdir: Path, progress: bool
) -> _Draft:
    """Resolve one step's command path, input, positional arguments, options and output."""
    kind = STEP_KINDS[step.kind]
    draft = _Draft(step, where=f"step {step.id!r} ({step.kind})")
    options = dict(step.options)
    command = list(kind.command)
    if kind.subcommand_key:
        sub = options.pop(kind.subcommand_key, kind.default_subcommand)
        if sub is None:
            draft.problems.append(f"{draft.where}: needs '{kind.subcommand_key}'")
            return draft
        command.append(str(sub))
    if "out" in options:
        draft.problems.append(f"{draft.where}: outputs live in WORKDIR/{step.id}; remove 'out'")
        options.pop("out")
    inp = Path(paths.resolve(step.input, "input", draft)) if step.input is not None else previous
    positional: list[str] = []
    if "args" in options:
        args = options.pop("args")
        positional = [str(a) for a in paths.resolve(args if isinstance(args, list) else [args], "args", draft)]  # fmt: skip
    elif kind.input_as == "positional":
        if inp is None:
            draft.problems.append(f"{draft.where}: has no input (first step: give 'input' or 'args')")  # fmt: skip
            return draft
        positional = [str(inp)]
    if kind.input_as not in ("positional", "none") and kind.input_as not in options:
        if inp is None:
            draft.problems.append(f"{draft.where}: needs '{kind.input_as}' (or an earlier step)")
            return draft
        options[kind.input_as] = str(inp)
    resolved = {key: paths.resolve(value, key, draft) for key, value in options.items()}
    draft.input = inp
    draft.output = workdir / step.id if kind.writes_model else (inp or workdir / step.id)
    out = str(draft.output) if kind.writes_model else None
    draft.request = StepRequest(command, positional, resolved, out, progress)
    draft.reference = _weights_reference(kind.input_as, positional, resolved)
    return draft


def _weights_reference(input_as: str, positional: list[str], options: dict) -> Path | None:
    """What a step's new weights are compared with: its input model; for merges the
    ``base`` model, else the first one merged."""
    if input_as == "positional" or (input_as == "none" and not options.get("base")):
        first = positional[0] if positional else None
    else:
        first = options.get("base" if input_as == "none" else input_as)
    return Path(first) if isinstance(first, str) else None
