"""Two writers to one OUT never replace each other; temporaries of killed runs are cleaned."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import weightsmith.io.placement as placement
from weightsmith.cli.main import cli
from weightsmith.errors import OutputError
from weightsmith.io import CheckpointWriter
from weightsmith.io.placement import clean_stale_temporaries, move_into_place, temp_path


def _write(out: Path, value: float, force: bool = False) -> CheckpointWriter:
    w = CheckpointWriter(out, force=force)
    w.write("w", torch.full((4,), value))
    return w


def test_commit_refuses_an_out_that_appeared_meanwhile(tmp_path: Path) -> None:
    out = tmp_path / "out"
    first, second = _write(out, 1.0), _write(out, 2.0)  # both started before OUT existed
    with first:
        first.commit()
    with (
        pytest.raises(OutputError, match=f"output {out} appeared while this run was writing"),
        second,
    ):
        second.commit()
    assert (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary left
    from safetensors.torch import load_file

    assert load_file(out / "model.safetensors")["w"][0] == 1.0  # the first output survived


def test_force_still_replaces_at_the_end(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with _write(out, 1.0) as w:
        w.commit()
    with _write(out, 2.0, force=True) as w:
        w.commit()
    from safetensors.torch import load_file

    assert load_file(out / "model.safetensors")["w"][0] == 2.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_fallback_without_renameat2(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(placement, "_renameat2", lambda: None)
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "out"
    a.mkdir()
    b.mkdir()
    move_into_place(a, out, force=False)
    with pytest.raises(OutputError, match="appeared while this run was writing"):
        move_into_place(b, out, force=False)
    assert b.exists() and not (tmp_path / ".out.weightsmith-lock").exists()
    lock = tmp_path / ".new.weightsmith-lock"  # left by a run killed while placing
    lock.mkdir()
    os.utime(lock, (time.time() - 120, time.time() - 120))
    move_into_place(b, tmp_path / "new", force=False)
    assert (tmp_path / "new").is_dir() and not lock.exists()


def _slow_convert(src: Path, out: Path, delay: float) -> list[str]:
    """A ``convert`` subprocess that sleeps ``delay`` s before each tensor it writes."""
    script = (
        "import time, weightsmith.io.writer as w\n"
        "orig = w.CheckpointWriter.write_from_file\n"
        f"def slow(self, *a):\n    time.sleep({delay}); return orig(self, *a)\n"
        "w.CheckpointWriter.write_from_file = slow\n"
        "from weightsmith.cli.main import cli\n"
        f"cli(['convert', {str(src)!r}, '-o', {str(out)!r}, '--no-progress'])\n"
    )
    return [sys.executable, "-c", script]


def test_concurrent_converts_one_wins_one_fails(tiny_model, tmp_path: Path) -> None:
    """Both runs pass the start check (OUT absent) while the other is still writing; the
    later commit must not replace the earlier output."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = _slow_convert(tiny_model("llama"), out, 0.1)
    procs = [subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 1], results
    err = next(e for rc, e in results if rc == 1)
    assert "appeared while this run" in err or "already exists" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_temporary_of_a_killed_run_is_cleaned_by_the_next(tmp_path: Path) -> None:
    out = tmp_path / "out"
    script = (
        "import sys, time, torch\n"
        "from weightsmith.io import CheckpointWriter\n"
        "w = CheckpointWriter(sys.argv[1])\n"
        "w.write('w', torch.zeros(4))\n"
        "print(w.tmp, flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(out)], stdout=subprocess.PIPE,
                            text=True)  # fmt: skip
    tmp = Path(proc.stdout.readline().strip())
    assert tmp.is_dir() and tmp.name.startswith(".out.weightsmith-tmp-")
    assert clean_stale_temporaries(tmp_path) == []  # its owner is alive: kept
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert tmp.is_dir()  # SIGKILL leaves it behind
    with CheckpointWriter(out) as w:
        assert not tmp.exists()  # the next run removed it
        w.write("w", torch.ones(4))
        w.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_only_provably_dead_owners_are_cleaned(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "out"
    mine = temp_path(out)
    mine.mkdir()
    name = mine.name.split("-tmp-")[1].split("-")  # pid, start, boot, host, token
    pid, start, boot, host, token = name
    other_host = tmp_path / f".out.weightsmith-tmp-999999-1-{boot}-ffffff-{token}"
    other_boot = tmp_path / f".out.weightsmith-tmp-{pid}-{start}-0badb007-{host}-{token}"
    gone_pid = tmp_path / f".out.weightsmith-tmp-{_unused_pid()}-5-{boot}-{host}-{token}"
    reused = tmp_path / f".out.weightsmith-tmp-{os.getppid()}-1-{boot}-{host}-{token}"
    unrelated = tmp_path / ".out.weightsmith-tmp-123-abc"
    for d in (other_host, other_boot, gone_pid, reused, unrelated):
        d.mkdir()
    if host == "ffffff":
        pytest.skip("hostname hashes to the test's foreign host id")
    removed = set(clean_stale_temporaries(tmp_path))
    assert removed == {other_boot, gone_pid, reused}
    assert mine.exists() and other_host.exists() and unrelated.exists()


def _unused_pid() -> int:
    pid = 4_000_000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except OSError:
            pass
        pid -= 1


def test_sigkill_mid_convert_then_next_convert_cleans(tiny_model, tmp_path: Path) -> None:
    """A real convert killed with SIGKILL mid-write (slowed by a tiny shard size)."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(_slow_convert(tiny_model("llama"), out, 0.2), env=env)
    deadline = time.monotonic() + 60
    while not any(p.name.startswith(".out.weightsmith-tmp-") for p in tmp_path.iterdir()):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    time.sleep(0.3)
    proc.kill()
    proc.wait()
    assert [p.name for p in tmp_path.iterdir() if "weightsmith-tmp" in p.name]
    result = CliRunner().invoke(
        cli, ["convert", str(tiny_model("llama")), "-o", str(out), "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
