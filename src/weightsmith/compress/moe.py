"""Mixture-of-experts support for ``compress quantize``: expert Linears as quantization targets.

transformers' model keeps experts as fused 3-D parameters, so the skeleton has no Linear for
them; the targets come from the checkpoint's per-expert names instead (see
:mod:`weightsmith.core.experts`). Routers are never targets.
"""

from __future__ import annotations

from weightsmith.compress.registry import LinearTarget, QuantConfig
from weightsmith.core.experts import expert_linears
from weightsmith.core.targets import ignore_matches
from weightsmith.errors import CheckpointError, ConfigError
from weightsmith.io.reader import Checkpoint

__all__ = ["EXPERT_FORMATS", "expert_targets"]

# Formats whose quantized per-expert Linears transformers loads back into its fused experts
# (compressed-tensors' MoE conversion). bitsandbytes, GPTQ (gptqmodel) and BitNet replace
# nn.Linear modules only, which transformers' experts are not: refused, not written unloadable.
EXPERT_FORMATS = ("compressed-tensors",)


def expert_targets(
    ckpt: Checkpoint, cfg: QuantConfig, used: set[str], ignored: list[str]
) -> list[LinearTarget]:
    """The per-expert Linears to quantize. ``--ignore`` patterns match their checkpoint module
    names (``model.layers.0.block_sparse_moe.experts.3.w1``); the ones they match are added
    to ``ignored`` and the patterns to ``used``."""
    group_size = getattr(cfg.options, "group_size", -1)
    targets = []
    for e in expert_linears(ckpt):
        hit = [p for p in cfg.ignore if ignore_matches(e.module, p)]
        used.update(hit)
        if hit:
            ignored.append(e.module)
            continue
        if cfg.format not in EXPERT_FORMATS:
            raise ConfigError(
                f"{ckpt.root}: --format {cfg.format} cannot hold quantized MoE experts that "
                f"transformers loads (it quantizes nn.Linear modules only); use --format "
                f"{EXPERT_FORMATS[0]} (--method rtn or gptq), or keep the experts with "
                "--ignore 're:.*experts.*'"
            )
        info = ckpt.info(e.tensor)
        if len(info.shape) != 2 or not info.torch_dtype.is_floating_point:
            raise CheckpointError(
                f"{e.tensor}: expected a 2-D float weight, got {info.dtype} {list(info.shape)}"
            )
        out_f, in_f = info.shape
        if group_size != -1 and in_f % group_size:
            raise ConfigError(
                f"{e.module}: in_features {in_f} is not divisible by --group-size {group_size}; "
                f"use a group size that divides it, --group-size -1 (per channel), or "
                f"--ignore {e.module}"
            )
        siblings = frozenset(
            n[len(e.module) + 1 :] for n in ckpt.tensors if n.startswith(f"{e.module}.")
        )
        targets.append(LinearTarget(e.tensor, e.module, e.module, e.layer, (out_f, in_f),
                                    info.torch_dtype, siblings - {"weight"}))  # fmt: skip
    return targets
