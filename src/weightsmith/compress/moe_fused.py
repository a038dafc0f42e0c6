"""``compress quantize`` on checkpoints whose experts are fused 3-D tensors (gpt-oss).

transformers quantizes nn.Linear modules (compressed-tensors, bitsandbytes, GPTQ); gpt-oss's
experts are 3-D parameters, not Linears, so integer formats cannot hold them in a checkpoint
transformers loads. What it does load is gpt-oss's own format: MXFP4 experts
(``quantization_config: {quant_method: mxfp4}``; ``gate_up_proj_blocks`` uint8
``(experts, out, in/32, 16)``, two E2M1 values per byte, low nibble first, and
``gate_up_proj_scales`` uint8 ``(experts, out, in/32)``, E8M0 exponents + 127), which its
quantizer dequantizes on load where no MXFP4 kernel runs (CPU) and runs natively on GPUs.

So ``--method mxfp4`` on gpt-oss writes that format: every expert's slice of each fused tensor
is quantized as its own Linear (weight ``(out, in)`` = slice transposed), exactly as
``--method mxfp4`` quantizes a Linear (groups of 32 inputs, power-of-two scales); biases,
routers, attention, embeddings and lm_head stay as stored (gpt-oss's own release keeps them in
bf16 too). Any other method quantizes the attention Linears through the ordinary path and keeps
the fused experts as stored (:func:`native_fused_format`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch

from weightsmith.compress.fp4 import mxfp4_quantize_weight
from weightsmith.compress.moe import KEEP_EXPERT_FORMATS
from weightsmith.compress.registry import QuantConfig
from weightsmith.core.experts_fused import FusedExpertTensor, expert_weight, fused_experts
from weightsmith.core.streaming import StreamResult
from weightsmith.core.transform import (
    WriteOptions,
    checked_copy,
    require_finite,
    rewrite_checkpoint,
)
from weightsmith.errors import CheckpointError, ConfigError
from weightsmith.io.reader import Checkpoint, TensorGroup
from weightsmith.io.writer import TensorSpec

__all__ = ["FUSED_METHODS", "check_fused_quantize", "native_fused_format", "quantize_fused_mxfp4"]

FUSED_METHODS = ("mxfp4",)
MX_GROUP = 32


def native_fused_format(ckpt: Checkpoint, cfg: QuantConfig) -> bool:
    """For a checkpoint with fused 3-D experts: True when ``cfg`` writes the family's own
    quantized-experts format (gpt-oss MXFP4, :func:`quantize_fused_mxfp4`); False when the
    ordinary path quantizes the Linears and keeps the fused experts as stored (gpt-oss with
    any other method, as transformers and llm-compressor treat modules that are not
    nn.Linear; any family with ``--format bnb``, which keeps experts anyway). A Mixtral/Qwen3-MoE
    saved fused with an integer format is refused: its released per-expert layout quantizes
    the experts too."""
    native = ckpt.arch.experts.quantized_format  # "" when the family has none
    if native and cfg.method == native:
        return True
    if not native and cfg.format not in KEEP_EXPERT_FORMATS:
        check_fused_quantize(ckpt, cfg)  # raises: quantize the per-expert checkpoint
    return False


def check_fused_quantize(ckpt: Checkpoint, cfg: QuantConfig) -> list[FusedExpertTensor]:
    """The fused expert tensors ``cfg`` quantizes, or a one-line refusal."""
    if (ckpt.config or {}).get("quantization_config") is not None:
        raise CheckpointError(f"{ckpt.root}: is already quantized; quantize an unquantized "
                              "model (gpt-oss's release is MXFP4 already)")  # fmt: skip
    fused = fused_experts(ckpt)
    if not fused:
        raise CheckpointError(f"{ckpt.root}: no fused expert tensors "
                              f"({', '.join(k for k, _ in ckpt.arch.experts.fused)}) found")  # fmt: skip
    if ckpt.arch.experts.quantized_format not in FUSED_METHODS:
        raise ConfigError(
            f"{fused[0].tensor}: fused 3-D experts ({ckpt.arch.name}, as transformers holds "
            "them in memory) are not nn.Linear modules and no format transformers loads holds "
            "them quantized; quantize the released checkpoint (one Linear per expert)"
        )
    if cfg.method not in FUSED_METHODS:
        raise ConfigError(
            f"{fused[0].tensor}: fused 3-D experts ({ckpt.arch.name}) are not nn.Linear "
            f"modules, so transformers cannot load them quantized by --method {cfg.method}; use "
            "--method mxfp4 (gpt-oss's native MXFP4 experts, loaded by transformers' Mxfp4 "
            "quantizer)"
        )
    if cfg.ignore:
        raise ConfigError(f"--ignore: {ckpt.arch.name}'s native MXFP4 format quantizes every "
                          "expert and nothing else; drop --ignore")  # fmt: skip
    for f in fused:
        shape = ckpt.info(f.tensor).shape
        n_in = (shape[1] if f.layout == "in_out" else shape[-1]) if len(shape) == 3 else 0
        if n_in == 0 or n_in % MX_GROUP:
            raise ConfigError(f"{f.tensor}: shape {list(shape)}: MXFP4 needs a 3-D tensor "
                              f"whose input size is a multiple of {MX_GROUP}")  # fmt: skip
    return fused


def _not_converted(ckpt: Checkpoint) -> list[str]:
    """``modules_to_not_convert`` as gpt-oss's release writes it (attention, routers,
    embeddings, lm_head); transformers' Mxfp4 quantizer converts only the experts anyway."""
    arch, layout = ckpt.arch, ckpt.arch.experts
    layer = arch.layer_templates[0].replace("{layer}", "*")
    attn = sorted({n.split(".")[0] for g in arch.sequential_linears for n in g})
    names = [layer + a for a in attn] + [layer + layout.router]
    names += [e.removesuffix(".weight") for e in arch.embed]
    return names + ([arch.lm_head.removesuffix(".weight")] if arch.lm_head else [])


