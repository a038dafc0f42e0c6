"""Find and validate a checkpoint's tensors from its headers (or its pickles, when allowed).

Every shard header is parsed and cross-checked against the index, every file name taken from
the checkpoint is resolved inside its directory (see :mod:`weightsmith.io.paths`), and
config.json is checked against the tensor shapes (see :mod:`weightsmith.io.consistency`), so
a corrupt or inconsistent checkpoint fails before any work starts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from weightsmith.errors import CheckpointError, PickleRefusedError
from weightsmith.io.dtypes import safetensors_dtype, torch_dtype
from weightsmith.io.paths import checked_member
from weightsmith.io.safetensors_format import Header, read_header, reject_duplicate_keys

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"


@dataclass(frozen=True)
class TensorInfo:
    """A tensor's name, safetensors dtype, shape and the shard file that holds it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    shard: str  # file name relative to the checkpoint root
    nbytes: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class Layout:
    """What discovery found: the tensors, the parsed headers and the index bytes."""

    tensors: dict[str, TensorInfo]
    headers: dict[str, Header] = field(default_factory=dict)
    index_bytes: bytes = b""
    format: str = "safetensors"


def discover(path: Path, root: Path, allow_pickle: bool) -> Layout:
    """List the tensors of the checkpoint at ``path`` (a directory or one weights file)."""
    if path.is_file():
        if path.suffix == ".safetensors":
            return _from_safetensors(root, [path.name])
        if path.suffix == ".bin":
            return _from_pickle(path, root, allow_pickle, [path.name])
        raise CheckpointError(f"{path}: not a .safetensors file or checkpoint dir")
    if (path / SAFE_INDEX).exists():
        return _from_index(root, path / SAFE_INDEX)
    if (path / SAFE_SINGLE).exists():
        return _from_safetensors(root, [SAFE_SINGLE])
    found = sorted(p.name for p in path.glob("*.safetensors"))
    if len(found) == 1:
        return _from_safetensors(root, found)
    if len(found) > 1:
        raise CheckpointError(
            f"{path}: {len(found)} .safetensors files but no {SAFE_INDEX} to say which to use"
        )
    if (path / PICKLE_INDEX).exists() or (path / PICKLE_SINGLE).exists():
        return _from_pickle(path, root, allow_pickle, None)
    raise CheckpointError(f"{path}: no weights found (expected {SAFE_SINGLE} or {SAFE_INDEX})")


def _from_index(root: Path, index_path: Path) -> Layout:
    """Tensors of the shards an index names. A tensor stored in one of those shards but left
    out of the index is kept, as transformers does: it loads every tensor of every shard the
    index names, so dropping it would change the model."""
    index_bytes, weight_map = load_index(root, index_path)
    shards = list(dict.fromkeys(weight_map.values()))
    layout = _from_safetensors(root, shards, where=str(index_path))
    layout.index_bytes = index_bytes
    for name, shard in weight_map.items():
        info = layout.tensors.get(name)
        if info is None or info.shard != shard:
            raise CheckpointError(
                f"{index_path}: tensor {name!r} is mapped to {shard} but that shard does not hold it"
            )
    return layout


def load_index(root: Path, index_path: Path) -> tuple[bytes, dict[str, str]]:
    """The raw bytes and the validated ``weight_map`` of an index file."""
    checked_member(root, index_path.name, str(root))
    try:
        raw = index_path.read_bytes()
        data = json.loads(raw, object_pairs_hook=reject_duplicate_keys(str(index_path)))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{index_path}: unreadable index ({e})") from None
    except RecursionError:
        raise CheckpointError(f"{index_path}: unreadable index (nested too deeply)") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: index has no 'weight_map'")
    for name, shard in weight_map.items():
        checked_member(root, shard, f"{index_path}: tensor {name!r}")
    return raw, weight_map


def _from_safetensors(root: Path, shards: list[str], where: str | None = None) -> Layout:
    layout = Layout(tensors={})
    where = where or str(root)
    for shard in shards:
        file = checked_member(root, shard, where)
        if not file.is_file():
            raise CheckpointError(f"{where}: shard {shard} is missing")
        header = read_header(file)
        layout.headers[shard] = header
        for entry in sorted(header.entries.values(), key=lambda e: e.begin):
            if entry.name in layout.tensors:
                raise CheckpointError(
                    f"{root}: tensor {entry.name!r} is stored twice "
                    f"(in {layout.tensors[entry.name].shard} and {shard})"
                )
            layout.tensors[entry.name] = TensorInfo(
                entry.name, entry.dtype, entry.shape, shard, entry.nbytes
            )
    return layout


def _from_pickle(path: Path, root: Path, allow_pickle: bool, files: list[str] | None) -> Layout:
    if not allow_pickle:
        raise PickleRefusedError(path)
    if files is None:
        index = root / PICKLE_INDEX
        files = sorted(set(load_index(root, index)[1].values())) if index.exists() else None
        files = files or [PICKLE_SINGLE]
    infos: dict[str, TensorInfo] = {}
    for shard in files:
        for name, t in load_pickle(root, shard).items():
            if name in infos:
                raise CheckpointError(f"{root}: tensor {name!r} is stored twice")
            nbytes = t.numel() * t.element_size()
            infos[name] = TensorInfo(
                name, safetensors_dtype(t.dtype), tuple(t.shape), shard, nbytes
            )
    return Layout(tensors=infos, format="pickle")


def load_pickle(root: Path, shard: str) -> dict[str, torch.Tensor]:
    """The tensors of one pickle shard, loaded with ``torch.load(weights_only=True)``."""
    file = checked_member(root, shard, str(root))
    if not file.is_file():
        raise CheckpointError(f"{root}: shard {shard} is missing")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many types for corrupt/unsafe pickles
        raise CheckpointError(f"{file}: cannot load with weights_only=True ({e})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: not a state dict")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def read_config(root: Path) -> dict | None:
    """config.json as a dict, or None when the checkpoint has none."""
    cfg = root / "config.json"
    if not cfg.is_file():
        return None
    checked_member(root, cfg.name, str(root))
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg}: unreadable config ({e})") from None
    except RecursionError:
        raise CheckpointError(f"{cfg}: unreadable config (nested too deeply)") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{cfg}: config is not a JSON object")
    return data
