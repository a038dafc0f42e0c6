"""The driver for unstructured and N:M pruning (magnitude, Wanda, SparseGPT): zeros written in
place.

Magnitude needs no data and streams one tensor at a time. Wanda streams one decoder layer at a
time through :class:`~weightsmith.core.calibration.LayerStreamer`: the inputs of every Linear
of a layer are recorded in one pass over the calibration activations (as locuslab/wanda
does), the layer's weights are masked, and the *pruned* layer's outputs feed the next layer.

SparseGPT runs the same way on the Hessians of the layer's Linears and also updates the weights
it keeps (see :mod:`.sparsegpt`).

The output is dense safetensors in the input's dtype: pruned entries are zero, every other
entry is bit-identical to the input (SparseGPT: the updated value). Each tensor's sparsity is
verified before it is written.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import torch

from weightsmith.compress.moe import ExpertRouting, moe_summary
from weightsmith.compress.prune.common import (
    LinearTarget,
    PruneResult,
    as_out_in,
    calibration_streamer,
    passthrough,
    read_checked,
    select_targets,
    spec_of,
)
from weightsmith.compress.prune.experts_fused import FusedPruning
from weightsmith.compress.prune.masks import check_sparsity, prune_mask
from weightsmith.compress.prune.registry import METHODS, PruneConfig
from weightsmith.compress.prune.sparsegpt import sparsegpt_layer
from weightsmith.compress.prune.wanda import ColumnNormStat
from weightsmith.core.calibration import CalibrationLayer
from weightsmith.core.skeleton import build_skeleton
from weightsmith.core.transform import WriteOptions, require_finite, rewrite_checkpoint
from weightsmith.errors import ConfigError, OutputError
from weightsmith.io.reader import Checkpoint, TensorGroup


def linear_mask(
    w: torch.Tensor, cfg: PruneConfig, input_norm: torch.Tensor | None = None
) -> torch.Tensor:
    """The pruning mask of one ``(out, in)`` weight under ``cfg`` (pure)."""
    method = METHODS[cfg.method]
    scores = method.fn(w.float(), input_norm) if method.needs_calibration else method.fn(w.float())
    sparsity = None if cfg.pattern else cfg.target_sparsity
    return prune_mask(scores, sparsity=sparsity, pattern=cfg.pattern, compare=method.compare)


def _refuse_experts_update(ckpt: Checkpoint, name: str, updates_weights: bool) -> None:
    """SparseGPT's per-layer update does not route tokens to MoE experts yet: refuse it."""
    if updates_weights and ckpt.arch.experts is not None:
        raise ConfigError(
            f"{ckpt.root}: {name} does not handle MoE experts yet; use --method wanda"
        )


