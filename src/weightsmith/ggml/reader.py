"""Reading a GGUF file back: its metadata, and each tensor dequantized under its Hugging Face name
and layout (Q/K permutation undone), so ``inspect``, ``compare`` and ``eval`` can judge it.

Tensors are dequantized one at a time with ``gguf.quants.dequantize`` from the memory-mapped
file; nothing else is held.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import gguf
import numpy as np
import torch

from weightsmith.errors import CheckpointError, ConfigError
from weightsmith.ggml import archs

_FLOAT = ("F32", "F16", "BF16")


def is_gguf(path: str | os.PathLike[str]) -> bool:
    """A ``.gguf`` file by name, or any file starting with the GGUF magic (a recipe step's
    output ``WORKDIR/<id>`` has no extension)."""
    if str(path).lower().endswith(".gguf"):
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


class GgufFile:
    """An opened GGUF file; tensors by their Hugging Face names."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such GGUF file")
        try:
            self.reader = gguf.GGUFReader(self.path)
        except (ValueError, OSError, IndexError) as e:
            raise CheckpointError(f"{self.path}: not a readable GGUF file ({e})") from None
        self.architecture = str(self.field("general.architecture", "?"))
        self.arch = next((a for a in archs.ARCHS if a.name == self.architecture), None)
        self.by_gguf = {t.name: t for t in self.reader.tensors}
        self.by_hf = {self._hf(n): n for n in self.by_gguf}

    def _hf(self, name: str) -> str:
        try:
            return archs.hf_name(name, self.architecture)
        except ConfigError:
            return name  # a tensor weightsmith does not describe keeps its GGUF name

    def field(self, key: str, default=None):
        f = self.reader.fields.get(key)
        return default if f is None else f.contents()

    def type_of(self, hf_name: str) -> str:
        return self.by_gguf[self.by_hf[hf_name]].tensor_type.name

    def tensor(self, hf_name: str) -> torch.Tensor:
        """The tensor as float32 in Hugging Face layout (rows first, Q/K rows un-permuted)."""
        t = self.by_gguf[self.by_hf[hf_name]]
        data = np.array(t.data)  # a copy: the file's memory map is read-only
        if t.tensor_type.name not in ("F32", "F16"):
            data = gguf.quants.dequantize(data, t.tensor_type)
        data = np.asarray(data, dtype=np.float32).reshape(tuple(int(d) for d in reversed(t.shape)))
        if self.arch is not None:
            n_head = archs.qk_heads(self.arch, t.name, self._heads_config())
            if n_head is not None:
                data = archs.permute_rows(data, n_head, inverse=True)
            if archs.norm_shift(self.arch, t.name):
                data = data - np.float32(archs.norm_shift(self.arch, t.name))
        return torch.from_numpy(np.ascontiguousarray(data))

    def _heads_config(self) -> dict:
        n_head = self.field(f"{self.architecture}.attention.head_count")
        n_kv = self.field(f"{self.architecture}.attention.head_count_kv", n_head)
        return {"num_attention_heads": n_head, "num_key_value_heads": n_kv}

    def summary(self) -> dict:
        """What ``weightsmith inspect m.gguf`` shows."""
        metadata = {}
        for key, f in self.reader.fields.items():
            if key.startswith("GGUF."):
                continue
            value = f.contents()
            metadata[key] = f"[{len(value)} items]" if isinstance(value, list) else value
        file_type = self.field("general.file_type")
        try:
            file_type_name = gguf.LlamaFileType(file_type).name if file_type is not None else None
        except ValueError:
            file_type_name = str(file_type)
        tensors = [
            {"name": t.name, "type": t.tensor_type.name, "shape": [int(d) for d in t.shape]}
            for t in self.reader.tensors
        ]
        return {
            "path": str(self.path),
            "format": "gguf",
            "architecture": self.architecture,
            "file_type": file_type_name,
            "num_params": int(sum(int(t.n_elements) for t in self.reader.tensors)),
            "num_tensors": len(tensors),
            "tensor_types": dict(Counter(t["type"] for t in tensors).most_common()),
            "size_on_disk": self.path.stat().st_size,
            "metadata": metadata,
            "tensors": tensors,
        }


def format_gguf_summary(info: dict) -> str:
    """The human-readable form of :meth:`GgufFile.summary` (shapes in GGUF order, ne0 first)."""
    types = ", ".join(f"{k} {v}" for k, v in info["tensor_types"].items())
    lines = [
        f"path          {info['path']}",
        f"format        GGUF, architecture {info['architecture']}, file type {info['file_type']}",
        f"parameters    {info['num_params']:,}",
        f"tensors       {info['num_tensors']} ({types})",
        f"size on disk  {info['size_on_disk']:,} bytes",
        "metadata:",
    ]
    lines += [
        f"  {k} = {v!r}"
        for k, v in info["metadata"].items()
        if not k.startswith("general.architecture")
    ]
    width = max([len(t["name"]) for t in info["tensors"]] + [6])
    lines.append(f"{'tensor':<{width}}  {'type':<6}  shape (ne0, ne1, ...)")
    lines += [f"{t['name']:<{width}}  {t['type']:<6}  {t['shape']}" for t in info["tensors"]]
    return "\n".join(lines)


def materialize_hf(path: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """Write a GGUF file as a float32 Hugging Face folder (model + tokenizer) with
    transformers' own GGUF loader, for tools that run the model (eval)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    gf = GgufFile(path)  # a one-line error for a missing or corrupt file, before transformers
    if "rope_freqs.weight" in gf.by_gguf:
        raise CheckpointError(
            f"{path}: transformers' GGUF loader ignores rope_freqs (Llama 3 RoPE scaling), so it "
            "would evaluate another model; evaluate the safetensors source instead"
        )
    kwargs = {"gguf_file": path.name}
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, **kwargs)
    except (ValueError, KeyError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: transformers cannot load this GGUF ({first})") from None
    # the loader dequantized every tensor; the result is a plain float32 model
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for k, v in archs.gemma_hf_config(gf.architecture, gf.field).items():
        setattr(model.config, k, v)  # keys transformers' loader does not read (Gemma 2/3)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return Path(out)
