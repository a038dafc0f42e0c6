"""Parse and check a recipe file (structure only; options are checked against the commands)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from weightsmith.errors import ConfigError
from weightsmith.pipeline.steps import STEP_KINDS

STEP_META_KEYS = frozenset({"id", "input"})
# A step id names WORKDIR/<id> and the run's state files <id>.json and <id>.report.json, so it
# is a plain name: no dot (``summary.md`` is the run's own file; ``a.report`` would collide
# with step ``a``'s report), no path separator, nothing hidden.
STEP_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


@dataclass(frozen=True)
class Step:
    """One step: its id, kind, the command's options, where its input comes from, gates."""

    id: str
    kind: str
    options: dict[str, Any]
    input: str | None  # None: the previous step's output (or nothing for the first step)
    gate: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Recipe:
    path: Path
    steps: list[Step]

    @property
    def base_dir(self) -> Path:
        return self.path.parent


def load_recipe(path: str | os.PathLike[str]) -> Recipe:
    """Read a recipe; every structural problem is reported at once in one error."""
    path = Path(path).absolute()
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read recipe ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    return parse_recipe(data, path)


def parse_recipe(data: Any, path: Path) -> Recipe:
    if not isinstance(data, dict) or not isinstance(data.get("steps"), list) or not data["steps"]:
        raise ConfigError(f"{path}: a recipe is a mapping with a non-empty 'steps' list")
    problems = [f"unknown top-level key {k!r}" for k in data if k != "steps"]
    steps: list[Step] = []
    seen: set[str] = set()
    for k, raw in enumerate(data["steps"], start=1):
        where = f"step {k}"
        if not isinstance(raw, dict):
            problems.append(f"{where}: must be a mapping")
            continue
        kinds = [key for key in raw if key not in STEP_META_KEYS]
        if len(kinds) != 1:
            problems.append(f"{where}: needs exactly one command key, got {kinds or 'none'}")
            continue
        kind = kinds[0]
        if kind not in STEP_KINDS:
            choices = ", ".join(STEP_KINDS)
            problems.append(f"{where}: unknown step {kind!r} (choose from {choices})")
            continue
        options = raw[kind] if raw[kind] is not None else {}
        if not isinstance(options, dict):
            problems.append(f"{where} ({kind}): its options must be a mapping")
            continue
        step_id = str(raw.get("id") or (kind if kind not in seen else f"{kind}{k}"))
        if step_id.casefold() in seen:  # casefold: WORKDIR may be on a case-blind filesystem
            problems.append(f"{where}: duplicate id {step_id!r}")
        if not STEP_ID.fullmatch(step_id):
            problems.append(f"{where}: id {step_id!r} must be a plain name (letters, digits, "
                            "'_' and '-', starting with a letter or digit, at most 64)")  # fmt: skip
        seen.add(step_id.casefold())
        options = dict(options)
        gate = options.pop("gate", None) or {}
        if gate and kind != "eval":
            problems.append(f"{where} ({kind}): 'gate' belongs on eval steps")
        if not isinstance(gate, dict):
            problems.append(f"{where} ({kind}): 'gate' must be a mapping")
            gate = {}
        steps.append(Step(step_id, kind, options, raw.get("input"), gate))
    if problems:
        raise ConfigError(f"{path}: " + "; ".join(problems))
    return Recipe(path=path, steps=steps)
