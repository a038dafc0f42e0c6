"""Fold a PEFT LoRA adapter into its base model: W += scale · B @ A, tensor by tensor.

Reads adapter folders as peft saves them (``adapter_config.json`` + ``adapter_model.safetensors``):
scale = lora_alpha / r (lora_alpha / √r with ``use_rslora``), per-module ``rank_pattern`` and
``alpha_pattern`` (peft's suffix match), ``fan_in_fan_out`` (GPT-2 Conv1D), embedding LoRA
(``lora_embedding_A/B``), and full tensors saved for ``modules_to_save`` or resized embeddings
(they replace the base tensor). The result equals peft's ``merge_and_unload()``.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from weightsmith.core.device import select_device
from weightsmith.core.streaming import StreamResult
from weightsmith.core.transform import (
    WriteOptions,
    all_finite,
    checked_copy,
    dtype_patch,
    require_finite,
    rewrite_checkpoint,
)
from weightsmith.errors import CheckpointError, ConfigError
from weightsmith.io.dtypes import config_dtype_name, parse_user_dtype
from weightsmith.io.reader import Checkpoint, TensorGroup, open_checkpoint
from weightsmith.io.writer import DEFAULT_MAX_SHARD_SIZE, CheckpointWriter, TensorSpec
from weightsmith.merge.params import finite

PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass(frozen=True)
class LoraMergeConfig:
    """Options of a LoRA merge, recorded in the output's ``weightsmith.json``."""

    adapter: str
    scale: float | None = None  # None: the trained scale (alpha / r per module)
    dtype: str | None = None
    version: int = 1


@dataclass(frozen=True)
class LoraModule:
    """One adapted base tensor and where its low-rank factors live in the adapter."""

    target: str  # base tensor name, e.g. model.layers.0.self_attn.q_proj.weight
    a_key: str
    b_key: str
    scale: float
    embedding: bool = False
    fan_in_fan_out: bool = False


def lora_delta(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float,
    *,
    embedding: bool = False,
    fan_in_fan_out: bool = False,
) -> torch.Tensor:
    """scale · B @ A laid out like the base weight (float32).

    Linear: A (r, in), B (out, r) -> (out, in), transposed for Conv1D (fan_in_fan_out).
    Embedding: A (r, vocab), B (dim, r) -> (B @ A)ᵀ = (vocab, dim).
    """
    delta = b.float() @ a.float()
    if embedding or fan_in_fan_out:
        delta = delta.T
    return delta * scale


def pattern_value(patterns: dict, module: str, default: float) -> float:
    """peft's ``get_pattern_key``: the first pattern that matches a suffix of the module name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_rank(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _is_names(v: object) -> bool:
    return (
        v is None
        or isinstance(v, str)
        or (isinstance(v, list) and all(isinstance(e, str) for e in v))
    )


# adapter_config.json keys this merge reads: (check, what a valid value is)
CONFIG_TYPES: dict[str, tuple] = {
    "peft_type": (lambda v: isinstance(v, str), "a string"),
    "r": (_is_rank, "an integer >= 1"),
    "lora_alpha": (_is_number, "a finite number"),
    "use_rslora": (lambda v: isinstance(v, bool), "true or false"),
    "use_dora": (lambda v: isinstance(v, bool), "true or false"),
    "fan_in_fan_out": (lambda v: isinstance(v, bool), "true or false"),
    "target_modules": (_is_names, "a name or a list of names"),
    "modules_to_save": (_is_names, "a list of names"),
    "rank_pattern": (
        lambda v: isinstance(v, dict) and all(_is_rank(x) for x in v.values()),
        "a mapping of module patterns to integers >= 1",
    ),
    "alpha_pattern": (
        lambda v: isinstance(v, dict) and all(_is_number(x) for x in v.values()),
        "a mapping of module patterns to finite numbers",
    ),
}


def read_adapter_config(adapter_dir: Path) -> dict:
    """``adapter_config.json`` parsed, every key this merge reads checked for its type
    (one-line error naming the file and the key); null values mean peft's default."""
    cfg_path = adapter_dir / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise CheckpointError(f"{adapter_dir}: no {ADAPTER_CONFIG} (not a PEFT adapter folder)")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{cfg_path}: unreadable ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{cfg_path}: expected a JSON object")
    for key, (ok, what) in CONFIG_TYPES.items():
        value = config.get(key)
        if value is not None and not ok(value):
            raise CheckpointError(f"{cfg_path}: {key!r} must be {what}, got {value!r}")
    return {k: v for k, v in config.items() if v is not None}