def _encode(t: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    blocks, scales = [], []
    for e in range(t.shape[0]):
        q = mxfp4_quantize_weight(expert_weight(t, e, layout).contiguous())
        blocks.append(q.packed.reshape(q.packed.shape[0], -1, MX_GROUP // 2))
        scales.append(q.scale)
    return torch.stack(blocks), torch.stack(scales)


def quantize_fused_mxfp4(
    ckpt: Checkpoint,
    out: str | os.PathLike[str],
    cfg: QuantConfig,
    *,
    force: bool,
    max_shard_size: int,
    progress: bool,
    provenance: dict,
) -> tuple[StreamResult, dict[str, Any]]:
    """Write ``ckpt`` with its fused experts in gpt-oss's MXFP4 format; the result and the
    ``--report`` fields."""
    fused = {f.tensor: f for f in check_fused_quantize(ckpt, cfg)}

    def plan(group: TensorGroup) -> list[TensorSpec]:
        n = group.names[0]
        info = ckpt.info(n)
        if n not in fused:
            return [TensorSpec(n, info.torch_dtype, info.shape)]
        e, a, b = info.shape
        o, i = (b, a) if fused[n].layout == "in_out" else (a, b)
        return [TensorSpec(n + "_blocks", torch.uint8, (e, o, i // MX_GROUP, MX_GROUP // 2)),
                TensorSpec(n + "_scales", torch.uint8, (e, o, i // MX_GROUP))]  # fmt: skip

    def apply(group: TensorGroup) -> Iterator[tuple[str, torch.Tensor]]:
        n = group.names[0]
        if n not in fused:
            yield checked_copy(ckpt, n)
            return
        t = require_finite(ckpt.get_tensor(n), str(ckpt.path), n)
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ConfigError(f"{n}: MXFP4 quantizes float weights, got {t.dtype}")
        blocks, scales = _encode(t, fused[n].layout)
        yield n + "_blocks", blocks
        yield n + "_scales", scales

    def patch(config: dict) -> dict:
        config["quantization_config"] = {
            "quant_method": "mxfp4",
            "modules_to_not_convert": _not_converted(ckpt),
        }
        return config

    result = rewrite_checkpoint(
        ckpt, ckpt.groups("tensor"), out, plan=plan, apply=apply, config_patch=patch,
        options=WriteOptions(max_shard_size, force, progress),
        description="quantize mxfp4 (fused experts)", provenance=provenance,
    )  # fmt: skip
    quantized = sum(ckpt.info(n).numel for n in fused)
    total = ckpt.num_params
    extra = {
        "method": cfg.method,
        "format": "gpt-oss-mxfp4",
        **cfg.options.describe(),  # bits 4, group_size 32
        "input_size": ckpt.total_bytes,
        "output_size": result.total_size,
        "quantized_expert_tensors": sorted(fused),
        "quantized_linears": sum(ckpt.info(n).shape[0] for n in fused),  # one per expert slice
        "kept_linears": "attention, routers, embeddings and lm_head stay as stored",
        "params": total,
        "quantized_params": quantized,
        "fraction_quantized": quantized / total if total else 0.0,
    }
    return result, extra
