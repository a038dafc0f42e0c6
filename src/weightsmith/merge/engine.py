"""The streaming merge engine: every output tensor is computed chunk by chunk from its inputs.

Inputs are read with ``pread`` in aligned flat chunks (never the whole model, never an mmap that
would keep pages resident), converted to float32 on the compute device, combined by the method
and written straight to their offset in the output shard. Peak memory is a few chunks per input
plus what a method needs for whole-tensor statistics (TIES without the native kernels: one
float32 copy of |δ|).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace

import torch

from weightsmith.core.parallel import pmap, sub_ranges
from weightsmith.core.transform import checked_chunks
from weightsmith.errors import CheckpointError
from weightsmith.io.reader import Checkpoint, drop_mapped_pages
from weightsmith.io.writer import TensorSpec
from weightsmith.kernels import merge as native
from weightsmith.kernels.quant import count_nonfinite
from weightsmith.merge.methods import get_method
from weightsmith.merge.methods.base import ChunkSource, TensorChunks, fail_overflow, run_method
from weightsmith.merge.plan import TensorJob
from weightsmith.merge.vocab import VocabMerge

DEFAULT_CHUNK_ELEMENTS = 1 << 22  # 4M elements: 16 MB per float32 input chunk
DEFAULT_CACHE_BYTES = 256 << 20  # float32 copies of one tensor's inputs kept between passes
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class CheckpointChunks(ChunkSource):
    """Aligned float32 chunks of one tensor from several checkpoints, read with pread.

    Each input is checked for NaN/Inf on its first pass; ``numel`` may be smaller than the
    stored tensor (common vocabulary rows), in which case only that prefix is read.
    """

    def __init__(
        self,
        inputs: Sequence[tuple[Checkpoint, str]],
        name: str,
        shape: tuple[int, ...],
        numel: int,
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
        device: torch.device | str = "cpu",
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        self.inputs = list(inputs)
        self.name = name
        self.shape = shape
        self.numel = numel
        self.num_inputs = len(inputs)
        self.chunk = max(1, chunk_elements)
        self.device = torch.device(device)
        self._checked: set[int] = set()
        # Multi-pass methods (SLERP, TIES) read inputs again; keep the converted chunks when
        # all inputs of this tensor fit the budget, so later passes skip pread + conversion.
        self._cache: dict[int, list[torch.Tensor]] | None = (
            {} if numel * 4 * len(inputs) <= cache_bytes else None
        )

    def chunks(self, indices: Sequence[int] | None = None) -> Iterator[list[torch.Tensor]]:
        idx = list(range(self.num_inputs)) if indices is None else list(indices)
        streams = [self._stream(i) for i in idx]
        try:
            yield from (list(parts) for parts in zip(*streams, strict=True))
        finally:
            for s in streams:
                s.close()

    def _stream(self, i: int) -> Iterator[torch.Tensor]:
        if self._cache is not None and i in self._cache:
            yield from self._cache[i]
            return
        kept: list[torch.Tensor] | None = [] if self._cache is not None else None
        ckpt, tname = self.inputs[i]
        dtype = ckpt.info(tname).torch_dtype
        check = i not in self._checked
        remaining = self.numel
        for piece in _pieces(ckpt, tname, self.chunk, dtype):
            t = piece[:remaining] if piece.numel() > remaining else piece
            out = _to_float32(t, self.device, check)
            if out is None:
                raise CheckpointError(f"{ckpt.path}: tensor {tname!r} holds NaN or Inf values")
            remaining -= out.numel()
            if kept is not None:
                kept.append(out)
            if remaining <= 0:
                # Record before the last yield: zip() abandons the other streams right after
                # their last chunk, so code after it would never run for them.
                self._finish(i, check, kept)
                yield out
                return
            yield out
        self._finish(i, check, kept)

    def stored(self, i: int) -> contextlib.AbstractContextManager[torch.Tensor]:
        ckpt, tname = self.inputs[i]
        return ckpt.mapped_flat(tname)

    def fail_nonfinite(self, i: int) -> None:
        ckpt, tname = self.inputs[i]
        raise CheckpointError(f"{ckpt.path}: tensor {tname!r} holds NaN or Inf values")

    def whole_stored(self, i: int, dtype: torch.dtype) -> torch.Tensor | None:
        """A CPU copy of a safetensors input stored as ``dtype``, made from its mapping in
        parallel pieces, each checked for NaN/Inf, the mapped pages dropped after (no float32
        pass, no chunk cache)."""
        ckpt, tname = self.inputs[i]
        if self.device.type != "cpu" or ckpt.format != "safetensors" or dtype not in native.STORAGE:
            return None
        if ckpt.info(tname).torch_dtype != dtype:
            return None
        out = torch.empty(self.numel, dtype=dtype)
        with ckpt.mapped_flat(tname) as x:

            def bad(r: tuple[int, int]) -> bool:
                part = out[r[0] : r[1]]
                part.copy_(x[r[0] : r[1]])
                n = count_nonfinite(part)
                return bool(n) if n is not None else not _all_finite(part.float())

            found = any(pmap(bad, sub_ranges(0, self.numel)))
            drop_mapped_pages(x, 0, self.numel)
        if found:
            self.fail_nonfinite(i)
        self._checked.add(i)
        return out

    def _finish(self, i: int, checked: bool, kept: list[torch.Tensor] | None) -> None:
        if checked:
            self._checked.add(i)
        if kept is not None and self._cache is not None:
            self._cache[i] = kept


def _to_float32(t: torch.Tensor, device: torch.device, check: bool) -> torch.Tensor | None:
    """A float32 copy of ``t`` on ``device`` (converted in parallel sub-chunks on the CPU), or
    None when ``check`` finds a NaN/Inf."""
    if device.type != "cpu":
        out = t.to(device, torch.float32, copy=True)
        return None if check and not _all_finite(out) else out
    out = torch.empty(t.numel(), dtype=torch.float32)

    def convert(r: tuple[int, int]) -> bool:
        part = out[r[0] : r[1]]
        bad = native.to_float32(t[r[0] : r[1]], part, check)  # one fused pass when it can
        if bad is not None:
            return bad == 0
        part.copy_(t[r[0] : r[1]])
        return not check or _all_finite(part)

    return out if all(pmap(convert, sub_ranges(0, t.numel()))) else None


def _all_finite(x: torch.Tensor) -> bool:
    """True when x has no NaN/Inf: a sum is finite unless one is there (or it overflows)."""
    return math.isfinite(float(x.sum())) or bool(torch.isfinite(x).all())


def _pieces(ckpt: Checkpoint, name: str, chunk: int, dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """The stored tensor as flat pieces of ``chunk`` elements, without mmap."""
    if ckpt.format != "safetensors":
        flat = ckpt.get_tensor(name).reshape(-1)
        for start in range(0, flat.numel(), chunk):
            yield flat[start : start + chunk]
        return
    for raw in ckpt.raw_chunks(name, chunk_size=chunk * dtype.itemsize):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # read-only buffer: we copy before any write
            yield torch.frombuffer(raw, dtype=dtype)


NARROW = (torch.bfloat16, torch.float16)  # compute dtypes with mergekit's own arithmetic


def with_compute_dtype(
    jobs: Sequence[TensorJob], ckpts: Mapping[str, Checkpoint], name: str | None
) -> list[TensorJob]:
    """Each merged job with the dtype of its arithmetic, as mergekit 0.1.5 picks it: ``name``
    (the recipe's ``dtype`` or weightsmith's ``compute_dtype``), else the inputs' dtype
    (promoted). bfloat16/float16 arithmetic follows mergekit's torch ops in that dtype; float32
    (or float64 inputs) runs weightsmith's float32 path, native kernels included."""
    from weightsmith.io.dtypes import parse_user_dtype

    fixed = parse_user_dtype(name) if name else None
    out = []
    for job in jobs:
        if job.params is not None:
            dt = fixed
            if dt is None:
                stored = [ckpts[m].info(n).torch_dtype for m, n in job.inputs]
                dt = stored[0]
                for d in stored[1:]:
                    dt = torch.promote_types(dt, d)
            if dt in NARROW:
                job = replace(job, params=replace(job.params, compute_dtype=dt))
        out.append(job)
    return out


