"""Bad input exits 1 with one line, whatever the command; reports never hide the real error."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from weightsmith.cli.main import cli


def run(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _one_error_line(result) -> str:
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1, result.output
    assert lines[-1].startswith("error: ") and "internal error" not in lines[-1], result.output
    return lines[-1]


def test_deeply_nested_header_is_bad_input(tmp_path: Path) -> None:
    header = b"[" * 200000 + b"]" * 200000
    ckpt = tmp_path / "deep"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    line = _one_error_line(run("inspect", ckpt))
    assert "corrupt safetensors header (nested too deeply)" in line
    line = _one_error_line(run("convert", ckpt, "-o", tmp_path / "out"))
    assert "nested too deeply" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deep"]


def test_deeply_nested_index_and_config(tiny_model_copy) -> None:
    path = tiny_model_copy("llama")
    (path / "config.json").write_text("[" * 100000 + "]" * 100000)
    assert "unreadable config (nested too deeply)" in _one_error_line(run("inspect", path))
    (path / "model.safetensors.index.json").write_text("[" * 100000 + "]" * 100000)
    assert "unreadable index (nested too deeply)" in _one_error_line(run("inspect", path))


def test_report_under_a_file_is_refused_before_any_work(tiny_model, tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    out = tmp_path / "out"
    result = run("convert", tiny_model("llama"), "-o", out, "--report", afile / "r.json")
    line = _one_error_line(result)
    assert f"cannot write report {afile / 'r.json'}: {afile} is not a directory" in line
    assert not out.exists()  # refused before converting anything
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_report_in_a_directory_that_cannot_be_written(tiny_model, tmp_path, monkeypatch) -> None:
    import weightsmith.core.report as report_mod

    real_open = report_mod.os.open

    def refuse(path, *args, **kwargs):
        if ".probe-" in str(path):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(report_mod.os, "open", refuse)
    out = tmp_path / "out"
    result = run("convert", tiny_model("llama"), "-o", out, "--report", tmp_path / "ro" / "r.json")
    assert "Permission denied" in _one_error_line(result)
    assert not out.exists()


def test_failed_report_never_hides_the_real_error(tiny_model, tmp_path, monkeypatch) -> None:
    """The report path passes the early check but fails when written: the command's own error
    is still the one reported (exit 1, not 3)."""
    import weightsmith.cli.common as common

    monkeypatch.setattr(common, "check_report_path", lambda p: None)
    afile = tmp_path / "afile"
    afile.write_text("x")
    result = run("convert", tmp_path / "missing", "-o", tmp_path / "out", "--report", afile / "r")
    line = _one_error_line(result)
    assert "missing: no such file or directory" in line
    assert f"warning: cannot write report {afile / 'r'}" in result.output
    # and after a successful command, a report that fails is exit 1, not an internal error
    result = run("convert", tiny_model("llama"), "-o", tmp_path / "out", "--report", afile / "r")
    line = _one_error_line(result)
    assert "cannot write report" in line and "(the command itself succeeded)" in line


def test_report_written_on_success_and_failure(tiny_model, tmp_path: Path) -> None:
    report = tmp_path / "new" / "dir" / "r.json"
    assert (
        run("convert", tiny_model("llama"), "-o", tmp_path / "o", "--report", report).exit_code == 0
    )
    assert json.loads(report.read_text())["ok"] is True
    run("convert", tmp_path / "missing", "-o", tmp_path / "o2", "--report", report)
    assert json.loads(report.read_text())["ok"] is False


@pytest.fixture
def pickled(tmp_path: Path) -> Path:
    d = tmp_path / "pickled"
    d.mkdir()
    torch.save({"model.norm.weight": torch.ones(4)}, d / "pytorch_model.bin")
    return d


@pytest.mark.parametrize(
    ("args", "has_option"),
    [
        (["convert", "{p}", "-o", "{o}"], True),
        (["inspect", "{p}"], True),
        (["merge", "linear", "{p}", "{p}", "-o", "{o}"], True),
        (["compress", "quantize", "{p}", "--method", "rtn", "-o", "{o}"], False),
        (["compare", "{p}", "{p}"], False),
    ],
)
def test_pickle_hint_matches_the_command(pickled, tmp_path, args, has_option) -> None:
    argv = [a.format(p=pickled, o=tmp_path / "out") for a in args]
    line = _one_error_line(run(*argv))
    assert "is a pickle (.bin) checkpoint" in line
    if has_option:
        assert "pass --allow-pickle to `" in line and " ".join(args[:2]).split(" {")[0] in line
    else:
        assert "--allow-pickle to" not in line
        assert (
            f"convert it first with `weightsmith convert --allow-pickle {pickled} -o NEW`" in line
        )
    assert not (tmp_path / "out").exists()
