"""mergekit's ``model+adapter`` references: a recipe's input that is a base model with a PEFT
LoRA adapter folded in.

mergekit 0.1.5 reads ``MODEL+ADAPTER`` as (model, lora), folds the adapter into the model with
peft's ``merge_and_unload``, writes the result to a folder of ``--lora-merge-cache`` (which it
requires) and merges that folder. Here the model is read *as if* folded
(:class:`FoldedCheckpoint`): each adapted tensor is W + s·B@A computed when it is first read,
in float32 and rounded once to the stored dtype, which is what mergekit's fold writes (the
parity test compares the merged outputs bit for bit). Nothing is written and no disk space is
needed. With ``cache`` (or a ``dtype`` for the folded model) the fold is ``merge lora`` into
that folder instead, kept for a later run with the same model, adapter and dtype.
"""

from __future__ import annotations

import contextlib
import shutil
import threading
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from weightsmith.core.transform import require_finite
from weightsmith.errors import CheckpointError, ConfigError
from weightsmith.io.paths import check_output_location
from weightsmith.io.placement import temp_path
from weightsmith.io.reader import Checkpoint, open_checkpoint
from weightsmith.merge.lora import (
    Scratch,
    check_targets,
    folded_weight,
    merge_lora,
    read_adapter,
    read_adapter_config,
)
from weightsmith.merge.recipe import LORA_SEPARATOR, has_adapter, split_reference


def resolve_reference(
    ref: str, resolve_model: Callable[[str], str], resolve_adapter: Callable[[str], str]
) -> str:
    """``ref`` with its model (and adapter) resolved to absolute paths. A local path whose
    name contains ``+`` is a model, not a reference with an adapter."""
    try:
        return resolve_model(ref)
    except ConfigError:
        if LORA_SEPARATOR not in ref:
            raise
    model, adapter = split_reference(ref)  # no model of that name: MODEL+ADAPTER
    return f"{resolve_model(model)}{LORA_SEPARATOR}{resolve_adapter(str(adapter))}"


class FoldedCheckpoint(Checkpoint):
    """The checkpoint at ``path`` read as if the PEFT LoRA adapter at ``adapter`` were folded
    in. Adapted tensors are computed on first read (:func:`folded_weight`) and the last
    :attr:`KEEP` of them kept (up to :attr:`KEEP_BYTES`), so the passes of one merge over a
    tensor (and the lookahead's read of the next) compute it once; a tensor the adapter
    replaces (``modules_to_save``) is the adapter's, cast to the stored dtype. The rest read as
    stored."""

    KEEP, KEEP_BYTES = 4, 512 << 20  # at least the last two, whatever their size

    def __init__(self, path: Path, adapter: Path, *, allow_pickle: bool = False) -> None:
        super().__init__(Path(path), allow_pickle=allow_pickle)
        try:
            config = read_adapter_config(Path(adapter))
            self.adapter = open_checkpoint(adapter)
            self.modules, self.replaced = read_adapter(self.adapter, config, None)
            check_targets(self, self.adapter, self.modules, self.replaced)
        except BaseException:
            self.close()
            raise
        self._memo: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self._scratch = Scratch()  # folds run one at a time, under the lock

    def adapted(self, name: str) -> bool:
        return name in self.modules or name in self.replaced

    def folded(self, name: str) -> torch.Tensor | None:
        """The folded tensor ``name`` (shared: do not modify), or None when not adapted."""
        if not self.adapted(name):
            return None
        with self._lock:
            t = self._memo.get(name)
            if t is None:
                t = self._fold(name)
                self._memo[name] = t
                while len(self._memo) > self.KEEP or (
                    len(self._memo) > 2 and self._memo_bytes() > self.KEEP_BYTES
                ):
                    self._memo.popitem(last=False)
            self._memo.move_to_end(name)
            return t

    def _memo_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._memo.values())

    def _fold(self, name: str) -> torch.Tensor:
        dtype = self.info(name).torch_dtype
        ad = self.adapter
        if name in self.replaced:
            key = self.replaced[name]
            return require_finite(ad.get_tensor(key), str(ad.path), key).to(dtype)
        mod = self.modules[name]
        a = require_finite(ad.get_tensor(mod.a_key), str(ad.path), mod.a_key)
        b = require_finite(ad.get_tensor(mod.b_key), str(ad.path), mod.b_key)
        with contextlib.ExitStack() as stack:
            w = self._stored(name, stack)
            try:
                return folded_weight(w, a, b, mod, dtype, scratch=self._scratch)
            except CheckpointError:  # not finite: name a NaN/Inf of the model itself first
                require_finite(w, str(self.path), name)
                raise

    def _stored(self, name: str, stack: contextlib.ExitStack) -> torch.Tensor:
        """The tensor as stored: mapped (no copy) when it can be. Checkpoint's own readers,
        called explicitly: this class overrides them (and get_tensor reads through them)."""
        info = self.info(name)
        if self.format == "safetensors":
            return stack.enter_context(Checkpoint.mapped_flat(self, name)).view(info.shape)
        rows = info.shape[0] if info.shape else 1
        return Checkpoint.read_rows(self, name, 0, rows).reshape(info.shape)

    def get_tensor(self, name: str) -> torch.Tensor:
        t = self.folded(name)
        return super().get_tensor(name) if t is None else t.clone()

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        t = self.folded(name)
        return super().read_rows(name, start, stop) if t is None else t[start:stop].clone()

    @contextlib.contextmanager
    def mapped_flat(self, name: str) -> Iterator[torch.Tensor]:
        t = self.folded(name)
        if t is None:
            with super().mapped_flat(name) as flat:
                yield flat
        else:
            yield t.reshape(-1)

    def raw_location(self, name: str) -> tuple[Path, int] | None:
        return None if self.adapted(name) else super().raw_location(name)

    def raw_chunks(self, name: str, chunk_size: int = 64 << 20) -> Iterator[bytes]:
        t = self.folded(name)
        if t is None:
            yield from super().raw_chunks(name, chunk_size)
            return
        data = memoryview(t.reshape(-1).view(torch.uint8).numpy())
        for start in range(0, len(data), chunk_size):
            yield bytes(data[start : start + chunk_size])

    def get_slice(self, name: str):
        t = self.folded(name)
        return super().get_slice(name) if t is None else t

    def close(self) -> None:
        super().close()
        if getattr(self, "adapter", None) is not None:
            self.adapter.close()
        if hasattr(self, "_memo"):
            self._memo.clear()


