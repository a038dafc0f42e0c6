"""transformers' ``bitnet`` format (``quantization_config.quant_method: "bitnet"``), offline mode.

Per quantized Linear ``(out, in)``, as ``transformers.integrations.bitnet`` loads it:

- ``weight``: uint8 ``(out/4, in)``, four 2-bit values ``q + 1`` per byte packed along the
  OUTPUT dim: the rows are split into 4 blocks of ``out/4`` and row ``r`` of block ``i`` sits
  at bits ``2i..2i+1`` of packed row ``r`` (``pack_weights``/``unpack_weights``);
- ``weight_scale``: ``(1,)`` in the model dtype. ``bitlinear`` (``BitLinear``) computes
  ``y / (m · weight_scale)``, so it stores ``1/γ``; ``autobitlinear`` (``AutoBitLinear``)
  computes ``(x̂ Wᵀ + b) · weight_scale``, so it stores ``γ`` and the bias as ``b / γ``;
- ``rms_norm.weight`` ``(in,)``: ones (``use_rms_norm`` only; passed through when the
  checkpoint already has it), so transformers reports no missing keys.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, replace

import torch

from weightsmith.compress.registry import QuantConfig, QuantizedWeight, output_format
from weightsmith.compress.ternary import check_ternary_config, ternary_quantize
from weightsmith.compress.ternary_math import absmean_ternary
from weightsmith.core.calibration import build_skeleton
from weightsmith.core.streaming import RawTensor, stream_transform
from weightsmith.errors import CheckpointError, ConfigError
from weightsmith.io.reader import TensorGroup, open_checkpoint
from weightsmith.io.writer import DEFAULT_MAX_SHARD_SIZE, TensorSpec

VALUES_PER_BYTE = 4
LINEAR_CLASSES = ("bitlinear", "autobitlinear")


def pack_ternary(q: torch.Tensor) -> torch.Tensor:
    """Ternary levels ``(out, …)`` -> uint8 ``(out/4, …)`` in transformers' ``pack_weights``
    layout (``out`` must be divisible by 4)."""
    out_f = q.shape[0]
    if out_f % VALUES_PER_BYTE:
        raise ValueError(f"out_features {out_f} is not divisible by {VALUES_PER_BYTE}")
    if q.numel() and (int(q.min()) < -1 or int(q.max()) > 1):
        raise ValueError("ternary levels must be in {-1, 0, 1}")
    u = (q.to(torch.int16) + 1).to(torch.uint8)
    blocks = u.reshape(VALUES_PER_BYTE, out_f // VALUES_PER_BYTE, *q.shape[1:])
    packed = torch.zeros_like(blocks[0])
    for i in range(VALUES_PER_BYTE):
        packed |= blocks[i] << (2 * i)
    return packed


def unpack_ternary(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_ternary`: int8 levels ``(4 · rows, …)``."""
    parts = [(packed >> (2 * i)) & 3 for i in range(VALUES_PER_BYTE)]
    return torch.cat(parts, 0).to(torch.int8) - 1


def stored_scale(
    gamma: torch.Tensor | float, linear_class: str, dtype: torch.dtype
) -> torch.Tensor:
    """``weight_scale`` ``(1,)`` for ``linear_class``: ``1/γ`` (bitlinear) or ``γ`` (autobitlinear)."""
    g = torch.as_tensor(gamma, dtype=torch.float32).reshape(1)
    return (1.0 / g if linear_class == "bitlinear" else g).to(dtype)


def effective_gamma(weight_scale: torch.Tensor, linear_class: str) -> torch.Tensor:
    """The ``γ`` a stored ``weight_scale`` multiplies the ternary product by (float32)."""
    s = weight_scale.float().reshape(())
    return 1.0 / s if linear_class == "bitlinear" else s


