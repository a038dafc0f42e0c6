"""How the pipeline talks to the ``weightsmith`` program: step requests in, checked command
lines out, and the program run as a child process per step.

The pipeline does not import the command layer (``weightsmith.cli``): a step's options are
the options of a command, so turning ``group_size: 32`` into ``--group-size 32`` and checking
types needs the command's own click options, which only the program knows. The pipeline asks
the program, through the hidden command ``weightsmith translate-steps`` (JSON on stdin and
stdout); ``weightsmith run`` passes the same translation in-process to save the child's start.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from weightsmith.errors import WeightsmithError

PROGRAM = (sys.executable, "-m", "weightsmith")
TRANSLATE_COMMAND = "translate-steps"


@dataclass(frozen=True)
class StepRequest:
    """One step as the pipeline resolved it: which command, its positional arguments, its
    options by python name (paths already resolved), the ``-o`` it writes to, if any."""

    command: list[str]  # path under `weightsmith`, e.g. ["compress", "quantize"]
    positional: list[str]
    options: dict[str, Any]
    out: str | None = None
    progress: bool = True


@dataclass(frozen=True)
class StepArgv:
    """The checked arguments after the command path, or what is wrong with the step."""

    argv: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


Translate = Callable[[list[StepRequest]], list[StepArgv]]


def requests_to_json(requests: list[StepRequest]) -> str:
    # YAML may give dates and other scalars JSON lacks; the command line sees them as str().
    return json.dumps([asdict(r) for r in requests], default=str)


def requests_from_json(text: str) -> list[StepRequest]:
    return [StepRequest(**d) for d in json.loads(text)]


def translate_in_child(requests: list[StepRequest]) -> list[StepArgv]:
    """Translate and check every step at once in one ``weightsmith translate-steps`` child."""
    if not requests:
        return []
    proc = subprocess.run(
        [*PROGRAM, TRANSLATE_COMMAND],
        input=requests_to_json(requests),
        capture_output=True,
        text=True,
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        why = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        raise WeightsmithError(f"cannot check the recipe's command lines: {why}")
    answers = [StepArgv(**d) for d in json.loads(lines[-1])]
    if len(answers) != len(requests):
        raise WeightsmithError("cannot check the recipe's command lines: answers do not match")
    return answers
