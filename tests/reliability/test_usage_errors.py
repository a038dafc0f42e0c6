"""A command line click refuses is bad input like any other: ``error: <command>: <what>`` on one
line and exit 1 (click's own handling prints a usage block and exits 2), nothing written. A
bare group or a subcommand given no arguments still shows its help."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from weightsmith.cli.groups import cli, merge_cli


@pytest.mark.parametrize(
    "group, args, where, what",
    [
        (cli, ["--bogus"], "cli", "No such option '--bogus'"),
        (cli, ["bogus"], "cli", "No such command 'bogus'"),
        (cli, ["merge", "run"], "cli merge run", "Missing argument 'RECIPE'"),
        (cli, ["merge", "run", "r.yml", "-o", "{out}", "--compute-dtype", "int3"],
         "cli merge run", "Invalid value for '--compute-dtype': 'int3' is not one of"),
        (cli, ["compress", "quantize", "m", "-o", "{out}", "--bits", "x"],
         "cli compress quantize", "Invalid value for '--bits'"),
        (merge_cli, ["bogus"], "merge-cli", "No such command 'bogus'"),
        (merge_cli, ["slerp", "--bogus"], "merge-cli slerp", "No such option '--bogus'"),
    ],
)  # fmt: skip
def test_refused_command_lines_are_one_line_exit_1(tmp_path: Path, group, args, where, what):
    out = tmp_path / "out"
    r = CliRunner().invoke(group, [a.format(out=out) for a in args], prog_name=where.split()[0])
    assert r.exit_code == 1, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {where}: {what}"), r.output
    assert not out.exists()


def test_bare_groups_still_show_help():
    r = CliRunner().invoke(merge_cli, [], prog_name="merge")
    assert "Usage: merge [OPTIONS] COMMAND" in r.output and "error:" not in r.output
    r = CliRunner().invoke(cli, ["merge", "run", "--help"], prog_name="weightsmith")
    assert r.exit_code == 0 and "Usage: weightsmith merge run" in r.output