@output_format
class BitNetFormat:
    """transformers ``bitnet`` (offline): uint8 2-bit ternary weights packed along the output
    dim, a per-tensor ``weight_scale`` whose convention follows ``linear_class``."""

    name = "bitnet"
    summary = "transformers BitNet b1.58 (quant_method bitnet): 2-bit packed ternary, CPU/GPU"

    def check(self, cfg: QuantConfig) -> None:
        check_ternary_config(cfg)
        if cfg.linear_class not in LINEAR_CLASSES:
            raise ConfigError(
                f"--linear-class must be one of {', '.join(LINEAR_CLASSES)} (got {cfg.linear_class!r})"
            )
        if not cfg.rms_norm_eps > 0:
            raise ConfigError(f"--rms-norm-eps must be positive (got {cfg.rms_norm_eps})")

    def plan(
        self, module: str, shape, dtype: torch.dtype, cfg: QuantConfig, *, rms_norm: bool = True
    ) -> list[TensorSpec]:
        """Specs of one Linear; ``rms_norm=False`` when the checkpoint brings its own."""
        out_f, in_f = shape
        if out_f % VALUES_PER_BYTE:
            raise ConfigError(
                f"{module}: out_features {out_f} is not divisible by 4, which the bitnet format "
                f"packs along; --ignore it"
            )
        specs = [
            TensorSpec(f"{module}.weight", torch.uint8, (out_f // VALUES_PER_BYTE, in_f)),
            TensorSpec(f"{module}.weight_scale", dtype, (1,)),
        ]
        if cfg.use_rms_norm and rms_norm:
            specs.append(TensorSpec(f"{module}.rms_norm.weight", dtype, (in_f,)))
        return specs

    def encode(
        self, module: str, qw: QuantizedWeight, dtype: torch.dtype, cfg: QuantConfig,
        *, rms_norm: bool = True,
    ) -> dict[str, torch.Tensor]:  # fmt: skip
        """The stored tensors of one ternary Linear (``qw`` from :func:`ternary_quantize`)."""
        out = {
            f"{module}.weight": pack_ternary(qw.q),
            f"{module}.weight_scale": stored_scale(qw.scale, cfg.linear_class, dtype),
        }
        if cfg.use_rms_norm and rms_norm:
            out[f"{module}.rms_norm.weight"] = torch.ones(qw.q.shape[1], dtype=dtype)
        return out

    def encode_bias(
        self, bias: torch.Tensor, weight_scale: torch.Tensor, cfg: QuantConfig
    ) -> torch.Tensor:
        """The stored bias: AutoBitLinear scales it with the output, so it keeps ``b / γ``."""
        if cfg.linear_class == "bitlinear":
            return bias
        return (bias.float() / weight_scale.float()).to(bias.dtype)

    def quantization_config(self, cfg: QuantConfig, ignored: list[str]) -> dict:
        return {
            "quant_method": "bitnet",
            "linear_class": cfg.linear_class,
            "quantization_mode": "offline",
            "modules_to_not_convert": ignored,
            "use_rms_norm": cfg.use_rms_norm,
            "rms_norm_eps": cfg.rms_norm_eps,
        }


def quantize_bitnet_checkpoint(
    path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    cfg: QuantConfig,
    *,
    force: bool = False,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    progress: bool = True,
    provenance: dict | None = None,
):
    """Ternary-quantize the Linears of ``path`` (but lm_head and ``cfg.ignore``) into the
    ``bitnet`` format at ``out``, one tensor at a time (biases need their weight's ``γ``)."""
    from weightsmith.compress.quantize import QuantizeResult, select_linears

    cfg.validate()
    fmt = BitNetFormat()
    start = time.perf_counter()
    with open_checkpoint(path) as ckpt:
        if ckpt.config is None:
            raise CheckpointError(f"{ckpt.root}: no config.json; quantization needs it")
        targets, ignored = select_linears(ckpt, build_skeleton(ckpt), replace(cfg, group_size=-1))
        by_tensor = {t.tensor: t for t in targets}
        biases = {f"{t.module}.bias": t for t in targets if f"{t.module}.bias" in ckpt.tensors}
        own_norms = {f"{t.module}.rms_norm.weight" for t in targets} & set(ckpt.tensors)
        if own_norms and not cfg.use_rms_norm:
            raise ConfigError(
                f"{sorted(own_norms)[0]}: the checkpoint has BitLinear RMSNorm weights; "
                "pass --use-rms-norm"
            )

        def plan(group: TensorGroup) -> list[TensorSpec]:
            specs = []
            for n in group.names:
                t, info = by_tensor.get(n), ckpt.info(n)
                specs += (
                    fmt.plan(t.module, t.shape, info.torch_dtype, cfg,
                             rms_norm=f"{t.module}.rms_norm.weight" not in own_norms)
                    if t
                    else [TensorSpec(n, info.torch_dtype, info.shape)]
                )  # fmt: skip
            return specs

        zeros = [0]

        def apply(group: TensorGroup):
            for n in group.names:
                t = by_tensor.get(n)
                if t is not None:
                    qw = ternary_quantize(ckpt.get_tensor(n))
                    zeros[0] += int((qw.q == 0).sum())
                    yield from fmt.encode(
                        t.module, qw, ckpt.info(n).torch_dtype, cfg,
                        rms_norm=f"{t.module}.rms_norm.weight" not in own_norms,
                    ).items()  # fmt: skip
                elif n in biases and cfg.linear_class != "bitlinear":
                    w = biases[n].tensor  # AutoBitLinear: the bias needs its weight's γ
                    gamma = absmean_ternary(ckpt.get_tensor(w))[1]
                    scale = stored_scale(gamma, cfg.linear_class, ckpt.info(w).torch_dtype)
                    yield n, fmt.encode_bias(ckpt.get_tensor(n), scale, cfg)
                else:
                    yield n, RawTensor.of(ckpt, n)

        qcfg = fmt.quantization_config(cfg, ignored)

        def patch(config: dict) -> dict:
            config["quantization_config"] = qcfg
            return config

        result = stream_transform(
            ckpt.groups("tensor"),
            out,
            plan=plan,
            apply=apply,
            sources=[ckpt],
            support_from=ckpt.root,
            config_patch=patch,
            max_shard_size=max_shard_size,
            force=force,
            provenance={
                "operation": "quantize",
                "config": asdict(cfg),
                "calibration": {},
                **(provenance or {}),
            },
            progress=progress,
            description="quantize ternary",
        )
    quantized = sum(t.shape[0] * t.shape[1] for t in targets)
    total = ckpt.num_params
    r = QuantizeResult(**result.__dict__)
    r.wall_s = round(time.perf_counter() - start, 3)
    r.extra = {
        "method": "ternary",
        "format": "bitnet",
        "bits": 1.58,  # log2(3); stored as 2 bits
        "group_size": -1,  # one scale per tensor
        "symmetric": True,
        "linear_class": cfg.linear_class,
        "use_rms_norm": cfg.use_rms_norm,
        "input_size": ckpt.total_bytes,
        "output_size": result.total_size,
        "quantized_linears": len(targets),
        "kept_linears": ignored,
        "params": total,
        "quantized_params": quantized,
        "fraction_quantized": quantized / total if total else 0.0,
        "ternary_zero_fraction": zeros[0] / quantized,
        "calibration": None,
        "rtn_fallbacks": [],
        "gptq_loss": None,
    }
    return r
