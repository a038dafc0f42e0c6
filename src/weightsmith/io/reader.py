"""Lazy, validated access to a Hugging Face checkpoint: headers first, tensors one at a time.

``open_checkpoint(path)`` accepts a directory holding ``model.safetensors`` or shards plus
``model.safetensors.index.json``, or a single ``.safetensors`` file. Every header is parsed and
cross-checked against the index and config.json on open (:mod:`weightsmith.io.discovery`), so a
corrupt or inconsistent checkpoint fails before any work starts. Tensor data is read lazily,
one tensor (or a block of rows) at a time.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from weightsmith.errors import CheckpointError
from weightsmith.io.architectures import Architecture, detect_architecture
from weightsmith.io.consistency import check_config_shapes
from weightsmith.io.discovery import (
    PICKLE_INDEX,
    PICKLE_SINGLE,
    SAFE_INDEX,
    SAFE_SINGLE,
    TensorInfo,
    discover,
    load_pickle,
    read_config,
)
from weightsmith.io.safetensors_format import Header

_FULL_HASH_LIMIT = 16 << 20
_MAPS: dict[int, tuple[mmap.mmap, int]] = {}  # live mapped_flat tensors: (map, data offset)


def drop_mapped_pages(t: torch.Tensor, start: int, stop: int) -> None:
    """Take elements [start, stop) of a :meth:`Checkpoint.mapped_flat` tensor out of this
    process's resident memory once read (whole pages inside the range; the file stays in the
    page cache and a later read maps it back). A no-op for any other tensor, so a streamed pass
    over a mapped tensor holds only the pages it has not finished with."""
    entry = _MAPS.get(t.data_ptr())
    if entry is None or stop <= start:
        return
    mm, offset = entry
    page = mmap.PAGESIZE
    a = offset + start * t.element_size()
    b = offset + stop * t.element_size()
    a = -(-a // page) * page
    b = b // page * page
    if b > a:
        with contextlib.suppress(AttributeError, OSError, ValueError):
            mm.madvise(mmap.MADV_DONTNEED, a, b - a)


@dataclass(frozen=True)
class TensorGroup:
    """Tensors processed together: one tensor, or all tensors of one decoder layer."""

    key: str  # "model.layers.3" / "embed" / "final" / a tensor name
    layer: int | None
    names: tuple[str, ...]


class Checkpoint:
    """An opened checkpoint. Lists tensors from headers; reads data only when asked."""

    def __init__(self, path: Path, *, allow_pickle: bool = False) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise CheckpointError(f"{self.path}: no such file or directory")
        self.root = self.path if self.path.is_dir() else self.path.parent
        self._handles: dict[str, object] = {}
        self._fds: dict[str, int] = {}
        self._pickle_cache: tuple[str, dict[str, torch.Tensor]] | None = None
        layout = discover(self.path, self.root, allow_pickle)
        if not layout.tensors:
            raise CheckpointError(f"{self.path}: no tensors (its safetensors header is empty)")
        self._headers: dict[str, Header] = layout.headers
        self._index_bytes = layout.index_bytes
        self.format = layout.format
        self.tensors: dict[str, TensorInfo] = layout.tensors
        self.config: dict | None = read_config(self.root)
        self.arch: Architecture = detect_architecture(self.config, list(self.tensors))
        check_config_shapes(
            self.config,
            self.arch,
            {n: (i.shape, i.dtype) for n, i in self.tensors.items()},
            str(self.root / "config.json"),
        )

    def _load_pickle(self, shard: str) -> dict[str, torch.Tensor]:
        if self._pickle_cache and self._pickle_cache[0] == shard:
            return self._pickle_cache[1]
        state = load_pickle(self.root, shard)
        self._pickle_cache = (shard, state)
        return state

    # ----------------------------------------------------------------- reading
    def get_tensor(self, name: str) -> torch.Tensor:
        """Read one tensor into fresh memory (the checkpoint stays untouched).

        Safetensors data is read with ``pread`` rather than through an mmap: pages of a mapped
        file count towards resident memory until the kernel evicts them, so a long streaming
        run over mmaps looks (and on tight machines behaves) like it holds the whole model.
        """
        info = self.info(name)
        if self.format == "pickle":
            return self._load_pickle(info.shard)[name].clone()
        return self.read_rows(name, 0, info.shape[0] if info.shape else 1).reshape(info.shape)

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of a tensor (along dim 0), reading only those bytes: lets a
        method process a huge embedding or projection in bounded-memory blocks."""
        info = self.info(name)
        if self.format == "pickle":
            return self._load_pickle(info.shard)[name][start:stop].clone()
        rows = info.shape[0] if info.shape else 1
        start, stop = max(0, start), min(stop, rows)
        row_bytes = info.nbytes // rows if rows else 0
        shape = (max(stop - start, 0), *info.shape[1:]) if info.shape else ()
        out = torch.empty(shape, dtype=info.torch_dtype)
        if out.numel() == 0:
            return out
        self._pread_into(info, start * row_bytes, out)
        return out

    @contextlib.contextmanager
    def mapped_flat(self, name: str) -> Iterator[torch.Tensor]:
        """The whole tensor as stored, 1-D, memory-mapped read-only: kernels read the page
        cache in place (no copy, no allocation). The tensor holds the mapping, so it is
        unmapped as soon as the last view of it is freed (normally on leaving the block), and
        resident pages never add up beyond the tensors in use."""
        info = self.info(name)
        if self.format == "pickle" or info.nbytes == 0:
            yield self.get_tensor(name).reshape(-1)
            return
        header = self._headers[info.shard]
        start = header.data_start + header.entries[name].begin
        base = start // mmap.ALLOCATIONGRANULARITY * mmap.ALLOCATIONGRANULARITY
        try:
            mm = mmap.mmap(
                self._fd(info.shard),
                start + info.nbytes - base,
                offset=base,
                access=mmap.ACCESS_READ,
            )
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{header.path}: cannot map {name!r} ({e})") from None
        with contextlib.suppress(AttributeError, OSError):  # start reading ahead if on disk
            mm.madvise(mmap.MADV_WILLNEED)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # read-only buffer: kernels only read it
            t = torch.frombuffer(mm, dtype=info.torch_dtype, count=info.numel, offset=start - base)
        _MAPS[t.data_ptr()] = (mm, start - base)
        del mm  # the tensor keeps the map alive; never close() it under a live view
        try:
            yield t
        finally:
            _MAPS.pop(t.data_ptr(), None)
            del t

    def _pread_into(self, info: TensorInfo, byte_offset: int, out: torch.Tensor) -> None:
        """Fill ``out`` with the tensor's stored bytes from ``byte_offset`` on."""
        header = self._headers[info.shard]
        offset = header.data_start + header.entries[info.name].begin + byte_offset
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        fd = self._fd(info.shard)
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                raise CheckpointError(f"{header.path}: file shrank while reading {info.name!r}")
            done += n

    def raw_location(self, name: str) -> tuple[Path, int] | None:
        """(file, absolute byte offset) of a tensor's stored bytes, for kernel-side copies;
        None for pickle checkpoints."""
        if self.format == "pickle":
            return None
        info = self.info(name)
        header = self._headers[info.shard]
        return header.path, header.data_start + header.entries[name].begin

    def get_slice(self, name: str):
        """A lazy ``safe_open`` slice handle (``handle[:, a:b]``), for arbitrary partial reads."""
        info = self.info(name)
        if self.format == "pickle":
            return self._load_pickle(info.shard)[name]
        return self._handle(info.shard).get_slice(name)

    def raw_chunks(self, name: str, chunk_size: int = 64 << 20) -> Iterator[bytes]:
        """The tensor's stored bytes, in chunks: a bit-exact copy path with bounded memory."""
        info = self.info(name)
        if self.format == "pickle":
            t = self._load_pickle(info.shard)[name].contiguous()
            yield t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
            return
        header = self._headers[info.shard]
        entry = header.entries[name]
        start, end = header.data_start + entry.begin, header.data_start + entry.end
        with open(header.path, "rb") as f:
            pos = start
            while pos < end:
                n = min(chunk_size, end - pos)
                data = os.pread(f.fileno(), n, pos)
                if len(data) != n:
                    raise CheckpointError(f"{header.path}: file shrank while reading {name!r}")
                yield data
                pos += n

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}") from None

    def _handle(self, shard: str):
        h = self._handles.get(shard)
        if h is None:
            try:
                h = safe_open(str(self.root / shard), framework="pt", device="cpu")
            except Exception as e:
                raise CheckpointError(f"{self.root / shard}: cannot open ({e})") from None
            self._handles[shard] = h
        return h

    def _fd(self, shard: str) -> int:
        fd = self._fds.get(shard)
        if fd is None:
            path = self._headers[shard].path
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as e:
                raise CheckpointError(f"{path}: cannot open ({e.strerror})") from None
            kept = self._fds.setdefault(shard, fd)  # another thread may have opened it first
            if kept != fd:
                os.close(fd)
            fd = kept
        return fd

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._handles.clear()
        self._pickle_cache = None

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- structure
    @property
    def shards(self) -> list[str]:
        return list(dict.fromkeys(i.shard for i in self.tensors.values()))

    @property
    def num_params(self) -> int:
        return sum(i.numel for i in self.tensors.values())

    @property
    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self.tensors.values())

    def layers(self) -> dict[int, list[str]]:
        """Decoder-layer index -> its tensor names, in stored order."""
        out: dict[int, list[str]] = {}
        for name in self.tensors:
            layer = self.arch.layer_of(name)
            if layer is not None:
                out.setdefault(layer, []).append(name)
        return dict(sorted(out.items()))

    @property
    def num_layers(self) -> int:
        layers = self.layers()
        return max(layers) + 1 if layers else 0

    @property
    def tied_embeddings(self) -> bool:
        """True when the lm_head shares the input embedding (config says so or it is absent)."""
        if self.config and "tie_word_embeddings" in self.config:
            return bool(self.config["tie_word_embeddings"])
        head = self.arch.lm_head
        return (
            head is not None
            and head not in self.tensors
            and any(e in self.tensors for e in self.arch.embed)
        )

    def groups(self, by: str = "tensor") -> list[TensorGroup]:
        """Processing units: ``tensor`` (one each, stored order) or ``layer`` (embeddings,
        then each decoder layer, then everything else)."""
        if by == "tensor":
            return [TensorGroup(n, self.arch.layer_of(n), (n,)) for n in self.tensors]
        if by != "layer":
            raise ValueError(f"unknown grouping {by!r}")
        layers = self.layers()
        in_layers = {n for names in layers.values() for n in names}
        embed = tuple(n for n in self.tensors if n in self.arch.embed)
        rest = tuple(n for n in self.tensors if n not in in_layers and n not in embed)
        out = [TensorGroup("embed", None, embed)] if embed else []
        for idx, names in layers.items():
            prefix = self.arch.layer_prefix(names[0]) or str(idx)
            out.append(TensorGroup(prefix.rstrip("."), idx, tuple(names)))
        if rest:
            out.append(TensorGroup("final", None, rest))
        return out

    def fingerprint(self) -> str:
        """A cheap identity of the checkpoint: index, headers, file sizes and data bytes.

        Shards up to 16 MiB are hashed whole; larger ones by 17 fixed 4 KiB windows (reading
        every byte of a 70B model would cost minutes). Headers plus samples catch renamed,
        resharded, recast and most edited checkpoints; the location does not count.
        """
        h = hashlib.sha256(self._index_bytes)
        for shard in self.shards:
            file = self.root / shard
            size = file.stat().st_size
            h.update(f"{shard}:{size}".encode())
            header = self._headers.get(shard)
            if header is not None:
                h.update(header.raw)
            with open(file, "rb") as f:
                if size <= _FULL_HASH_LIMIT:
                    h.update(f.read())
                    continue
                for pos in [size * k // 16 for k in range(16)] + [size - 4096]:
                    f.seek(pos)
                    h.update(f.read(4096))
        return "sha256:" + h.hexdigest()


def open_checkpoint(path: str | os.PathLike[str], *, allow_pickle: bool = False) -> Checkpoint:
    """Open a checkpoint directory or ``.safetensors`` file, validating every header."""
    return Checkpoint(Path(path), allow_pickle=allow_pickle)


__all__ = [
    "PICKLE_INDEX",
    "PICKLE_SINGLE",
    "SAFE_INDEX",
    "SAFE_SINGLE",
    "Checkpoint",
    "TensorGroup",
    "TensorInfo",
    "open_checkpoint",
]
