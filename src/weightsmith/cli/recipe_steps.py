"""Recipe steps -> command lines, with the commands' own click options.

The pipeline resolves what each step reads and writes and sends a
:class:`~weightsmith.pipeline.commands.StepRequest`; this side turns the step's option mapping
into arguments (``group_size: 32`` -> ``--group-size 32``) and lets click parse them without
running anything, so the recipe language has no option list of its own to drift.
"""

from __future__ import annotations

from typing import Any

import click

from weightsmith.errors import ConfigError, WeightsmithError
from weightsmith.pipeline.commands import StepArgv, StepRequest


def translate_steps(root: click.Group, requests: list[StepRequest]) -> list[StepArgv]:
    """Each request's arguments after its command path, or every problem with it."""
    return [translate_step(root, r) for r in requests]


def translate_step(root: click.Group, request: StepRequest) -> StepArgv:
    try:
        cmd = _command_for(root, request.command)
    except KeyError:
        return StepArgv(problems=[f"`weightsmith {' '.join(request.command)}` does not exist here"])
    argv, problems = list(request.positional), []
    for key, value in request.options.items():
        try:
            argv += _option_args(cmd, key, value)
        except ConfigError as e:
            problems.append(str(e))
    if request.out is not None:
        argv += ["-o", request.out]
    if not request.progress and any(p.name == "progress" for p in cmd.params):
        argv.append("--no-progress")
    try:
        cmd.make_context(" ".join(request.command), list(argv), resilient_parsing=False)
    except click.ClickException as e:
        problems.append(e.format_message())
    except WeightsmithError as e:  # a model reference that does not resolve
        problems.append(str(e))
    return StepArgv(argv=argv, problems=problems)


def _command_for(root: click.Group, path: list[str]) -> click.Command:
    cmd: click.Command = root
    for name in path:
        sub = cmd.get_command(click.Context(cmd), name) if isinstance(cmd, click.Group) else None
        if sub is None:
            raise KeyError(" ".join(path))
        cmd = sub
    return cmd


def _option_args(cmd: click.Command, key: str, value: Any) -> list[str]:
    """``group_size: 32`` -> ``["--group-size", "32"]`` using the command's own option."""
    param = next((p for p in cmd.params if p.name == key.replace("-", "_")), None)
    if not isinstance(param, click.Option):
        raise ConfigError(f"unknown option {key!r}")
    flag = max(param.opts, key=len)
    if param.is_flag and not param.multiple:
        if param.secondary_opts:
            return [flag if value else max(param.secondary_opts, key=len)]
        return [flag] if value else []
    values = value if param.multiple and isinstance(value, list) else [value]
    out: list[str] = []
    for v in values:
        if isinstance(v, dict):
            out += [a for k, x in v.items() for a in (flag, f"{k}={_scalar(x)}")]
        else:
            out += [flag, _scalar(v)]
    return out


def _scalar(v: Any) -> str:
    if isinstance(v, list):
        return ",".join(_scalar(x) for x in v)
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)
