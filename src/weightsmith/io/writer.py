"""Sharded, atomic checkpoint output that holds at most one tensor in memory.

The writer works in a temporary directory beside OUT and renames it into place only in
:meth:`CheckpointWriter.commit`; any exception (or Ctrl-C) removes it, so a failed run leaves
nothing behind. With :meth:`plan` (names, dtypes and shapes known up front) it lays out each
shard's header first and writes every tensor straight to its offset: one pass over the bytes,
byte-identical to ``safetensors.save_file``. Without a plan it spills each shard's data to a
side file and assembles the shard when it is full.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from weightsmith.errors import OutputError
from weightsmith.io.consistency import check_written_config
from weightsmith.io.direct import DirectFile, direct_io_wanted, set_write_phase
from weightsmith.io.dtypes import safetensors_dtype
from weightsmith.io.paths import check_output_location
from weightsmith.io.placement import clean_stale_temporaries, move_into_place, temp_path
from weightsmith.io.provenance import WriteSummary, provenance_record
from weightsmith.io.safetensors_format import (
    FORMAT_METADATA,
    TensorEntry,
    build_header,
    order_like_safetensors,
    pwrite_all,
)
from weightsmith.io.sizes import format_size
from weightsmith.io.support_files import copy_support_files
from weightsmith.io.write_behind import WriteBehind, copy_range

DEFAULT_MAX_SHARD_SIZE = 5 * 10**9  # transformers' save_pretrained default
PROVENANCE_NAME = "weightsmith.json"


@dataclass(frozen=True)
class TensorSpec:
    """What will be written: name, torch dtype and shape (no data)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n

    @classmethod
    def of(cls, name: str, t: torch.Tensor) -> TensorSpec:
        return cls(name, t.dtype, tuple(t.shape))


@dataclass
class _Shard:
    entries: dict[str, TensorEntry] = field(default_factory=dict)
    size: int = 0
    tmp_name: str = ""
    data_start: int = 0
    pending: int = 0  # planned tensors not written yet