def read_adapter(
    adapter: Checkpoint, config: dict, scale_override: float | None
) -> tuple[dict[str, LoraModule], dict[str, str]]:
    """(base tensor -> LoRA factors, base tensor -> adapter tensor that replaces it)."""
    if config.get("peft_type", "LORA") != "LORA":
        raise ConfigError(f"adapter is {config.get('peft_type')}, only LORA adapters are merged")
    if config.get("use_dora"):
        raise ConfigError("DoRA adapters (use_dora) are not supported")
    r_default = config.get("r", 8)
    alpha_default = config.get("lora_alpha", r_default)
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    modules: dict[str, LoraModule] = {}
    replace: dict[str, str] = {}
    for key in adapter.tensors:
        if not key.startswith(PREFIX):
            raise CheckpointError(f"{adapter.path}: unexpected adapter tensor {key!r}")
        name = key[len(PREFIX) :]
        m = re.match(r"^(?P<mod>.+)\.(?P<kind>lora_A|lora_B)\.weight$", name) or re.match(
            r"^(?P<mod>.+)\.(?P<kind>lora_embedding_A|lora_embedding_B)$", name
        )
        if m is None:
            if ".lora_" in name:
                raise CheckpointError(
                    f"{adapter.path}: unsupported adapter tensor {key!r} (DoRA / LoRA bias?)"
                )
            replace[name.replace(".base_layer.", ".")] = key  # modules_to_save / resized embed
            continue
        if not m["kind"].endswith("A"):
            continue
        mod, embedding = m["mod"], m["kind"].startswith("lora_embedding")
        b_key = key.replace("lora_A", "lora_B").replace("lora_embedding_A", "lora_embedding_B")
        if b_key not in adapter.tensors:
            raise CheckpointError(f"{adapter.path}: {key!r} has no matching {b_key!r}")
        a_info = adapter.info(key)
        r = a_info.shape[0]
        expected_r = pattern_value(rank_pattern, mod, r_default)
        if r != expected_r:
            raise CheckpointError(
                f"{adapter.path}: {mod} has rank {r} but adapter_config says {expected_r}"
            )
        alpha = pattern_value(alpha_pattern, mod, alpha_default)
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        if scale_override is not None:
            scale = scale_override
        modules[f"{mod}.weight"] = LoraModule(
            f"{mod}.weight", key, b_key, scale, embedding, fan_in_fan_out and not embedding
        )
    if not modules and not replace:
        raise CheckpointError(f"{adapter.path}: adapter holds no LoRA tensors")
    return modules, replace


def merge_lora(
    base: str | os.PathLike[str],
    adapter_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    scale: float | None = None,
    dtype: str | None = None,
    device: str = "cpu",
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    force: bool = False,
    progress: bool = True,
) -> StreamResult:
    """Write ``base`` with the LoRA adapter in ``adapter_dir`` folded in, to ``out``.

    Every tensor read (base and adapter) is checked for NaN/Inf, and so is every merged
    tensor before it is written (an overflow of the output dtype is an error).
    """
    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    if scale is not None:
        finite(scale, "scale")
    device = str(select_device(device))  # auto -> cuda/cpu; an absent device is refused
    target = parse_user_dtype(dtype) if dtype else None
    cfg = LoraMergeConfig(
        str(adapter_dir.resolve()), scale, config_dtype_name(target) if target else None
    )
    with open_checkpoint(base) as ck, open_checkpoint(adapter_dir) as ad:
        modules, replace = read_adapter(ad, config, scale)
        check_targets(ck, ad, modules, replace)

        def out_dtype(name: str) -> torch.dtype:
            stored = ck.info(name).torch_dtype
            return target if target is not None and stored in FLOAT_DTYPES else stored

        def plan(group: TensorGroup) -> list[TensorSpec]:
            return [TensorSpec(n, out_dtype(n), ck.info(n).shape) for n in group.names]

        def before_commit(writer: CheckpointWriter) -> None:
            writer.write_text("mergekit_config.yml", _recipe_yaml(ck, adapter_dir, cfg))
            writer.write_text("README.md", _card(ck, adapter_dir, cfg, len(modules)))

        result = rewrite_checkpoint(
            ck,
            ck.groups("tensor"),
            out,
            plan=plan,
            apply=_lora_apply(ck, ad, modules, replace, out_dtype, device),
            options=WriteOptions(max_shard_size, force, progress),
            sources=[ck, ad],
            config_patch=dtype_patch(config_dtype_name(target)) if target is not None else None,
            description="merge lora",
            provenance={"operation": "merge_lora", "config": asdict(cfg)},
            before_commit=before_commit,
        )
        result.extra.update({"lora_modules": len(modules), "replaced_tensors": sorted(replace)})
        return result


def check_targets(
    ck: Checkpoint, ad: Checkpoint, modules: dict[str, LoraModule], replace: dict[str, str]
) -> None:
    """Every adapted or replaced tensor exists in the base, with shapes that fit."""
    for name in [*modules, *replace]:
        if name not in ck.tensors:
            raise CheckpointError(f"{ck.root}: adapter targets {name!r}, which the base lacks")
    for mod in modules.values():
        _check_shapes(ck, ad, mod)
    for name, key in replace.items():
        if ad.info(key).shape != ck.info(name).shape:
            raise CheckpointError(
                f"{ad.root}: {key!r} is {list(ad.info(key).shape)} but the base "
                f"{name!r} is {list(ck.info(name).shape)}"
            )


