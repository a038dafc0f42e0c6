"""``compress quantize``: quantize a checkpoint's Linears, streaming, into a loadable format.

RTN streams one tensor at a time. Calibration methods (GPTQ) stream one decoder layer at a time
through :class:`~weightsmith.core.calibration.LayerStreamer`: inside a layer the Linears are
quantized true-sequentially (q/k/v, then o with the quantized q/k/v's outputs, then gate/up,
then down), and the quantized layer's outputs feed the next layer.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn

from weightsmith.compress import bitnet_format as _bitnet  # noqa: F401  (registers ternary / bitnet)
from weightsmith.compress import formats as _formats  # noqa: F401  (registers formats)
from weightsmith.compress import gptq as _gptq  # noqa: F401  (registers gptq)
from weightsmith.compress import nf4 as _nf4  # noqa: F401  (registers nf4 / bnb)
from weightsmith.compress import rtn as _rtn  # noqa: F401  (registers rtn)
from weightsmith.compress.gptq import HessianNotPositiveDefinite, HessianStat, gptq_quantize
from weightsmith.compress.registry import FORMATS, METHODS, QuantConfig, QuantizedWeight
from weightsmith.compress.rtn import rtn_quantize
from weightsmith.core.calibration import (
    CalibrationLayer,
    LayerStreamer,
    build_skeleton,
    load_calibration_text,
    load_tokenizer,
    module_path,
    tokenize_windows,
)
from weightsmith.core.memory import release_freed_memory
from weightsmith.core.streaming import RawTensor, StreamResult, stream_transform
from weightsmith.core.targets import ignore_matches
from weightsmith.errors import CheckpointError, ConfigError
from weightsmith.io.reader import Checkpoint, TensorGroup, open_checkpoint
from weightsmith.io.writer import DEFAULT_MAX_SHARD_SIZE, TensorSpec


@dataclass
class QuantizeResult(StreamResult):
    """A :class:`StreamResult` plus what was quantized."""


@dataclass(frozen=True)
class LinearTarget:
    tensor: str  # checkpoint name of the weight, e.g. "model.layers.0.mlp.up_proj.weight"
    module: str  # checkpoint module name (tensor minus ".weight")
    model_module: str  # transformers module name (for config "ignore")
    layer: int | None
    shape: tuple[int, int]  # (out, in)


def select_linears(
    ckpt: Checkpoint, model: nn.Module, cfg: QuantConfig
) -> tuple[list[LinearTarget], list[str]]:
    """Which Linears are quantized, and the (model) names of every other Linear."""
    if ckpt.arch.linear_layout == "in_out":
        raise ConfigError(
            f"{ckpt.root}: {ckpt.arch.name} stores its projections as Conv1D, which the "
            "quantized formats (compressed-tensors, gptq) do not load as Linear"
        )
    by_model_path = {
        module_path(model, n[: -len(".weight")]): n for n in ckpt.tensors if n.endswith(".weight")
    }
    targets, ignored = [], []
    used_patterns: set[str] = set()
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        tensor = by_model_path.get(name)
        hit = [p for p in cfg.ignore if ignore_matches(name, p)]
        used_patterns.update(hit)
        head = ckpt.arch.lm_head and name == ckpt.arch.lm_head[: -len(".weight")]
        if tensor is None or hit or head or name == "lm_head":
            ignored.append(name)
            continue
        info = ckpt.info(tensor)
        if len(info.shape) != 2 or not info.torch_dtype.is_floating_point:
            raise CheckpointError(
                f"{tensor}: expected a 2-D float weight, got {info.dtype} {list(info.shape)}"
            )
        out_f, in_f = info.shape
        if cfg.group_size != -1 and in_f % cfg.group_size:
            raise ConfigError(
                f"{name}: in_features {in_f} is not divisible by --group-size {cfg.group_size}; "
                f"use a group size that divides it, --group-size -1 (per channel), or "
                f"--ignore {name}"
            )
        targets.append(
            LinearTarget(
                tensor, tensor[: -len(".weight")], name, ckpt.arch.layer_of(tensor), (out_f, in_f)
            )
        )
    unused = [p for p in cfg.ignore if p not in used_patterns]
    if unused:
        raise ConfigError(f"--ignore {unused[0]!r} matches no Linear of {ckpt.root}")
    if not targets:
        raise ConfigError(f"{ckpt.root}: no Linear left to quantize")
    return targets, ignored


def quantize_checkpoint(
    path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    cfg: QuantConfig,
    *,
    force: bool = False,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    device: str = "cpu",
    progress: bool = True,
    provenance: dict | None = None,
) -> QuantizeResult:
    """Quantize the Linears of the checkpoint at ``path`` into ``out`` (see module docstring).

    ``provenance`` adds fields to the output's ``weightsmith.json`` (e.g. how QAT trained it)."""
    cfg.validate()
    if cfg.method == "nf4":
        from weightsmith.compress.nf4 import quantize_nf4_checkpoint

        return quantize_nf4_checkpoint(path, out, cfg, force=force, progress=progress)
    if cfg.method == "ternary":
        from weightsmith.compress.bitnet_format import quantize_bitnet_checkpoint

        return quantize_bitnet_checkpoint(
            path, out, cfg, force=force, max_shard_size=max_shard_size, progress=progress,
            provenance=provenance,
        )  # fmt: skip
    method = METHODS[cfg.method]
    fmt = FORMATS[cfg.format]
    with open_checkpoint(path) as ckpt:
        if ckpt.config is None:
            raise CheckpointError(f"{ckpt.root}: no config.json; quantization needs it")
        model = build_skeleton(ckpt)
        targets, ignored = select_linears(ckpt, model, cfg)
        del model
        by_tensor = {t.tensor: t for t in targets}
        if method.needs_calibration:
            outside = [t.tensor for t in targets if t.layer is None]
            if outside:
                raise ConfigError(
                    f"{outside[0]}: {cfg.method} quantizes decoder-layer Linears only; --ignore it"
                )
        model_dtype = _model_dtype(ckpt, targets)
        scale_dtype = getattr(fmt, "scale_dtype", None) or model_dtype

        def plan(group: TensorGroup) -> list[TensorSpec]:
            specs = []
            for n in group.names:
                t = by_tensor.get(n)
                info = ckpt.info(n)
                specs += (
                    fmt.plan(t.module, t.shape, info.torch_dtype, cfg)
                    if t
                    else [TensorSpec(n, info.torch_dtype, info.shape)]
                )
            return specs

        def passthrough(n: str):
            return n, RawTensor.of(ckpt, n)

        stats: dict[str, Any] = {"fallbacks": [], "loss": {}}
        calib_info: dict[str, Any] = {}

        def encode(t: LinearTarget, qw: QuantizedWeight):
            yield from fmt.encode(t.module, qw, ckpt.info(t.tensor).torch_dtype).items()

        if not method.needs_calibration:

            def apply(group: TensorGroup):
                for n in group.names:
                    t = by_tensor.get(n)
                    if t is None:
                        yield passthrough(n)
                        continue
                    qw = rtn_quantize(ckpt.get_tensor(n).float(), cfg, dtype=scale_dtype)
                    yield from encode(t, qw)

            groups = ckpt.groups("tensor")
        else:
            # Read and tokenize the calibration text before any output exists.
            text = load_calibration_text(cfg.calib)
            ids = tokenize_windows(
                load_tokenizer(ckpt.root), text.text, samples=cfg.calib_samples, seq_len=cfg.seq_len
            )
            calib_info.update(
                source=text.source, samples=ids.shape[0], seq_len=ids.shape[1], tokens=ids.numel()
            )
            state: dict[str, LayerStreamer] = {}

            def streamer() -> LayerStreamer:
                if "s" not in state:  # embeds the tokens: the first layer group starts it
                    state["s"] = LayerStreamer(ckpt, ids, device=device)
                return state["s"]

            def apply(group: TensorGroup):
                if group.layer is None:
                    for n in group.names:
                        yield passthrough(n)
                    return
                results = streamer().run_layer(
                    group.layer,
                    lambda cl: _calibrated_layer(cl, cfg, by_tensor, scale_dtype, stats, encode),
                )
                for n in group.names:
                    t = by_tensor.get(n)
                    yield from results.pop(t.module) if t else [passthrough(n)]

            groups = ckpt.groups("layer")

        qcfg = fmt.quantization_config(cfg, ignored)

        def patch(config: dict) -> dict:
            config["quantization_config"] = qcfg
            return config

        total = ckpt.num_params
        quantized = sum(t.shape[0] * t.shape[1] for t in targets)
        record = {"operation": "quantize", "config": asdict(cfg), "calibration": calib_info}
        record.update(provenance or {})
        result = stream_transform(
            groups,
            out,
            plan=plan,
            apply=apply,
            sources=[ckpt],
            support_from=ckpt.root,
            config_patch=patch,
            max_shard_size=max_shard_size,
            force=force,
            provenance=record,
            progress=progress,
            description=f"quantize {cfg.method}",
        )
    r = QuantizeResult(**{k: v for k, v in result.__dict__.items()})
    r.extra = {
        "method": cfg.method,
        "format": cfg.format,
        "bits": cfg.bits,
        "group_size": cfg.group_size,
        "symmetric": cfg.symmetric,
        "input_size": ckpt.total_bytes,
        "output_size": result.total_size,
        "quantized_linears": len(targets),
        "kept_linears": ignored,
        "params": total,
        "quantized_params": quantized,
        "fraction_quantized": quantized / total if total else 0.0,
        "calibration": calib_info or None,
        "rtn_fallbacks": stats["fallbacks"],
        "gptq_loss": stats["loss"] or None,
    }
    return r


