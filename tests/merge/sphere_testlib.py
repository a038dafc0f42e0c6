"""A chunk source that also hands out its inputs as stored (for the native narrow paths)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from weightsmith.merge.methods import get_method
from weightsmith.merge.methods.base import TensorChunks, TensorParams, with_defaults


class StoredChunks(TensorChunks):
    """In-memory inputs; ``stored(i)`` is input i flat in its own dtype (bfloat16/float32)."""

    def __init__(self, tensors: Sequence[torch.Tensor], name: str = "t") -> None:
        super().__init__(tensors, name)
        self._stored = [t.reshape(-1).contiguous() for t in tensors]

    def stored(self, i: int) -> contextlib.AbstractContextManager[torch.Tensor]:
        return contextlib.nullcontext(self._stored[i])


def native_and_torch(
    method: str, tensors: Sequence[torch.Tensor], params: TensorParams, out_dtype: torch.dtype
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(the method's native stored path's output or None, its torch narrow path's output), both
    flat in ``out_dtype``."""
    m = get_method(method)
    p = with_defaults(m, params, len(tensors))
    stream: Iterator[torch.Tensor] | None = m.stream_stored(StoredChunks(tensors), p, out_dtype)
    native = None if stream is None else torch.cat([c.reshape(-1) for c in stream])
    src = TensorChunks(tensors, "t", chunk_size=1 << 18)
    state = m.prepare(src, p)
    parts, offset = [], 0
    for chunks in src.chunks():
        parts.append(m.combine(chunks, state, p, offset).to(out_dtype).reshape(-1))
        offset += chunks[0].numel()
    return native, torch.cat(parts)
