"""Issue #16 §1: every numeric option is checked finite at parse time, in every command."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from weightsmith.cli.common import FINITE_FLOAT
from weightsmith.cli.main import cli
from weightsmith.errors import ConfigError


def _commands(group: click.Group, path: tuple[str, ...] = ()):
    ctx = click.Context(group)
    for name in group.list_commands(ctx):  # get_command imports a lazily listed command
        cmd = group.get_command(ctx, name)
        yield (*path, name), cmd
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, (*path, name))


def test_no_command_takes_a_float_that_may_be_nan() -> None:
    loose = [
        f"{' '.join(path)} {max(p.opts, key=len)}"
        for path, cmd in _commands(cli)
        for p in cmd.params
        if isinstance(p.type, (click.types.FloatParamType, click.FloatRange))
    ]
    assert not loose, f"options that accept nan/inf: {loose}"
    finite = [p for _, cmd in _commands(cli) for p in cmd.params if p.type is FINITE_FLOAT]
    assert len(finite) > 20  # the walk really sees the commands' float options


@pytest.mark.parametrize("text", ["nan", "NaN", "inf", "-inf", "1e999"])
def test_finite_float_refuses_non_finite(text: str) -> None:
    opt = click.Option(["--lr"], type=FINITE_FLOAT)
    with pytest.raises(ConfigError, match=r"--lr: .* is not a finite number"):
        FINITE_FLOAT.convert(text, opt, None)
    assert FINITE_FLOAT.convert("1e-4", opt, None) == 1e-4


@pytest.mark.parametrize(
    "argv",
    [
        ["distill", "sft", "--student", "s", "--data", "d", "-o", "o", "--lr", "nan"],
        ["compress", "prune", "m", "-o", "o", "--method", "magnitude", "--sparsity", "inf"],
        ["compress", "qat", "m", "-o", "o", "--data", "d", "--lr", "nan"],
    ],
)
def test_cli_non_finite_option_exits_1_with_one_line(argv: list[str], tmp_path) -> None:
    result = CliRunner().invoke(cli, argv)
    assert result.exit_code == 1, result.output
    assert result.output.strip().startswith("error: --") and "finite" in result.output
