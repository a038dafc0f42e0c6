"""What the pruning drivers share: choosing the Linears to prune, calibration tokens, results."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from weightsmith.compress.prune.registry import PruneConfig
from weightsmith.core.calibration import (
    LayerStreamer,
    calibration_dtype,
    calibration_windows,
    module_path,
)
from weightsmith.core.device import select_device
from weightsmith.core.streaming import RawTensor, StreamResult
from weightsmith.core.targets import ignore_matches as matches
from weightsmith.core.transform import checked_copy, require_finite
from weightsmith.errors import CheckpointError, ConfigError
from weightsmith.io.reader import Checkpoint
from weightsmith.io.writer import TensorSpec


@dataclass
class PruneResult(StreamResult):
    """A :class:`StreamResult` plus what was pruned (``extra``: sparsity per layer, ...)."""


@dataclass(frozen=True)
class LinearTarget:
    tensor: str  # checkpoint name of the weight
    linear: str  # name relative to its decoder layer, e.g. "mlp.down_proj"
    module: str  # transformers module name (what --ignore matches)
    layer: int
    shape: tuple[int, int]  # (out, in)


def is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"


def select_targets(
    ckpt: Checkpoint, model: nn.Module, cfg: PruneConfig
) -> tuple[dict[str, LinearTarget], list[str]]:
    """The decoder-layer Linears to prune (by weight tensor name) and the names of every other
    Linear (kept dense). Embeddings and the lm_head are never pruned."""
    transposed = ckpt.arch.linear_layout == "in_out"
    targets: dict[str, LinearTarget] = {}
    kept: list[str] = []
    used: set[str] = set()
    linears = {name for name, m in model.named_modules() if is_linear(m)}
    for tensor in ckpt.tensors:
        layer = ckpt.arch.layer_of(tensor)
        if layer is None or not tensor.endswith(".weight"):
            continue
        mpath = module_path(model, tensor[: -len(".weight")], ckpt.arch.module_renames)
        if mpath not in linears:
            continue
        hit = [p for p in cfg.ignore if matches(mpath, p)]
        used.update(hit)
        if hit:
            kept.append(mpath)
            continue
        info = ckpt.info(tensor)
        if len(info.shape) != 2 or not info.torch_dtype.is_floating_point:
            raise CheckpointError(
                f"{tensor}: expected a 2-D float weight, got {info.dtype} {list(info.shape)}"
            )
        shape = (info.shape[1], info.shape[0]) if transposed else (info.shape[0], info.shape[1])
        prefix = ckpt.arch.layer_prefix(tensor) or ""
        linear = tensor[len(prefix) : -len(".weight")]
        targets[tensor] = LinearTarget(tensor, linear, mpath, layer, shape)
    pruned = {t.module for t in targets.values()}
    for name in sorted(linears):
        if name not in pruned and name not in kept:
            hit = [p for p in cfg.ignore if matches(name, p)]
            used.update(hit)
            kept.append(name)
    unused = [p for p in cfg.ignore if p not in used]
    if unused:
        raise ConfigError(f"--ignore {unused[0]!r} matches no Linear of {ckpt.root}")
    if not targets:
        raise ConfigError(f"{ckpt.root}: no decoder-layer Linear left to prune")
    if cfg.pattern is not None:
        n, m = cfg.pattern
        for t in targets.values():
            if t.shape[1] % m:
                raise ConfigError(
                    f"{t.module}: {t.shape[1]} input features are not divisible by M={m} of "
                    f"--pattern {n}:{m}; use another M or --ignore {t.linear}"
                )
    return targets, kept


def calibration_streamer(
    ckpt: Checkpoint, cfg: PruneConfig, *, device: str, progress: bool
) -> tuple[LayerStreamer, dict[str, Any]]:
    """A :class:`LayerStreamer` on the configured calibration text, its forwards in
    ``cfg.calib_dtype``, and what it ran on (the dtype too)."""
    ids, info = calibration_windows(ckpt.root, cfg.calib, cfg.calib_samples, cfg.seq_len)
    dtype = calibration_dtype(cfg.calib_dtype, ckpt, select_device(str(device)))
    info["dtype"] = str(dtype).removeprefix("torch.")
    streamer = LayerStreamer(
        ckpt, ids, batch_size=cfg.batch_size, device=device, progress=False, compute_dtype=dtype
    )
    return streamer, info


def passthrough(ckpt: Checkpoint, name: str, new_name: str | None = None) -> tuple[str, RawTensor]:
    """A tensor copied bit-exactly (optionally under a new name), as ``(name, value)``; its
    bytes are checked for NaN/Inf on the way."""
    return checked_copy(ckpt, name, new_name)


def read_checked(ckpt: Checkpoint, name: str) -> torch.Tensor:
    """Tensor ``name`` read into memory; a one-line error naming it when it holds NaN/Inf."""
    return require_finite(ckpt.get_tensor(name), str(ckpt.path), name)


def spec_of(ckpt: Checkpoint, name: str) -> TensorSpec:
    info = ckpt.info(name)
    return TensorSpec(name, info.torch_dtype, info.shape)


def as_out_in(w: torch.Tensor, transposed: bool) -> torch.Tensor:
    """A stored Linear weight as ``(out, in)`` (GPT-2's Conv1D stores ``(in, out)``)."""
    return w.t() if transposed else w
