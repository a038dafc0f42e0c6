"""Writes behind the producer: all land, memory stays bounded, failures surface."""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

import pytest
import torch

from weightsmith.errors import OutputError
from weightsmith.io import CheckpointWriter, TensorSpec, open_checkpoint
from weightsmith.io import writer as writer_mod
from weightsmith.io.writer import WriteBehind


def test_queue_is_bounded_by_bytes_and_drain_waits_for_all():
    done: list[int] = []
    gate = threading.Event()

    def write(i: int) -> None:
        gate.wait(5)
        done.append(i)

    wb = WriteBehind(max_bytes=10)
    for i in range(2):
        wb.submit(lambda i=i: write(i), 5)  # 10 bytes queued: at the bound, not over it
    assert done == []
    gate.set()
    wb.submit(lambda: write(2), 5)  # over the bound: waits for the oldest write first
    assert 0 in done
    wb.drain()
    assert sorted(done) == [0, 1, 2]
    wb.close()


def test_a_failed_write_is_raised_after_every_queued_write_finished():
    finished = []

    def slow() -> None:
        time.sleep(0.05)
        finished.append(True)

    def fail() -> None:
        raise OSError(errno.EIO, "I/O error")

    wb = WriteBehind()
    wb.submit(slow, 1)
    wb.submit(fail, 1)
    wb.submit(slow, 1)  # queued before the failure is seen (the first write still runs)
    with pytest.raises(OSError, match="I/O error"):
        wb.drain()
    assert finished == [True, True]  # nothing still runs once drain() has raised
    wb.close()


def test_many_chunked_tensors_land_intact(tmp_path: Path):
    tensors = {f"t{i}": torch.randn(1000 + i) for i in range(20)}
    with CheckpointWriter(tmp_path / "out", max_shard_size=10_000) as w:
        w.plan([TensorSpec.of(n, t) for n, t in tensors.items()])
        for name, t in tensors.items():
            data = t.numpy().tobytes()
            w.write_raw(
                TensorSpec.of(name, t), [data[i : i + 1000] for i in range(0, len(data), 1000)]
            )
        w.commit()
    with open_checkpoint(tmp_path / "out") as ckpt:
        for name, t in tensors.items():
            assert torch.equal(ckpt.get_tensor(name), t)


def test_disk_full_in_a_background_write_is_one_clean_error(tmp_path: Path, monkeypatch):
    calls = {"n": 0}
    real = writer_mod.pwrite_all

    def flaky(fd: int, data, offset: int) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd, data, offset)

    monkeypatch.setattr(writer_mod, "pwrite_all", flaky)
    t = torch.randn(4096)
    with (
        pytest.raises(OutputError, match="no space left on device"),
        CheckpointWriter(tmp_path / "out") as w,
    ):
        for i in range(5):
            w.write(f"t{i}", t)
        w.commit()
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no half-written output left behind
