"""The one streaming loop under every transform: plan on shapes -> read a group -> apply ->
write -> commit.

Convert, merge, quantize and prune differ only in what a group is and what ``apply`` does.
Planning first means every shape, dtype and name problem surfaces before any data is read,
and the writer can lay shards out once and write each tensor straight to its place.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from tqdm.auto import tqdm

from weightsmith.core.memory import frozen_gc
from weightsmith.core.report import peak_rss_bytes
from weightsmith.io.reader import Checkpoint
from weightsmith.io.writer import DEFAULT_MAX_SHARD_SIZE, CheckpointWriter, TensorSpec


class Group(Protocol):
    key: str
    names: tuple[str, ...]


@dataclass(frozen=True)
class RawTensor:
    """A tensor passed through as stored bytes (bit-exact, no decode/encode): copied in the
    kernel from ``location`` (file, offset) when given, else from ``chunks``."""

    spec: TensorSpec
    chunks: Callable[[], Iterable[bytes]]
    location: tuple[Path, int] | None = None

    @classmethod
    def of(cls, ckpt: Checkpoint, name: str, new_name: str | None = None) -> RawTensor:
        """Tensor ``name`` of ``ckpt`` copied unchanged (optionally under ``new_name``)."""
        info = ckpt.info(name)
        spec = TensorSpec(new_name or name, info.torch_dtype, info.shape)
        return cls(spec, lambda: ckpt.raw_chunks(name), ckpt.raw_location(name))


@dataclass
class StreamResult:
    """What a streaming run produced and what it cost."""

    out: str
    shards: list[str]
    tensors: int
    total_size: int
    wall_s: float
    peak_rss: int
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def stream_transform(
    groups: Sequence[Group],
    out: str | os.PathLike[str],
    *,
    plan: Callable[[Group], list[TensorSpec]] | None,
    apply: Callable[[Group], Iterable[tuple[str, torch.Tensor | RawTensor]]],
    sources: Sequence[Checkpoint] = (),
    support_from: Path | None = None,
    support_skip: Iterable[str] = (),
    config_patch: dict | Callable[[dict], dict] | None = None,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    force: bool = False,
    provenance: dict | None = None,
    progress: bool = True,
    description: str = "writing",
    before_commit: Callable[[CheckpointWriter], None] | None = None,
) -> StreamResult:
    """Run ``apply`` over ``groups`` and write the results to ``out`` atomically.

    ``plan(group)`` returns the output specs of a group from shapes alone; ``apply(group)``
    yields ``(name, tensor)`` pairs one at a time (so a group of many tensors still holds one
    in memory at a time when the method allows it). Inputs are never modified. ``plan=None``
    when output sizes are only known after ``apply`` (the writer then spills each shard).
    """
    start = time.perf_counter()
    specs_by_group = [plan(g) if plan else None for g in groups]
    all_specs = [s for specs in specs_by_group for s in specs or ()]
    with CheckpointWriter(
        out,
        max_shard_size=max_shard_size,
        force=force,
        inputs=[c.path for c in sources],
    ) as writer:
        if plan:
            writer.plan(all_specs)
        total = sum(s.nbytes for s in all_specs) or None
        bar = tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            desc=description,
            disable=not progress,
            leave=False,
        )
        with bar, frozen_gc():
            for group, specs in zip(groups, specs_by_group, strict=True):
                bar.set_postfix_str(group.key[-40:], refresh=False)
                expected = None if specs is None else {s.name for s in specs}
                for name, value in apply(group):
                    if expected is not None and name not in expected:
                        raise RuntimeError(f"{group.key}: apply produced unplanned {name!r}")
                    if isinstance(value, RawTensor) and value.location is not None:
                        writer.write_from_file(value.spec, *value.location)
                        bar.update(value.spec.nbytes)
                    elif isinstance(value, RawTensor):
                        writer.write_raw(value.spec, value.chunks())
                        bar.update(value.spec.nbytes)
                    else:
                        writer.write(name, value)
                        bar.update(value.numel() * value.element_size())
        if support_from is not None:
            writer.copy_support_files(support_from, config_patch=config_patch, skip=support_skip)
        if before_commit is not None:
            before_commit(writer)
        record = dict(provenance or {})
        record.setdefault(
            "inputs", [{"path": str(c.path), "fingerprint": c.fingerprint()} for c in sources]
        )
        summary = writer.commit(record)
    return StreamResult(
        out=summary.out,
        shards=summary.shards,
        tensors=summary.tensors,
        total_size=summary.total_size,
        wall_s=round(time.perf_counter() - start, 3),
        peak_rss=peak_rss_bytes(),
    )
