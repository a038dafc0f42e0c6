"""mergekit's ``model+adapter`` references: a recipe's input that is a base model with a PEFT
LoRA adapter folded in.

mergekit 0.1.5 reads ``MODEL+ADAPTER`` as (model, lora), folds the adapter into the model with
peft's ``merge_and_unload`` into a folder of ``--lora-merge-cache`` (which it requires), and
merges that folder. Here the fold is ``merge lora`` (streamed; float32 arithmetic rounded once
to the stored dtype, which is what mergekit's fold writes: the parity test compares the merged
outputs bit for bit) into a temporary folder beside the output, removed when the merge ends,
or into ``cache`` when one is given, where a later run with the same model, adapter and dtype
reuses it.
"""

from __future__ import annotations

import shutil
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from weightsmith.errors import ConfigError
from weightsmith.io.paths import check_output_location
from weightsmith.io.placement import temp_path
from weightsmith.merge.lora import merge_lora
from weightsmith.merge.recipe import LORA_SEPARATOR, split_reference

SEPARATOR = LORA_SEPARATOR


def resolve_reference(
    ref: str, resolve_model: Callable[[str], str], resolve_adapter: Callable[[str], str]
) -> str:
    """``ref`` with its model (and adapter) resolved to absolute paths. A local path whose
    name contains ``+`` is a model, not a reference with an adapter."""
    try:
        return resolve_model(ref)
    except ConfigError:
        if SEPARATOR not in ref:
            raise
    model, adapter = split_reference(ref)  # no model of that name: MODEL+ADAPTER
    return f"{resolve_model(model)}{SEPARATOR}{resolve_adapter(str(adapter))}"


@dataclass
class LoraFolds:
    """The folded checkpoint of every ``MODEL+ADAPTER`` reference of one merge, made on first
    use (:meth:`path`); :meth:`close` removes the temporary ones."""

    out: Path
    force: bool = False
    cache: Path | None = None
    dtype: str | None = None
    device: str = "cpu"
    progress: bool = True
    folded: dict[str, dict] = field(default_factory=dict)
    _tmp: Path | None = None

    def path(self, ref: str) -> str:
        """The checkpoint folder to read for ``ref`` (itself when it has no adapter)."""
        if SEPARATOR not in ref or Path(ref).exists():
            return ref
        if ref not in self.folded:
            self.folded[ref] = self._fold(*split_reference(ref))
        return self.folded[ref]["folded"]

    def record(self) -> list[dict]:
        """What was folded, for the report and provenance (``folded`` only when kept)."""
        return [
            {k: v for k, v in f.items() if k != "folded" or self.cache is not None}
            for f in self.folded.values()
        ]

    def close(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def _fold(self, model: str, adapter: str) -> dict:
        folder = self._folder(model, adapter)
        entry = {"model": model, "adapter": adapter, "folded": str(folder), "reused": False}
        if self.cache is not None and (folder / "config.json").is_file():
            return {**entry, "reused": True}
        merge_lora(
            model, adapter, folder, dtype=self.dtype, device=self.device, progress=self.progress
        )
        return entry

    def _folder(self, model: str, adapter: str) -> Path:
        key = zlib.crc32(f"{model}\n{adapter}\n{self.dtype}".encode())
        name = f"{Path(model).name}+{Path(adapter).name}-{key:08x}"
        if self.cache is not None:
            try:
                self.cache.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ConfigError(f"--lora-merge-cache {self.cache}: {e.strerror}") from None
            return self.cache / name
        if self._tmp is None:
            check_output_location(self.out, [], self.force)  # refuse before folding
            beside = self.out.parent
            while not beside.is_dir():  # the writer creates missing parents later
                beside = beside.parent
            self._tmp = temp_path(beside / self.out.name)
            self._tmp.mkdir()
        return self._tmp / name
