"""Tensor data written past the page cache: same bytes as buffered writes, clean fallbacks."""

from __future__ import annotations

import errno
import fcntl
import os
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save

from weightsmith.errors import OutputError
from weightsmith.io import CheckpointWriter, TensorSpec
from weightsmith.io import direct as direct_mod
from weightsmith.io.direct import BLOCK, DirectFile, direct_io_wanted


def _segments(size: int, seed: int) -> list[tuple[int, int]]:
    """Random-length pieces covering [0, size): some inside one block, some many blocks long."""
    rng = random.Random(seed)
    cuts, pos = [], 0
    while pos < size:
        n = min(size - pos, rng.choice([1, 17, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 5, 9000]))
        cuts.append((pos, n))
        pos += n
    rng.shuffle(cuts)  # the writer fills tensors in any order
    return cuts


def _write_all(path: Path, data: bytes, seed: int) -> DirectFile:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    os.ftruncate(fd, len(data))
    sink = DirectFile(path, fd)
    try:
        for offset, n in _segments(len(data), seed):
            sink.pwrite(memoryview(data)[offset : offset + n], offset)
    finally:
        sink.close()
        os.close(fd)
    return sink


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_direct_file_writes_exactly_the_bytes_given(tmp_path, monkeypatch, seed):
    monkeypatch.setattr(direct_mod, "STAGING_BYTES", 2 * BLOCK)  # several staging rounds
    data = random.Random(seed).randbytes(23 * BLOCK + 123)
    path = tmp_path / "f"
    sink = _write_all(path, data, seed)
    assert path.read_bytes() == data
    if sink.direct_bytes == 0:
        pytest.skip(f"{tmp_path} does not take O_DIRECT writes (checked: same bytes buffered)")
    assert sink.direct_bytes % BLOCK == 0 and sink.direct_bytes >= BLOCK


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    sizes = {"a": 3, "b": 4097, "c": 70_001, "d": 1, "e": 65_536}  # odd offsets everywhere
    out = {n: torch.randn(k, generator=g).to(torch.bfloat16) for n, k in sizes.items()}
    out["f"] = torch.randn(33, 65, generator=g)
    return out


def _write_checkpoint(out: Path, tensors: dict[str, torch.Tensor], planned: bool) -> int:
    with CheckpointWriter(out) as w:
        if planned:
            w.plan([TensorSpec.of(k, v) for k, v in tensors.items()])
        for k, v in tensors.items():
            w.write_raw(TensorSpec.of(k, v), _pieces(v))
        w.commit()
        return w.direct_bytes


def _pieces(t: torch.Tensor):
    raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
    for i in range(0, len(raw), 10_000):  # chunk boundaries inside tensors too
        yield raw[i : i + 10_000]


def test_planned_output_with_direct_io_is_byte_identical_to_safetensors(tmp_path, monkeypatch):
    monkeypatch.setenv("WEIGHTSMITH_DIRECT_IO", "1")
    tensors = _tensors()
    direct = _write_checkpoint(tmp_path / "out", tensors, planned=True)
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == save(
        tensors, metadata={"format": "pt"}
    )
    if direct == 0:
        pytest.skip(f"{tmp_path} does not take O_DIRECT writes (checked: same bytes buffered)")


def test_spilled_output_with_direct_io_loads_back(tmp_path, monkeypatch):
    monkeypatch.setenv("WEIGHTSMITH_DIRECT_IO", "1")
    tensors = _tensors()
    _write_checkpoint(tmp_path / "out", tensors, planned=False)
    loaded = load_file(tmp_path / "out" / "model.safetensors")
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())


def test_filesystem_without_o_direct_falls_back_to_buffered(tmp_path, monkeypatch):
    real_open = os.open

    def no_direct(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(direct_mod.os, "open", no_direct)
    monkeypatch.setenv("WEIGHTSMITH_DIRECT_IO", "1")
    tensors = _tensors()
    assert _write_checkpoint(tmp_path / "out", tensors, planned=True) == 0
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == save(
        tensors, metadata={"format": "pt"}
    )


def test_direct_write_refused_midway_finishes_buffered(tmp_path, monkeypatch):
    real = direct_mod.pwrite_all
    refused = []

    def picky(fd, data, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT and not refused:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(direct_mod, "pwrite_all", picky)
    data = random.Random(5).randbytes(40 * BLOCK + 7)
    path = tmp_path / "f"
    _write_all(path, data, seed=5)
    assert path.read_bytes() == data
    assert refused  # the fallback really ran


def test_disk_full_during_direct_write_is_one_line_error_and_cleans_up(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setenv("WEIGHTSMITH_DIRECT_IO", "1")
    monkeypatch.setattr(direct_mod, "pwrite_all", full)
    with (
        pytest.raises(OutputError, match="no space left on device") as err,
        CheckpointWriter(tmp_path / "out") as w,
    ):
        w.plan([TensorSpec("a", torch.float32, (10_000,))])
        w.write("a", torch.zeros(10_000))
        w.commit()
    assert "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("env", "size", "wanted"),
    [
        (None, 1 << 30, True),
        (None, 1 << 20, False),
        ("0", 1 << 30, False),
        ("off", 1 << 30, False),
        ("1", 10, True),
        ("auto", direct_mod.AUTO_MIN_BYTES, True),
    ],
)
def test_direct_io_switch(monkeypatch, env, size, wanted):
    if env is None:
        monkeypatch.delenv("WEIGHTSMITH_DIRECT_IO", raising=False)
    else:
        monkeypatch.setenv("WEIGHTSMITH_DIRECT_IO", env)
    assert direct_io_wanted(size) is wanted


@pytest.mark.parametrize("lined_up", [True, False])
def test_buffers_at_the_write_phase_skip_the_staging_copy(tmp_path, monkeypatch, lined_up):
    """A buffer from aligned_empty at the announced phase goes to O_DIRECT as is (no staging
    copy); one at another phase is staged. Both write exactly the bytes given."""
    offset, n = 3 * BLOCK + 100, 5 * BLOCK + 7
    direct_mod.set_write_phase(offset if lined_up else offset + 8)
    buf = direct_mod.aligned_empty(n, torch.uint8)
    data = random.Random(4).randbytes(n)
    buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    staged = []
    real = DirectFile._write_direct
    monkeypatch.setattr(
        DirectFile, "_write_direct", lambda self, v, o: (staged.append(len(v)), real(self, v, o))
    )
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    os.ftruncate(fd, offset + n + BLOCK)
    sink = DirectFile(path, fd)
    try:
        sink.pwrite(memoryview(buf.numpy()), offset)
    finally:
        sink.close()
        os.close(fd)
    assert path.read_bytes()[offset : offset + n] == data
    if sink.direct_bytes == 0:
        pytest.skip(f"{tmp_path} does not take O_DIRECT writes (checked: same bytes buffered)")
    assert sink.direct_bytes == 4 * BLOCK  # the whole blocks inside [offset, offset + n)
    assert staged == ([] if lined_up else [4 * BLOCK])