def job_output_dtype(
    job: TensorJob, ckpts: Mapping[str, Checkpoint], out_dtype: torch.dtype | None
):
    """The dtype a job writes: ``out_dtype`` for float tensors, else the first input's."""
    model, name = job.inputs[0]
    stored = ckpts[model].info(name).torch_dtype
    return out_dtype if out_dtype is not None and stored in FLOAT_DTYPES else stored


def job_spec(job: TensorJob, ckpts: Mapping[str, Checkpoint], out_dtype: torch.dtype | None):
    return TensorSpec(job.out_name, job_output_dtype(job, ckpts, out_dtype), job.shape)


def produce(
    job: TensorJob,
    ckpts: Mapping[str, Checkpoint],
    spec: TensorSpec,
    *,
    device: str = "cpu",
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    stats: dict | None = None,
    vocab: VocabMerge | None = None,
    stream: Iterator[torch.Tensor] | None = None,
    on_stream: Callable[[], object] | None = None,
) -> Iterator[memoryview]:
    """The output tensor's bytes, chunk by chunk (``vocab``: how rows map to the merged
    vocabulary, for jobs that re-index them). ``stream``: the job's :func:`early_stream`, made
    ahead; ``on_stream`` is called once the job's native stream is ready (its statistics
    done), before its first chunk."""
    if job.vocab:
        if vocab is None:
            raise CheckpointError(f"tensor {job.out_name!r}: no merged vocabulary to map rows to")
        yield from _produce_vocab(job, ckpts, spec, vocab)
        return
    first_ckpt, first_name = ckpts[job.inputs[0][0]], job.inputs[0][1]
    stored = first_ckpt.info(first_name).torch_dtype
    if job.params is None or stored not in FLOAT_DTYPES:
        if job.params is not None and stats is not None:
            stats.setdefault("copied_non_float", []).append(job.out_name)
        if job.scale == 1.0 and spec.dtype == stored:  # copied as stored, checked on the way
            if first_ckpt.format == "safetensors" and stored in native.STORAGE:
                yield from _mapped_checked(first_ckpt, first_name)
            else:
                yield from (memoryview(b) for b in checked_chunks(first_ckpt, first_name))
            return
        src = CheckpointChunks(
            [(first_ckpt, first_name)],
            job.out_name,
            job.shape,
            _numel(job.shape),
            chunk_elements,
            device,
        )
        for (x,) in src.chunks():
            yield _to_bytes(x.mul_(job.scale) if job.scale != 1.0 else x, spec.dtype, job)
        return
    inputs = [(ckpts[m], n) for m, n in job.inputs]
    method = get_method(job.method)
    if job.members:  # a merge group: the members' inputs read as one fused tensor
        src = group_chunks(job, ckpts, chunk_elements, device)
        yield from run_method(method, src, job.params, post=lambda o: _to_bytes(o, spec.dtype, job))
        return
    src = job_source(job, ckpts, chunk_elements, device)
    if stream is None and can_stream_stored(inputs, device):
        stream = method.stream_stored(src, job.params, spec.dtype)
    if stream is not None:
        if on_stream is not None:
            on_stream()
        yield from (memoryview(o.reshape(-1).view(torch.uint8).numpy()) for o in stream)
        return
    yield from run_method(method, src, job.params, post=lambda out: _to_bytes(out, spec.dtype, job))
    del src