def _lora_apply(
    ck: Checkpoint,
    ad: Checkpoint,
    modules: dict[str, LoraModule],
    replace: dict[str, str],
    out_dtype: Callable[[str], torch.dtype],
    device: str,
) -> Callable[[TensorGroup], Iterator[tuple[str, Any]]]:
    """``apply`` of the LoRA merge: W + scale·B@A for adapted tensors, the adapter's tensor
    for replaced ones, a checked copy (or cast) of the rest."""

    scratch = Scratch()

    def read(c: Checkpoint, name: str) -> torch.Tensor:
        return require_finite(c.get_tensor(name), str(c.path), name)

    def apply(group: TensorGroup) -> Iterator[tuple[str, Any]]:
        for name in group.names:
            want = out_dtype(name)
            if name in modules:
                mod = modules[name]
                a, b = read(ad, mod.a_key), read(ad, mod.b_key)
                yield name, folded_weight(read(ck, name), a, b, mod, want, device, scratch)
            elif name in replace:
                yield name, read(ad, replace[name]).to(want)
            elif want == ck.info(name).torch_dtype:
                yield checked_copy(ck, name)
            else:
                yield name, read(ck, name).to(want)

    return apply


class Scratch:
    """A float32 buffer reused from one tensor to the next: on this kind of machine touching
    fresh pages costs more than the fold's arithmetic. Buffers over ``keep_bytes`` are not
    kept (a huge lm_head does not pin its size for the rest of the run)."""

    def __init__(self, keep_bytes: int = 64 << 20) -> None:
        self.keep_bytes = keep_bytes
        self._buf: torch.Tensor | None = None

    def __call__(self, numel: int) -> torch.Tensor:
        if self._buf is not None and self._buf.numel() >= numel:
            return self._buf[:numel]
        buf = torch.empty(numel, dtype=torch.float32)
        if 4 * numel <= self.keep_bytes:
            self._buf = buf
        return buf


def folded_weight(
    w: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    mod: LoraModule,
    dtype: torch.dtype,
    device: str = "cpu",
    scratch: Scratch | None = None,
) -> torch.Tensor:
    """W + scale·B@A computed in float32 and rounded once to ``dtype`` (on the CPU): what
    peft's ``merge_and_unload`` leaves in a float32 model, and, rounded, in a bf16 one. An
    overflow of ``dtype`` is an error. With ``scratch`` (CPU, untransposed layouts) the same
    numbers are made in a reused buffer: B@A by the same matmul, then x scale, then + W."""
    if scratch is not None and device == "cpu" and not (mod.embedding or mod.fan_in_fan_out):
        out = scratch(w.numel()).view(w.shape)
        torch.mm(b.float(), a.float(), out=out)
        out.mul_(mod.scale)
        out.add_(w)  # float32 + W, exactly as W.float() + delta (addition commutes)
    else:
        out = w.to(device, torch.float32)
        out += lora_delta(
            a.to(device),
            b.to(device),
            mod.scale,
            embedding=mod.embedding,
            fan_in_fan_out=mod.fan_in_fan_out,
        )
    merged = out.to("cpu", dtype, copy=scratch is not None)  # never hand out the scratch
    if not all_finite(merged):
        kind = str(dtype).removeprefix("torch.")
        raise CheckpointError(
            f"tensor {mod.target!r}: merged values overflow {kind} (Inf); lower the scale"
        )
    return merged


def _check_shapes(ck: Checkpoint, ad: Checkpoint, mod: LoraModule) -> None:
    a, b = ad.info(mod.a_key).shape, ad.info(mod.b_key).shape
    w = ck.info(mod.target).shape
    if mod.embedding:
        delta = (a[1], b[0]) if len(a) == 2 and len(b) == 2 else None
    else:
        delta = (b[0], a[1]) if len(a) == 2 and len(b) == 2 else None
        if delta is not None and mod.fan_in_fan_out:
            delta = (delta[1], delta[0])
    if delta is None or tuple(w) != delta or a[0] != b[1]:
        raise CheckpointError(
            f"{ad.path}: LoRA factors {list(a)} and {list(b)} do not fit {mod.target!r} {list(w)}"
        )


def _recipe_yaml(ck: Checkpoint, adapter_dir: Path, cfg: LoraMergeConfig) -> str:
    import yaml

    note = ""
    if cfg.scale is not None:
        note = f"# weightsmith: LoRA scale overridden to {cfg.scale} (mergekit has no such knob)\n"
    data = {
        "merge_method": "passthrough",
        "models": [{"model": f"{ck.root.resolve()}+{adapter_dir.resolve()}"}],
    }
    if cfg.dtype:
        data["dtype"] = cfg.dtype
    return note + yaml.safe_dump(data, sort_keys=False)


def _card(ck: Checkpoint, adapter_dir: Path, cfg: LoraMergeConfig, n: int) -> str:
    scale = "the trained scale (lora_alpha / r)" if cfg.scale is None else f"scale {cfg.scale}"
    return (
        "---\ntags:\n- merge\n- lora\n- weightsmith\n---\n"
        f"# Merged model\n\nBase model `{ck.root.resolve()}` with the LoRA adapter "
        f"`{adapter_dir.resolve()}` folded in ({n} adapted tensors, {scale}), made with "
        "weightsmith's `merge lora`. Equivalent to peft's `merge_and_unload()`.\n"
    )