class CheckpointWriter:
    """Write a Hugging Face checkpoint one tensor at a time; nothing appears at OUT until commit.

    Use as a context manager: leaving the block by an exception deletes the temporary directory.
    """

    def __init__(
        self,
        out: str | os.PathLike[str],
        *,
        max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
        force: bool = False,
        inputs: Iterable[str | os.PathLike[str]] = (),
        weights_name: str = "model",
    ) -> None:
        """``weights_name`` names the files: ``model.safetensors`` (the default), or e.g.
        ``adapter_model`` for a PEFT adapter folder."""
        self.out = Path(out).absolute()
        self.weights_name = weights_name
        self.max_shard_size = max_shard_size
        self.force = force
        check_output_location(self.out, [Path(p) for p in inputs], force)
        self._created_parents = _missing_parents(self.out.parent)
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            clean_stale_temporaries(self.out.parent)  # left by runs that were SIGKILLed
            self.tmp = temp_path(self.out)
            self.tmp.mkdir()
        except OSError as e:
            self._remove_parents()
            raise OutputError(f"cannot create output beside {self.out}: {e.strerror}") from None
        self._shards: list[_Shard] = []
        self._planned: dict[str, tuple[int, TensorSpec]] | None = None
        self._written: set[str] = set()
        self._fds: dict[int, int] = {}
        self._direct: dict[int, DirectFile] = {}
        self.direct_bytes = 0  # tensor bytes that went past the page cache (O_DIRECT)
        self._extra_files: list[str] = []
        self._behind = WriteBehind()
        self._done = False

    # ---------------------------------------------------------------- planning
    def plan(self, specs: Iterable[TensorSpec]) -> None:
        """Fix the shard layout from shapes alone; later writes go straight to their offsets."""
        if self._planned is not None or self._written:
            raise RuntimeError("plan() must be called once, before any write")
        specs = list(specs)
        seen: set[str] = set()
        groups: list[list[TensorSpec]] = [[]]
        size = 0
        for spec in specs:
            if spec.name in seen:
                raise OutputError(f"{self.out}: tensor {spec.name!r} would be written twice")
            seen.add(spec.name)
            if groups[-1] and size + spec.nbytes > self.max_shard_size:
                groups.append([])
                size = 0
            groups[-1].append(spec)
            size += spec.nbytes
        self._check_free_space(sum(s.nbytes for s in specs))
        self._planned = {}
        by_name = {s.name: s for s in specs}
        for k, group in enumerate(groups):
            shard = _Shard(tmp_name=f"shard-{k:05d}.safetensors")
            order = order_like_safetensors(
                [(s.name, safetensors_dtype(s.dtype), s.nbytes) for s in group]
            )
            offset = 0
            for name, dtype, nbytes in order:
                shape = by_name[name].shape
                shard.entries[name] = TensorEntry(name, dtype, shape, offset, offset + nbytes)
                offset += nbytes
                self._planned[name] = (k, by_name[name])
            shard.size = offset
            shard.pending = len(shard.entries)
            header = build_header(list(shard.entries.values()), FORMAT_METADATA)
            shard.data_start = len(header)
            path = self.tmp / shard.tmp_name
            self._io(path, lambda p=path, h=header, n=offset: _create_file(p, h, n))
            self._shards.append(shard)

    # ---------------------------------------------------------------- writing
    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write one tensor (moved to CPU, made contiguous)."""
        t = tensor.detach().to("cpu").contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
        self._write(TensorSpec.of(name, t), [memoryview(data)])

    def write_raw(self, spec: TensorSpec, chunks: Iterable[bytes]) -> None:
        """Write a tensor from its stored bytes (a bit-exact copy without decoding).

        Chunks are written behind the caller (see :class:`WriteBehind`), so a chunk's buffer
        must not change after it has been handed over: yield fresh buffers, never a reused one.
        """
        self._write(spec, chunks)

    def write_from_file(self, spec: TensorSpec, src: Path, src_offset: int) -> None:
        """Copy a tensor's bytes from another file in the kernel (``copy_file_range``): the
        fastest bit-exact path, with no tensor data passing through this process's memory."""
        self._write(spec, source=(Path(src), src_offset))

    def _write(
        self,
        spec: TensorSpec,
        chunks: Iterable[bytes | memoryview] = (),
        source: tuple[Path, int] | None = None,
    ) -> None:
        k, entry = self._reserve(spec)
        shard = self._shards[k]
        fd = self._fd(k)
        sink = self._direct.get(k)
        path = self.tmp / shard.tmp_name
        offset = shard.data_start + entry.begin
        if source is not None:
            self._io(path, lambda: copy_range(source[0], source[1], fd, offset, entry.nbytes))
        else:
            written = 0
            it = iter(chunks)
            while True:
                if sink is not None:
                    set_write_phase(offset + written)  # lets producers line buffers up
                chunk = next(it, None)
                if chunk is None:
                    break
                n = len(memoryview(chunk).cast("B"))
                if written + n > entry.nbytes:
                    raise OutputError(
                        f"{self.out}: tensor {spec.name!r} has more bytes than its shape"
                    )
                if sink is not None:
                    write = lambda c=chunk, o=offset + written: sink.pwrite(c, o)  # noqa: E731
                else:
                    write = lambda c=chunk, o=offset + written: pwrite_all(fd, c, o)  # noqa: E731
                self._behind.submit(lambda w=write: self._io(path, w), n)
                written += n
            if written != entry.nbytes:
                raise OutputError(
                    f"{self.out}: tensor {spec.name!r}: got {written} bytes, expected {entry.nbytes}"
                )
        self._written.add(spec.name)
        if self._planned is not None:
            shard.pending -= 1
            if shard.pending == 0:
                self._close_fd(k)  # shard complete: do not hold one descriptor per shard

    def _reserve(self, spec: TensorSpec) -> tuple[int, TensorEntry]:
        """Check a tensor against the plan (or append it to the spill shard): its shard, entry."""
        if spec.name in self._written:
            raise OutputError(f"{self.out}: tensor {spec.name!r} written twice")
        if self._planned is not None:
            if spec.name not in self._planned:
                raise OutputError(f"{self.out}: tensor {spec.name!r} was not planned")
            k, planned = self._planned[spec.name]
            if (planned.dtype, planned.shape) != (spec.dtype, spec.shape):
                raise OutputError(
                    f"{self.out}: tensor {spec.name!r} is {spec.dtype} {list(spec.shape)} "
                    f"but was planned as {planned.dtype} {list(planned.shape)}"
                )
            return k, self._shards[k].entries[spec.name]
        k = self._spill_target(spec)
        shard = self._shards[k]
        begin = shard.size
        entry = TensorEntry(
            spec.name, safetensors_dtype(spec.dtype), spec.shape, begin, begin + spec.nbytes
        )
        shard.entries[spec.name] = entry
        shard.size = entry.end
        return k, entry

    def _spill_target(self, spec: TensorSpec) -> int:
        if not self._shards or (
            self._shards[-1].entries and self._shards[-1].size + spec.nbytes > self.max_shard_size
        ):
            if self._shards:
                self._assemble_spilled(len(self._shards) - 1)
            k = len(self._shards)
            self._shards.append(_Shard(tmp_name=f"shard-{k:05d}.data"))
        return len(self._shards) - 1

    def _assemble_spilled(self, k: int) -> None:
        """Turn a spilled data file into a safetensors shard (header + data)."""
        shard = self._shards[k]
        self._close_fd(k)
        data_path = self.tmp / shard.tmp_name
        final = self.tmp / f"shard-{k:05d}.safetensors"
        header = build_header(list(shard.entries.values()), FORMAT_METADATA)

        def assemble() -> None:
            with open(final, "wb") as dst, open(data_path, "rb") as src:
                dst.write(header)
                shutil.copyfileobj(src, dst, 16 << 20)
            data_path.unlink()

        self._io(final, assemble)
        shard.tmp_name = final.name

    def _fd(self, k: int) -> int:
        fd = self._fds.get(k)
        if fd is None:
            path = self.tmp / self._shards[k].tmp_name
            fd = self._io(path, lambda: os.open(path, os.O_WRONLY | os.O_CREAT, 0o644))
            self._fds[k] = fd
            shard = self._shards[k]
            # Planned shards know their size; spilled ones only when direct I/O is forced.
            size = shard.size if self._planned is not None else 0
            if direct_io_wanted(size):
                self._direct[k] = self._io(path, lambda: DirectFile(path, fd))
        return fd

    def _close_fd(self, k: int) -> None:
        if k in self._fds:
            self._behind.drain()  # no write into this descriptor may still be queued
        sink = self._direct.pop(k, None)
        if sink is not None:
            self.direct_bytes += sink.direct_bytes
            sink.close()
        fd = self._fds.pop(k, None)
        if fd is not None:
            os.close(fd)

    # ---------------------------------------------------------------- extra files
    def copy_support_files(
        self,
        src_dir: str | os.PathLike[str],
        config_patch: dict | Callable[[dict], dict] | None = None,
        skip: Iterable[str] = (),
    ) -> list[str]:
        """Copy config/tokenizer/generation files from ``src_dir``; patch config.json if asked.
        Symlinks follow the checkpoint rule of :func:`weightsmith.io.paths.checked_member`."""
        return copy_support_files(Path(src_dir), self.tmp, self._io, config_patch, skip)

    def write_json(self, name: str, obj: object) -> None:
        """Write a JSON file (config.json, a report, ...) into the output."""
        self.write_text(name, json.dumps(obj, indent=2, sort_keys=False) + "\n")

    def write_text(self, name: str, text: str) -> None:
        path = self.tmp / name
        self._io(path, lambda: path.write_text(text, encoding="utf-8"))
        self._extra_files.append(name)

    def write_bytes(self, name: str, data: bytes) -> None:
        path = self.tmp / name
        self._io(path, lambda: path.write_bytes(data))
        self._extra_files.append(name)

    # ---------------------------------------------------------------- finishing
    def commit(self, provenance: dict | None = None) -> WriteSummary:
        """Check completeness, name shards, write index and provenance, move into place."""
        if self._planned is not None:
            missing = [n for n in self._planned if n not in self._written]
            if missing:
                raise OutputError(
                    f"{self.out}: {len(missing)} planned tensors never written "
                    f"(first: {missing[0]!r})"
                )
        elif self._shards and self._shards[-1].tmp_name.endswith(".data"):
            self._assemble_spilled(len(self._shards) - 1)
        self._check_config()
        self._behind.drain()
        for k in list(self._fds):
            self._close_fd(k)
        n = len(self._shards)
        base = self.weights_name
        names = (
            [f"{base}.safetensors"]
            if n <= 1
            else [f"{base}-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        )
        weight_map: dict[str, str] = {}
        for shard, final in zip(self._shards, names, strict=False):
            self._io(
                self.tmp / final,
                lambda s=shard, f=final: os.rename(self.tmp / s.tmp_name, self.tmp / f),
            )
            for name in shard.entries:
                weight_map[name] = final
        if n == 0:  # an empty model still gets a valid (empty) file
            header = build_header([], FORMAT_METADATA)
            self._io(self.tmp / names[0], lambda: (self.tmp / names[0]).write_bytes(header))
        total = sum(s.size for s in self._shards)
        if n > 1:
            index = {
                "metadata": {"total_size": total},
                "weight_map": dict(sorted(weight_map.items())),
            }
            index_name = f"{base}.safetensors.index.json"
            self.write_text(index_name, json.dumps(index, indent=2, sort_keys=True) + "\n")
        summary = WriteSummary(str(self.out), names, len(weight_map), total)
        self.write_json(PROVENANCE_NAME, provenance_record(provenance or {}, summary))
        move_into_place(self.tmp, self.out, self.force)
        self._done = True
        self._behind.close()
        return summary

    def _check_config(self) -> None:
        """Refuse to commit a config.json that disagrees with the tensors written (as the
        reader would refuse to open it): a transform that changed shapes must say so."""
        if self.weights_name == "model":
            shapes = {e.name: (e.shape, e.dtype) for s in self._shards for e in s.entries.values()}
            check_written_config(self.tmp / "config.json", shapes, f"{self.out}/config.json")

    def abort(self) -> None:
        """Remove everything written so far (and parent directories this writer created)."""
        with contextlib.suppress(Exception):
            self._behind.drain()
        for k in list(self._fds):
            with contextlib.suppress(OSError):
                self._close_fd(k)
        shutil.rmtree(self.tmp, ignore_errors=True)
        self._remove_parents()
        self._done = True
        self._behind.close()

    def _remove_parents(self) -> None:
        for parent in self._created_parents:
            try:
                parent.rmdir()
            except OSError:
                break

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._done:
            self.abort()

    # ---------------------------------------------------------------- helpers
    def _check_free_space(self, needed: int) -> None:
        free = shutil.disk_usage(self.tmp).free
        if needed > free:
            raise OutputError(
                f"not enough free space for {self.out}: need {format_size(needed)}, "
                f"{format_size(free)} free"
            )

    def _io(self, path: Path, fn: Callable[[], object]):
        """Run a file operation, turning OS errors into one-line OutputErrors naming the file."""
        try:
            return fn()
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise OutputError(f"no space left on device while writing {path}") from None
            raise OutputError(f"cannot write {path}: {e.strerror or e}") from None


def _create_file(path: Path, header: bytes, data_size: int) -> None:
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(len(header) + data_size)


def _missing_parents(path: Path) -> list[Path]:
    """Directories that do not exist yet, deepest first (removed again on abort)."""
    out = []
    while not path.exists():
        out.append(path)
        path = path.parent
    return out