def job_source(
    job: TensorJob, ckpts: Mapping[str, Checkpoint], chunk_elements: int, device: str
) -> CheckpointChunks:
    """The job's inputs as one chunk source (its planned shape, read on ``device``)."""
    inputs = [(ckpts[m], n) for m, n in job.inputs]
    return CheckpointChunks(
        inputs, job.out_name, job.shape, _numel(job.shape), chunk_elements, device
    )


COPY_PIECE = 1 << 23  # elements per block of a tensor copied as stored


def _mapped_checked(ckpt: Checkpoint, name: str) -> Iterator[memoryview]:
    """A float tensor's stored bytes, straight from its mapping (no read copy: the writer
    copies once, or not at all when the file offsets line up), each block checked for NaN/Inf
    in place on the compute pool before it is handed on."""
    with ckpt.mapped_flat(name) as t:
        for first in range(0, t.numel(), COPY_PIECE):
            block = t[first : first + COPY_PIECE]

            def bad(r: tuple[int, int], block=block, first=first) -> bool:
                part = block[r[0] - first : r[1] - first]
                n = count_nonfinite(part)
                return bool(n) if n is not None else not _all_finite(part.float())

            if any(pmap(bad, sub_ranges(first, first + block.numel()))):
                raise CheckpointError(f"{ckpt.path}: tensor {name!r} holds NaN or Inf values")
            yield memoryview(block.view(torch.uint8).numpy())


