"""Read and write the safetensors container format without the whole-file API.

Format: 8-byte little-endian header length N, N bytes of UTF-8 JSON (padded with spaces to
a multiple of 8), then the raw little-endian tensor bytes at ``data_offsets``. Parsing the
header ourselves lets us validate a file completely (and name the problem) before any tensor
is read, and lets the writer lay out a file from shapes alone and fill it one tensor at a time.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from weightsmith.errors import CheckpointError
from weightsmith.io.dtypes import DTYPE_RANK, SAFETENSORS_TO_TORCH, itemsize

MAX_HEADER_SIZE = 100_000_000  # the limit safetensors itself enforces
FORMAT_METADATA = {"format": "pt"}  # what transformers writes and expects


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as a safetensors header describes it (offsets relative to the data start)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    """A parsed, validated safetensors header."""

    path: Path
    data_start: int  # absolute file offset of the first data byte
    entries: dict[str, TensorEntry]
    metadata: dict[str, str] | None
    raw: bytes  # the header bytes as stored, for fingerprints


def reject_duplicate_keys(where: str):
    """A json ``object_pairs_hook`` that refuses a key listed twice (JSON allows it silently)."""

    def hook(pairs: list[tuple[str, object]]) -> dict:
        out: dict = {}
        for key, value in pairs:
            if key in out:
                raise CheckpointError(f"{where}: tensor {key!r} is listed twice")
            out[key] = value
        return out

    return hook


def read_header(path: Path) -> Header:
    """Parse and fully validate the header of a ``.safetensors`` file.

    Checks the length prefix, JSON syntax, duplicate names, dtypes, shapes, that offsets match
    shapes, do not overlap, and cover the data section exactly (which catches truncation).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_SIZE or 8 + n > size:
                raise CheckpointError(
                    f"{path}: corrupt or truncated safetensors header "
                    f"(header length {n} bytes, file is {size} bytes)"
                )
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None

    try:
        text = raw.decode("utf-8")
        parsed = json.loads(text, object_pairs_hook=reject_duplicate_keys(str(path)))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    except RecursionError:  # e.g. '[' * 200000: JSON nested deeper than Python can parse
        raise CheckpointError(f"{path}: corrupt safetensors header (nested too deeply)") from None
    if not isinstance(parsed, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")

    metadata = parsed.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise CheckpointError(f"{path}: corrupt safetensors header (bad __metadata__)")

    data_len = size - 8 - n
    entries: dict[str, TensorEntry] = {}
    for name, info in parsed.items():
        entries[name] = _parse_entry(path, name, info, data_len)

    # Offsets must tile [0, data_len) without gaps or overlaps.
    cursor = 0
    for entry in sorted(entries.values(), key=lambda e: (e.begin, e.end)):
        if entry.begin != cursor:
            what = "overlaps another tensor" if entry.begin < cursor else "leaves a gap"
            raise CheckpointError(f"{path}: corrupt header: tensor {entry.name!r} {what}")
        cursor = entry.end
    if cursor != data_len:
        raise CheckpointError(
            f"{path}: truncated or corrupt: the header describes {cursor} bytes of tensor data "
            f"but the file holds {data_len}"
        )
    return Header(path=path, data_start=8 + n, entries=entries, metadata=metadata, raw=raw)


def _parse_entry(path: Path, name: str, info: object, data_len: int) -> TensorEntry:
    where = f"{path}: tensor {name!r}"
    if not isinstance(info, dict):
        raise CheckpointError(f"{where}: corrupt header entry")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in SAFETENSORS_TO_TORCH:
        raise CheckpointError(f"{where}: unsupported dtype {dtype!r}")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise CheckpointError(f"{where}: corrupt shape {shape!r}")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) and o >= 0 for o in offsets)
        and offsets[0] <= offsets[1]
    ):
        raise CheckpointError(f"{where}: corrupt data offsets {offsets!r}")
    if offsets[1] > data_len:
        raise CheckpointError(
            f"{where}: truncated or corrupt: data ends at byte {offsets[1]} but the file holds "
            f"{data_len} bytes of tensor data"
        )
    entry = TensorEntry(name, dtype, tuple(shape), offsets[0], offsets[1])
    if entry.nbytes != entry.numel * itemsize(dtype):
        raise CheckpointError(
            f"{where}: {entry.nbytes} bytes stored but shape {list(shape)} of {dtype} "
            f"needs {entry.numel * itemsize(dtype)}"
        )
    return entry


def order_like_safetensors(specs: list[tuple[str, str, int]]) -> list[tuple[str, str, int]]:
    """Order ``(name, dtype, nbytes)`` as ``safetensors.save_file`` does: dtype rank desc, name."""
    return sorted(specs, key=lambda s: (-DTYPE_RANK[s[1]], s[0]))


def build_header(entries: list[TensorEntry], metadata: dict[str, str] | None) -> bytes:
    """Serialize a header (length prefix + JSON padded to 8 bytes) exactly as safetensors does."""
    obj: dict[str, object] = {}
    if metadata:
        obj["__metadata__"] = metadata
    for e in entries:
        obj[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [e.begin, e.end]}
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def pwrite_all(fd: int, data: memoryview | bytes, offset: int) -> None:
    """``os.pwrite`` until every byte is written (pwrite may write fewer)."""
    view = memoryview(data).cast("B")
    while len(view):
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written