def _model_dtype(ckpt: Checkpoint, targets: list[LinearTarget]) -> torch.dtype:
    return ckpt.info(targets[0].tensor).torch_dtype


def _calibrated_layer(
    cl: CalibrationLayer,
    cfg: QuantConfig,
    by_tensor: dict[str, LinearTarget],
    scale_dtype: torch.dtype,
    stats: dict,
    encode: Callable[[LinearTarget, QuantizedWeight], Iterable[tuple[str, torch.Tensor]]],
) -> dict[str, list[tuple[str, torch.Tensor]]]:
    """GPTQ every target Linear of one layer, true-sequentially; returns module -> its encoded
    output tensors. Memory: each Hessian is freed as soon as its Linear is quantized, and only
    the encoded (packed) tensors are kept until the layer is written."""
    method = METHODS[cfg.method]
    extra = {"overwrite_hessian": True} if method.fn is gptq_quantize else {}
    done: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for group in cl.sequential_groups:
        names = [n for n in group if cl.tensor_name(n) in by_tensor]
        if not names:
            continue
        hs = cl.collect(names, lambda n, m: HessianStat(by_tensor[cl.tensor_name(n)].shape[1]))
        if any(hs[n].n == 0 for n in names):
            raise ConfigError(f"layer {cl.index}: {names[0]} never ran during calibration")
        for n in names:
            target = by_tensor[cl.tensor_name(n)]
            w = cl.weight(n)
            h = hs.pop(n).take_hessian()
            try:
                qw = method.fn(w, cfg, h, dtype=scale_dtype, **extra)
            except HessianNotPositiveDefinite as e:
                if not cfg.allow_rtn_fallback:
                    raise ConfigError(
                        f"{target.module}: {e}; raise --damp, use more calibration data, or "
                        "pass --allow-rtn-fallback"
                    ) from None
                qw = rtn_quantize(w, replace(cfg, method="rtn"), dtype=scale_dtype)
                stats["fallbacks"].append(target.module)
            del h
            stats["loss"][target.module] = qw.info.get("loss")
            cl.set_weight(n, qw.dequantize().to(w.device))
            del w
            done[target.module] = list(encode(target, qw))
            del qw
            release_freed_memory()
    return done