class GroupChunks(ChunkSource):
    """A merge group's fused tensor (merge/expert_groups.py): each input's members read one
    after the other, so chunk offsets are the fused tensor's flat offsets."""

    def __init__(self, parts: Sequence[CheckpointChunks], name: str, shape: tuple[int, ...]):
        self.parts = list(parts)
        self.name = name
        self.shape = shape
        self.numel = sum(p.numel for p in parts)
        self.num_inputs = parts[0].num_inputs

    def chunks(self, indices: Sequence[int] | None = None) -> Iterator[list[torch.Tensor]]:
        for part in self.parts:
            yield from part.chunks(indices)

    def fail_nonfinite(self, i: int) -> None:
        self.parts[0].fail_nonfinite(i)


def group_chunks(
    job: TensorJob, ckpts: Mapping[str, Checkpoint], chunk_elements: int, device: str
) -> GroupChunks:
    """The chunk source of a group job; its members' float32 copies are kept between passes
    only when the whole group fits the cache budget."""
    numel = _numel(job.shape)
    cache = DEFAULT_CACHE_BYTES if numel * 4 * len(job.inputs) <= DEFAULT_CACHE_BYTES else 0
    parts = [
        CheckpointChunks([(ckpts[p], n) for p, n in m.inputs], m.out_name, m.shape,
                         _numel(m.shape), chunk_elements, device, cache_bytes=cache)
        for m in job.members
    ]  # fmt: skip
    return GroupChunks(parts, job.out_name, job.shape)


def split_bytes(stream: Iterator[memoryview], sizes: Sequence[int]) -> list[Iterator[memoryview]]:
    """``stream`` cut into consecutive pieces of ``sizes`` bytes, one lazy iterator per piece,
    to be consumed in order (as the writer writes a group's members)."""
    it = iter(stream)
    pending: list[memoryview] = []

    def piece(n: int) -> Iterator[memoryview]:
        while n > 0:
            block = pending.pop() if pending else next(it).cast("B")
            if len(block) > n:
                pending.append(block[n:])
                block = block[:n]
            n -= len(block)
            yield block

    return [piece(n) for n in sizes]


def _produce_vocab(
    job: TensorJob, ckpts: Mapping[str, Checkpoint], spec: TensorSpec, vocab: VocabMerge
) -> Iterator[memoryview]:
    """A vocabulary tensor: each input's rows re-indexed by token (whole tensors, in the
    arithmetic's dtype as mergekit gathers them), then merged (or copied, for passthrough)."""
    narrow = job.params.compute_dtype if job.params is not None else None
    tensors = []
    for m, n in job.inputs:
        t = ckpts[m].get_tensor(n)
        if t.is_floating_point() and not _all_finite(t.float()):
            raise CheckpointError(f"{ckpts[m].path}: tensor {n!r} holds NaN or Inf values")
        tensors.append(t.to(narrow or torch.float32))
    rows = vocab.rows(tensors, [m for m, _ in job.inputs])
    if job.params is None:
        out = rows[0].float()
        yield _to_bytes(out.mul_(job.scale) if job.scale != 1.0 else out, spec.dtype, job)
        return
    src = TensorChunks([r.float() for r in rows], job.out_name)
    method = get_method(job.method)
    yield from run_method(method, src, job.params, post=lambda out: _to_bytes(out, spec.dtype, job))


def can_stream_stored(inputs: Sequence[tuple[Checkpoint, str]], device: str) -> bool:
    """Whether a method may read this tensor as stored: CPU, safetensors inputs of one dtype
    that the native kernels read (float32 or bfloat16)."""
    if str(device) != "cpu":
        return False
    dtypes = {c.info(n).torch_dtype for c, n in inputs}
    formats = {c.format for c, _ in inputs}
    return formats == {"safetensors"} and len(dtypes) == 1 and dtypes <= set(native.STORAGE)


def _to_bytes(x: torch.Tensor, dtype: torch.dtype, job: TensorJob) -> memoryview:
    """The output block as ``dtype`` bytes; an error when it holds NaN/Inf (the inputs were
    checked, so the arithmetic or the cast overflowed): nothing non-finite is written."""
    if dtype == torch.float16 and x.numel():
        peak = float(x.abs().max())
        if peak > torch.finfo(torch.float16).max:
            raise CheckpointError(
                f"tensor {job.out_name!r}: merged values up to {peak:.4g} overflow float16; "
                "use --dtype bfloat16"
            )
    y = x.to("cpu", dtype).contiguous()
    if y.is_floating_point() and not _all_finite(y):
        fail_overflow(job.out_name, dtype)
    return memoryview(y.reshape(-1).view(torch.uint8).numpy())


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
