"""``prune_checkpoint``: the one public entry point; dispatches on the method's kind."""

from __future__ import annotations

import os
import time

from weightsmith.compress.prune.common import PruneResult
from weightsmith.compress.prune.experts import prune_experts
from weightsmith.compress.prune.registry import PruneConfig
from weightsmith.compress.prune.structured import prune_depth, prune_width
from weightsmith.compress.prune.unstructured import prune_unstructured
from weightsmith.core.device import select_device
from weightsmith.core.experts import refuse_fused_experts
from weightsmith.core.experts_fused import fused_experts, natively_fused
from weightsmith.errors import CheckpointError, ConfigError
from weightsmith.io.architectures import require_described
from weightsmith.io.reader import open_checkpoint
from weightsmith.io.writer import DEFAULT_MAX_SHARD_SIZE

DRIVERS = {"unstructured": prune_unstructured, "depth": prune_depth, "width": prune_width}
DRIVERS["experts"] = prune_experts


def prune_checkpoint(
    path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    cfg: PruneConfig,
    *,
    force: bool = False,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    device: str = "cpu",
    progress: bool = True,
) -> PruneResult:
    """Prune the checkpoint at ``path`` into ``out`` as ``cfg`` says (see the package docs)."""
    cfg.validate()
    device = str(select_device(device))  # auto -> cuda/cpu; unknown or absent: refused now
    start = time.perf_counter()
    with open_checkpoint(path) as ckpt:
        if ckpt.config is None:
            raise CheckpointError(f"{ckpt.root}: no config.json; pruning needs it")
        require_described(ckpt.arch, f"{ckpt.root}: prune")
        if ckpt.config.get("quantization_config") is not None:
            raise CheckpointError(f"{ckpt.root}: is quantized; prune the unquantized model first")
        fused = fused_experts(ckpt)
        if fused and not natively_fused(ckpt.arch.experts):
            refuse_fused_experts(ckpt, f"{ckpt.root}: prune")  # the skeleton is per-expert
        if fused and cfg.kind not in ("experts", "unstructured"):
            raise ConfigError(f"{fused[0].tensor}: --method {cfg.method} does not prune fused "
                              "3-D experts; use --method experts, magnitude or wanda")  # fmt: skip
        if cfg.kind == "width" and ckpt.arch.experts is not None:
            raise ConfigError(f"{ckpt.root}: --method {cfg.method} does not slice MoE experts; "
                              "use --method experts (drop experts) or wanda")  # fmt: skip
        result = DRIVERS[cfg.kind](
            ckpt,
            out,
            cfg,
            force=force,
            max_shard_size=max_shard_size,
            device=device,
            progress=progress,
        )
    result.wall_s = round(time.perf_counter() - start, 3)  # calibration/scoring included
    return result