def prune_unstructured(
    ckpt: Checkpoint,
    out: str | os.PathLike[str],
    cfg: PruneConfig,
    *,
    force: bool,
    max_shard_size: int,
    device: str,
    progress: bool,
) -> PruneResult:
    method = METHODS[cfg.method]
    _refuse_experts_update(ckpt, cfg.method, method.updates_weights)
    targets, kept = select_targets(ckpt, build_skeleton(ckpt), cfg)
    transposed, zeros = ckpt.arch.linear_layout == "in_out", {}
    calib_info: dict[str, Any] = {}
    moe_stats: dict[str, Any] = {}
    fused = FusedPruning(ckpt, cfg, method.compare, lambda w, n: linear_mask(w, cfg, n))  # gpt-oss

    def finish(t: LinearTarget, stored: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        zeros[t.tensor], pruned = apply_mask(t, stored, mask, cfg, transposed)
        return pruned

    def plan(group: TensorGroup):
        return [spec_of(ckpt, n) for n in group.names]

    if not method.needs_calibration:

        def apply(group: TensorGroup) -> Iterator:
            for n in group.names:
                t = targets.get(n)
                if n in fused or t is None:
                    yield (n, fused.data_free(n)) if n in fused else passthrough(ckpt, n)
                    continue
                stored = read_checked(ckpt, n)
                yield n, finish(t, stored, linear_mask(as_out_in(stored, transposed), cfg))

        groups = ckpt.groups("tensor")
    else:
        streamer, info = calibration_streamer(ckpt, cfg, device=device, progress=progress)
        calib_info.update(info)

        def layer_fn(cl: CalibrationLayer) -> dict[str, torch.Tensor]:
            if not method.updates_weights:
                masks = wanda_masks(cl, targets, cfg, moe_stats)  # then the fused experts'
                return {**masks, **fused.layer_masks(cl, moe_stats)}
            for name, t in cl.state_dict().items():  # before NaN reaches a Hessian
                require_finite(t, str(ckpt.path), name)
            return sparsegpt_layer(cl, targets, cfg)

        def apply(group: TensorGroup) -> Iterator:
            done = {}
            if group.layer is not None:
                done = streamer.run_layer(group.layer, layer_fn)
            for n in group.names:
                t = targets.get(n)
                if n in fused:
                    yield n, fused.finish(n, done[n])
                elif t is None:
                    yield passthrough(ckpt, n)
                elif method.updates_weights:  # the layer was checked finite before pruning
                    dtype = ckpt.info(n).torch_dtype
                    zeros[n], new = store_updated(t, dtype, done[n], cfg, transposed)
                    yield n, new
                else:
                    yield n, finish(t, read_checked(ckpt, n), done[n])

        groups = ckpt.groups("layer")

    result = rewrite_checkpoint(
        ckpt, groups, out, plan=plan, apply=apply,
        options=WriteOptions(max_shard_size, force, progress), description=f"prune {cfg.method}",
        provenance={"operation": "prune", "config": asdict(cfg), "calibration": calib_info},
    )  # fmt: skip
    r = PruneResult(**result.__dict__)
    r.extra = _report(ckpt, cfg, targets, kept, zeros, calib_info)
    r.extra.update(moe_summary(moe_stats, "magnitude"))
    fused.report(r.extra, (sum(zeros.values()), sum(math.prod(t.shape) for t in targets.values())))
    return r


def apply_mask(
    t: LinearTarget, stored: torch.Tensor, mask: torch.Tensor, cfg: PruneConfig, transposed: bool
) -> tuple[int, torch.Tensor]:
    """(zeros, ``stored`` zeroed where ``mask`` (given as (out, in)) says), the requested
    sparsity verified."""
    pruned = stored.clone()
    as_out_in(pruned, transposed)[mask] = 0
    try:
        zeros = check_sparsity(
            as_out_in(pruned, transposed),
            sparsity=cfg.target_sparsity,
            pattern=cfg.pattern,
            compare=METHODS[cfg.method].compare,
        )
    except ValueError as e:  # cannot happen unless a mask function is wrong
        raise OutputError(f"{t.tensor}: requested sparsity not reached ({e})") from None
    return zeros, pruned


def store_updated(
    t: LinearTarget, dtype: torch.dtype, w: torch.Tensor, cfg: PruneConfig, transposed: bool
) -> tuple[int, torch.Tensor]:
    """(zeros, the updated ``(out, in)`` weight ``w`` in the stored ``dtype`` and layout), the
    requested sparsity verified and the values checked finite."""
    new = as_out_in(w, transposed).to(dtype).contiguous()
    if not torch.isfinite(new).all():
        raise OutputError(f"{t.tensor}: the updated weight holds NaN or Inf in {dtype}")
    try:
        zeros = check_sparsity(
            as_out_in(new, transposed), sparsity=cfg.target_sparsity, pattern=cfg.pattern,
            compare=METHODS[cfg.method].compare,
        )  # fmt: skip
    except ValueError as e:  # cannot happen unless the pruning function is wrong
        raise OutputError(f"{t.tensor}: requested sparsity not reached ({e})") from None
    return zeros, new


def wanda_masks(
    cl: CalibrationLayer,
    targets: dict[str, LinearTarget],
    cfg: PruneConfig,
    moe_stats: dict | None = None,
) -> dict[str, torch.Tensor]:
    """Wanda's masks of one layer's target Linears (by tensor name); the layer's weights are
    masked in place so that later layers calibrate on the pruned layer. MoE experts routed
    fewer than ``cfg.min_expert_tokens`` tokens get magnitude masks (``moe_stats`` records
    the token counts and those experts)."""
    names = [n for n in cl.linear_names if cl.tensor_name(n) in targets]
    routing = ExpertRouting(cl, cfg.min_expert_tokens, cfg.calibrate_all_experts)
    stats = cl.collect(names, lambda n, m: ColumnNormStat(cl.weight(n).shape[1]))
    starved = routing.starved(names)  # MoE experts with too few tokens: magnitude
    masks = {}
    for n in names:
        w = cl.weight(n)
        # a starved expert: magnitude (unit input norms), compared per row as Wanda does
        norm = torch.ones(w.shape[1]) if n in starved else stats[n].norm()
        mask = linear_mask(w, cfg, norm.to(w.device))
        cl.set_weight(n, w.masked_fill(mask, 0))  # later layers see the pruned layer
        masks[cl.tensor_name(n)] = mask.cpu()  # applied to the stored (host) weight
    routing.record_into(moe_stats, [cl.prefix + n for n in sorted(starved)])
    return masks


def _report(
    ckpt: Checkpoint,
    cfg: PruneConfig,
    targets: dict[str, LinearTarget],
    kept: list[str],
    zeros: dict[str, int],
    calib_info: dict,
) -> dict:
    numel = {n: t.shape[0] * t.shape[1] for n, t in targets.items()}
    per_layer: dict[int, list[int]] = {}
    for n, t in targets.items():
        acc = per_layer.setdefault(t.layer, [0, 0])
        acc[0] += zeros[n]
        acc[1] += numel[n]
    pruned, total = sum(zeros.values()), sum(numel.values())
    return {
        "method": cfg.method,
        "target": f"{cfg.pattern[0]}:{cfg.pattern[1]}" if cfg.pattern else cfg.target_sparsity,
        "pruned_linears": len(targets),
        "kept_linears": kept,
        "sparsity": pruned / total if total else 0.0,
        "sparsity_of_all_params": pruned / ckpt.num_params if ckpt.num_params else 0.0,
        "layer_sparsity": {str(i): z / n for i, (z, n) in sorted(per_layer.items())},
        "tensor_sparsity": {n: zeros[n] / numel[n] for n in targets},
        "input_size": ckpt.total_bytes,
        "calibration": calib_info or None,
    }
