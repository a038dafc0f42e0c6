"""``compress prune --method experts --keep N``: drop the experts each MoE layer's router uses
least on the calibration text, keeping ``N`` per layer.

The calibration text runs through the model one decoder layer at a time (transformers' own
router picks the experts, :class:`~weightsmith.compress.moe.ExpertRouting` counts the tokens
routed to each). Per layer the ``N`` experts with the most tokens are kept (ties: the lower
index), renumbered ``0..N-1`` in their original order; the router's rows (and bias) are cut to
the kept experts, fused 3-D expert tensors (gpt-oss) and their biases sliced along dim 0, and
``config.json``'s expert count becomes ``N``, so the smaller model loads in the same
transformers class.

Grouped routing (DeepSeek-V3: the router first picks ``topk_group`` of ``n_group`` equal groups
of consecutive experts, then the top-k experts inside them) keeps ``N / n_group`` experts per
group, so every kept expert stays in its group and the router's group choice keeps its meaning.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import asdict

import torch

from weightsmith.compress.moe import ExpertRouting
from weightsmith.compress.prune.common import PruneResult, calibration_streamer, passthrough
from weightsmith.compress.prune.registry import PruneConfig, prune_method
from weightsmith.core.experts import is_router, refuse_fused_experts
from weightsmith.core.experts_fused import fused_experts, natively_fused
from weightsmith.core.transform import WriteOptions, require_finite, rewrite_checkpoint
from weightsmith.errors import ConfigError
from weightsmith.io.reader import Checkpoint, TensorGroup
from weightsmith.io.writer import TensorSpec


@prune_method("experts", kind="experts", needs_calibration=True,
              description="MoE: keep the --keep experts per layer its router uses most")  # fmt: skip
def kept_experts(counts: list[int], keep: int) -> list[int]:
    """The ``keep`` experts with the most routed tokens (ties: lower index), ascending."""
    order = sorted(range(len(counts)), key=lambda e: (-counts[e], e))
    return sorted(order[:keep])


def kept_grouped(counts: list[int], keep: int, groups: int) -> list[int]:
    """:func:`kept_experts` inside each of ``groups`` equal groups of consecutive experts:
    ``keep / groups`` from each, ascending."""
    size, per = len(counts) // groups, keep // groups
    return [g * size + e for g in range(groups)
            for e in kept_experts(counts[g * size : (g + 1) * size], per)]  # fmt: skip


def _groups(ckpt: Checkpoint, total: int, keep: int, top_k: int) -> int:
    """The router's expert-group count (1 without grouped routing); refuses a ``keep`` that
    cannot be split evenly into groups the router can still choose ``top_k`` experts from."""
    layout, config = ckpt.arch.experts, ckpt.config or {}
    groups = config.get(layout.groups_key) if layout.groups_key else None
    if not isinstance(groups, int) or groups <= 1:
        return 1
    chosen = config.get(layout.group_top_k_key) or groups
    per = keep // groups
    # transformers scores a group by the sum of its top 2 experts: a group needs 2
    if keep % groups or per < 2 or top_k > chosen * per or total % groups:
        raise ConfigError(
            f"--keep {keep}: the router picks {chosen} of {groups} expert groups "
            f"({layout.groups_key}), so --keep must be a multiple of {groups} with at least 2 "
            f"experts per group and {layout.top_k_key} ({top_k}) <= {chosen} x (--keep / "
            f"{groups})"
        )
    return groups


def _route_counts(ckpt: Checkpoint, cfg: PruneConfig, device: str, progress: bool):
    streamer, info = calibration_streamer(ckpt, cfg, device=device, progress=progress)
    counts: dict[int, list[int]] = {}
    for layer in streamer.layers():
        routing = streamer.run_layer(layer, lambda cl: ExpertRouting(cl, 0, False))
        for b in routing.blocks:  # counted by the forward that fed the next layer
            counts[layer] = [int(c) for c in b.counts]
    return counts, info


def _check(ckpt: Checkpoint, cfg: PruneConfig) -> tuple[int, int, int]:
    layout = ckpt.arch.experts
    if layout is None:
        raise ConfigError(f"{ckpt.root}: --method experts needs a mixture-of-experts model "
                          f"({ckpt.arch.name} has no experts)")  # fmt: skip
    if not natively_fused(layout):  # gpt-oss's fused tensors are sliced along dim 0
        refuse_fused_experts(ckpt, f"{ckpt.root}: prune experts")
    total = layout.num_experts(ckpt.config)
    top_k = (ckpt.config or {}).get(layout.top_k_key)
    if total is None or not isinstance(top_k, int):
        raise ConfigError(f"{ckpt.root}/config.json: no expert count or {layout.top_k_key}")
    keep = cfg.keep or 0
    if not top_k <= keep < total:
        raise ConfigError(f"--keep must be between {layout.top_k_key} ({top_k}) and one less "
                          f"than the {total} experts (got {keep})")  # fmt: skip
    return total, keep, _groups(ckpt, total, keep, top_k)


def prune_experts(
    ckpt: Checkpoint,
    out: str | os.PathLike[str],
    cfg: PruneConfig,
    *,
    force: bool,
    max_shard_size: int,
    device: str,
    progress: bool,
) -> PruneResult:
    total, keep, n_groups = _check(ckpt, cfg)
    layout, arch = ckpt.arch.experts, ckpt.arch
    counts, calib_info = _route_counts(ckpt, cfg, device, progress)
    kept = {layer: kept_grouped(c, keep, n_groups) for layer, c in counts.items()}
    head = layout.expert.partition("{expert}")[0]

    def rename(n: str) -> str | None:
        """An expert tensor's name after renumbering; None for a dropped expert's."""
        layer, prefix = arch.layer_of(n), arch.layer_prefix(n)
        if layer not in kept or prefix is None or not n[len(prefix) :].startswith(head):
            return n
        index, _, rest = n[len(prefix) + len(head) :].partition(".")
        if not index.isdigit():
            return n
        e = int(index)
        return None if e not in kept[layer] else f"{prefix}{head}{kept[layer].index(e)}.{rest}"

    groups = [g for g in ckpt.groups("tensor") if rename(g.names[0]) is not None]
    # per-expert rows: routers, and fused 3-D experts with their biases (expert = dim 0)
    fused = {n for f in fused_experts(ckpt) for n in (f.tensor, f.bias) if n}

    def sliced(n: str) -> bool:
        return (is_router(arch, n) or n in fused) and arch.layer_of(n) in kept

    def plan(group: TensorGroup) -> list[TensorSpec]:
        n = group.names[0]
        info = ckpt.info(n)
        shape = info.shape
        if sliced(n):
            shape = (keep, *shape[1:])
        return [TensorSpec(rename(n), info.torch_dtype, shape)]

    def apply(group: TensorGroup) -> Iterator:
        n = group.names[0]
        layer = arch.layer_of(n)
        if sliced(n):
            t = require_finite(ckpt.get_tensor(n), str(ckpt.path), n)
            yield n, t[torch.tensor(kept[layer])].contiguous()
        else:
            yield passthrough(ckpt, n, rename(n))

    def patch(config: dict) -> dict:
        for key in layout.count_keys:
            if key in config:
                config[key] = keep
        return config

    record = {"operation": "prune", "config": asdict(cfg), "calibration": calib_info}
    result = rewrite_checkpoint(
        ckpt, groups, out, plan=plan, apply=apply, config_patch=patch,
        options=WriteOptions(max_shard_size, force, progress),
        provenance={**record, "kept_experts": {str(k): v for k, v in kept.items()}},
        description="prune experts",
    )  # fmt: skip
    r = PruneResult(**result.__dict__)
    r.extra = {
        "method": cfg.method,
        "experts_before": total,
        "experts_after": keep,
        "router_groups": n_groups,
        "expert_tokens": {str(k): v for k, v in counts.items()},
        "kept_experts": {str(k): v for k, v in kept.items()},
        "params_before": ckpt.num_params,
        "params_after": sum(math.prod(s.shape) for g in groups for s in plan(g)),
        "input_size": ckpt.total_bytes,
        "output_size": result.total_size,
        "calibration": calib_info or None,
    }
    return r