@dataclass
class LoraFolds:
    """Opens the checkpoints of one run's references (:meth:`open`): ``MODEL+ADAPTER`` as a
    :class:`FoldedCheckpoint`, or, with ``cache`` or ``dtype``, as the folder ``merge lora``
    wrote there (reused when it exists). :meth:`close` removes what was only temporary."""

    out: Path
    force: bool = False
    cache: Path | None = None
    dtype: str | None = None
    device: str = "cpu"
    progress: bool = True
    folded: dict[str, dict] = field(default_factory=dict)
    _tmp: Path | None = None

    def open(self, ref: str, allow_pickle: bool = False) -> Checkpoint:
        if not has_adapter(ref):
            return open_checkpoint(ref, allow_pickle=allow_pickle)
        model, adapter = split_reference(ref)
        entry = self.folded.setdefault(ref, {"model": model, "adapter": adapter})
        if self.cache is None and self.dtype is None:
            return FoldedCheckpoint(Path(model), Path(str(adapter)), allow_pickle=allow_pickle)
        if "folded" not in entry:
            entry.update(self._fold(model, str(adapter)))
        return open_checkpoint(entry["folded"])

    def sources(self, ref: str, ck: Checkpoint) -> list[Checkpoint]:
        """What ``ck`` (opened for ``ref``) was read from: the model and the adapter."""
        if isinstance(ck, FoldedCheckpoint):
            return [ck, ck.adapter]
        if ref not in self.folded:
            return [ck]
        return [open_checkpoint(self.folded[ref][k]) for k in ("model", "adapter")]

    def record(self) -> list[dict]:
        """What was folded, for the report and provenance (``folded``: a kept folder)."""
        keep = self.cache is not None
        return [
            {k: v for k, v in f.items() if keep or k not in ("folded", "reused")}
            for f in self.folded.values()
        ]

    def close(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def _fold(self, model: str, adapter: str) -> dict:
        folder = self._folder(model, adapter)
        if self.cache is not None and (folder / "config.json").is_file():
            return {"folded": str(folder), "reused": True}
        merge_lora(
            model, adapter, folder, dtype=self.dtype, device=self.device, progress=self.progress
        )
        return {"folded": str(folder), "reused": False}

    def _folder(self, model: str, adapter: str) -> Path:
        key = zlib.crc32(f"{model}\n{adapter}\n{self.dtype}".encode())
        name = f"{Path(model).name}+{Path(adapter).name}-{key:08x}"
        if self.cache is not None:
            try:
                self.cache.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ConfigError(f"--lora-merge-cache {self.cache}: {e.strerror}") from None
            return self.cache / name
        if self._tmp is None:  # a --lora-merge-dtype without a cache: temporary, beside OUT
            check_output_location(self.out, [], self.force)  # refuse before folding
            beside = self.out.parent
            while not beside.is_dir():  # the writer creates missing parents later
                beside = beside.parent
            self._tmp = temp_path(beside / self.out.name)
            self._tmp.mkdir()
        return self._tmp / name
