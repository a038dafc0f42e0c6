"""The safetensors container: byte-exact output and precise errors for corrupt files."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from weightsmith.errors import CheckpointError
from weightsmith.io import CheckpointWriter, TensorSpec
from weightsmith.io.safetensors_format import read_header


def _mixed_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "b.half": torch.randn(3, 4, generator=g).half(),
        "a.float": torch.randn(2, generator=g),
        "c.u8": torch.randint(0, 255, (5,), dtype=torch.uint8),
        "d.bf16": torch.randn(2, 3, generator=g).bfloat16(),
        "e.i32": torch.randint(-5, 5, (1,), dtype=torch.int32),
        "f.f8": torch.randn(4, generator=g).to(torch.float8_e4m3fn),
        "g.i8": torch.randint(-5, 5, (7,), dtype=torch.int8),
        "h.bool": torch.tensor([True, False, True]),
        "i.i64": torch.arange(3),
        "z.empty": torch.zeros(0, 3),
    }


def test_planned_writer_is_byte_identical_to_save_file(tmp_path: Path) -> None:
    tensors = _mixed_tensors()
    save_file(tensors, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    with CheckpointWriter(tmp_path / "out") as w:
        w.plan([TensorSpec.of(k, v) for k, v in tensors.items()])
        for k, v in reversed(tensors.items()):  # write order must not matter
            w.write(k, v)
        w.commit()
    assert (tmp_path / "out/model.safetensors").read_bytes() == (
        tmp_path / "ref.safetensors"
    ).read_bytes()


def test_header_fields_parsed(tmp_path: Path) -> None:
    tensors = _mixed_tensors()
    save_file(tensors, tmp_path / "x.safetensors", metadata={"format": "pt"})
    header = read_header(tmp_path / "x.safetensors")
    assert header.metadata == {"format": "pt"}
    assert header.entries["b.half"].dtype == "F16"
    assert header.entries["b.half"].shape == (3, 4)
    assert header.entries["b.half"].nbytes == 24
    assert header.data_start % 8 == 0


def _write_raw(path: Path, header: dict, data: bytes) -> Path:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


@pytest.mark.parametrize(
    ("header", "data", "message"),
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "truncated"),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "needs 12"),
        ({"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "dtype"),
        ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 8]}}, b"\0" * 8, "shape"),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\0" * 12,
            "overlaps",
        ),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8, "offsets"),
    ],
)
def test_corrupt_headers_name_file_and_problem(
    tmp_path: Path, header: dict, data: bytes, message: str
) -> None:
    path = _write_raw(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(CheckpointError, match=message) as err:
        read_header(path)
    assert "bad.safetensors" in str(err.value)


def test_truncated_length_prefix_and_garbage(tmp_path: Path) -> None:
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        read_header(short)
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(CheckpointError, match="header length"):
        read_header(huge)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(struct.pack("<Q", 8) + b"{not json")
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        read_header(garbage)


def test_duplicate_tensor_in_header(tmp_path: Path) -> None:
    entry = '{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'
    text = ('{"a":' + entry + ',"a":' + entry + "}").encode()
    text += b" " * (-len(text) % 8)
    path = tmp_path / "dup.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"\0" * 4)
    with pytest.raises(CheckpointError, match="'a' is listed twice"):
        read_header(path)
