"""``compress quantize``: quantize a checkpoint's Linears, streaming, into a loadable format.

One path for every registered method and format. Data-free methods stream one tensor at a
time. Calibrated methods stream one decoder layer at a time through
:class:`~weightsmith.core.calibration.LayerStreamer`, which computes the statistic the method
declares: inside a layer the Linears are quantized true-sequentially (q/k/v, then o with the
quantized q/k/v's outputs, then gate/up, then down), and the quantized layer's outputs feed the
next layer. Every tensor read is checked finite; the format turns each quantized weight (and
any tensor that depends on it, e.g. a rescaled bias) into its stored tensors.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields, is_dataclass, replace
from typing import Any

import torch
from torch import nn

from weightsmith.compress import awq as _awq  # noqa: F401  (registers awq)
from weightsmith.compress import bitnet_format as _bitnet  # noqa: F401  (registers bitnet)
from weightsmith.compress import formats as _formats  # noqa: F401  (registers formats)
from weightsmith.compress import fp4 as _fp4  # noqa: F401  (registers nvfp4 / mxfp4)
from weightsmith.compress import fp8 as _fp8  # noqa: F401  (registers fp8)
from weightsmith.compress import gptq as _gptq  # noqa: F401  (registers gptq)
from weightsmith.compress import mse as _mse  # noqa: F401  (registers mse)
from weightsmith.compress import nf4 as _nf4  # noqa: F401  (registers nf4 / bnb)
from weightsmith.compress import rtn as _rtn  # noqa: F401  (registers rtn)
from weightsmith.compress import scaled_formats as _scaled  # noqa: F401  (float/int-quantized)
from weightsmith.compress import ternary as _ternary  # noqa: F401  (registers ternary)
from weightsmith.compress import w8a8 as _w8a8  # noqa: F401  (registers w8a8)
from weightsmith.compress.calibrated import CalibratedRun
from weightsmith.compress.moe import keep_experts, kept_experts_note, moe_summary
from weightsmith.compress.moe_fused import native_fused_format, quantize_fused_mxfp4
from weightsmith.compress.registry import (
    FORMATS,
    METHODS,
    GridConfig,
    LinearTarget,
    QuantConfig,
)
from weightsmith.compress.schemes import Scheme, match_scheme, scheme_summary
from weightsmith.core.device import select_device
from weightsmith.core.experts import fused_expert_tensors, refuse_fused_experts
from weightsmith.core.experts_fused import natively_fused
from weightsmith.core.skeleton import build_skeleton, module_path
from weightsmith.core.streaming import RawTensor, StreamResult
from weightsmith.core.targets import described_linears, ignore_matches
from weightsmith.core.transform import (
    WriteOptions,
    all_finite,
    checked_copy,
    require_finite,
    rewrite_checkpoint,
)
from weightsmith.errors import CheckpointError, ConfigError
from weightsmith.io.architectures import require_described
from weightsmith.io.reader import Checkpoint, TensorGroup, open_checkpoint
from weightsmith.io.writer import DEFAULT_MAX_SHARD_SIZE, TensorSpec
from weightsmith.kernels.quant import Scratch, count_nonfinite

__all__ = ["LinearTarget", "QuantizeResult", "quantize_checkpoint", "select_linears"]


@dataclass
class QuantizeResult(StreamResult):
    """A :class:`StreamResult` plus what was quantized."""


def select_linears(
    ckpt: Checkpoint, model: nn.Module | list[str], cfg: QuantConfig
) -> tuple[list[LinearTarget], list[str]]:
    """Which Linears are quantized (each with its scheme-map scheme, if any), and the (model)
    names of every other Linear. ``model``: the transformers skeleton, or the Linear module
    paths :func:`~weightsmith.core.targets.described_linears` read from the checkpoint."""
    if ckpt.arch.linear_layout == "in_out":
        raise ConfigError(
            f"{ckpt.root}: {ckpt.arch.name} stores its projections as Conv1D, which the "
            "quantized formats (compressed-tensors, gptq) do not load as Linear"
        )
    renames, arch = ckpt.arch.module_renames, ckpt.arch
    listed = isinstance(model, list)
    by_model_path = {  # a multimodal model's vision tower and projector are never quantized
        n[: -len(".weight")] if listed else module_path(model, n[: -len(".weight")], renames): n
        for n in ckpt.tensors
        if n.endswith(".weight") and arch.in_text_decoder(n)
    }
    if not listed:
        model = [n for n, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    targets, ignored, used, used_schemes = [], [], set(), set()
    for name in model:
        tensor = by_model_path.get(name)
        hit = [p for p in cfg.ignore if ignore_matches(name, p)]
        used.update(hit)
        head = ckpt.arch.lm_head and name == ckpt.arch.lm_head[: -len(".weight")]
        if tensor is None or hit or head or name == "lm_head":
            ignored.append(name)
            continue
        used_schemes.update(p for p, _ in cfg.schemes if ignore_matches(name, p))
        chosen = match_scheme(name, cfg.schemes)
        if chosen is not None and chosen[1] is None:  # keep
            ignored.append(name)
            continue
        targets.append(_target(ckpt, cfg, name, tensor, chosen))
    unused = [p for p in cfg.ignore if p not in used]
    if unused:
        raise ConfigError(f"--ignore {unused[0]!r} matches no Linear of {ckpt.root}")
    unused = [p for p, _ in cfg.schemes if p not in used_schemes]
    if unused:
        raise ConfigError(f"--scheme-map {unused[0]!r} matches no quantized Linear of {ckpt.root}")
    if not targets:
        raise ConfigError(f"{ckpt.root}: no Linear left to quantize")
    return targets, ignored


def _target(
    ckpt: Checkpoint, cfg: QuantConfig, name: str, tensor: str, chosen: tuple | None
) -> LinearTarget:
    """The :class:`LinearTarget` of Linear ``name``, its shape checked against its group size
    (``chosen``: the scheme-map ``(pattern, scheme)`` that decides its grid, or None)."""
    info = ckpt.info(tensor)
    if len(info.shape) != 2 or not info.torch_dtype.is_floating_point:
        raise CheckpointError(
            f"{tensor}: expected a 2-D float weight, got {info.dtype} {list(info.shape)}"
        )
    out_f, in_f = info.shape
    scheme = chosen[1] if chosen is not None else None
    group_size = scheme.group_size if scheme else getattr(cfg.options, "group_size", -1)
    if group_size != -1 and in_f % group_size:
        by = f"the group size {group_size} of --scheme-map {chosen[0]}={scheme}" if scheme \
            else f"--group-size {group_size}"  # fmt: skip
        raise ConfigError(
            f"{name}: in_features {in_f} is not divisible by {by}; use a group size that "
            f"divides it, -1 (per channel), or --ignore {name}"
        )
    module = tensor[: -len(".weight")]
    siblings = frozenset(n[len(module) + 1 :] for n in ckpt.tensors if n.startswith(f"{module}."))
    return LinearTarget(tensor, module, name, ckpt.arch.layer_of(tensor), (out_f, in_f),
                        info.torch_dtype, siblings - {"weight"}, scheme)  # fmt: skip


class QuantizeJob:
    """One quantize run over an open checkpoint: plans and applies each tensor group."""

    def __init__(self, ckpt: Checkpoint, cfg: QuantConfig, device: str) -> None:
        if ckpt.config is None:
            raise CheckpointError(f"{ckpt.root}: no config.json; quantization needs it")
        self.ckpt, self.cfg = ckpt, cfg
        self.method, self.fmt = METHODS[cfg.method], FORMATS[cfg.format]
        self.statistic = self.method.statistic_for(cfg.options)
        self.skeleton: nn.Module | None = None  # built once, shared with the calibration
        targets, self.ignored = select_linears(ckpt, self._linears(), cfg)
        # MoE experts the format cannot hold (bnb), or fused 3-D experts (not Linear
        # modules): kept as stored, listed in the report
        self.targets, self.kept_experts = keep_experts(ckpt, cfg, targets)
        fused = fused_expert_tensors(ckpt)
        self.kept_experts += fused
        self.note = (
            kept_experts_note(ckpt, cfg, self.kept_experts, bool(fused))
            if self.kept_experts
            else None
        )
        self.by_tensor = {t.tensor: t for t in self.targets}
        self._cfgs: dict[Scheme, QuantConfig] = {}
        self.rewritten = {n: t for t in self.targets for n in self.fmt.rewrites(t, self.cfg_for(t))}
        self.dtype = self.targets[0].dtype
        self.quant_args = {
            "dtype": self.fmt.scale_dtype or self.dtype,
            "zero_min": self.fmt.zero_min(cfg.options),
        }
        self.stats: dict[str, Any] = {"fallbacks": [], "loss": {}, "zeros": None}
        # module -> (quantized weight, the tensors still to write from it)
        self._pending: dict[str, tuple[Any, set[str]]] = {}
        self._weight_stats: dict[str, Any] | None = None
        self.calibrated = CalibratedRun(self, device) if self.statistic is not None else None
        # data-free methods that take it: work buffers reused from Linear to Linear
        self.scratch = Scratch() if self.method.scratch and self.calibrated is None else None

    def _linears(self) -> nn.Module | list[str]:
        """The model's Linears: read from the checkpoint's description for a data-free run
        whose output does not depend on their order (no --ignore, no --scheme-map: the
        ignored list is then only the lm_head), which spares importing transformers and
        building its model; else the transformers skeleton."""
        cfg = self.cfg
        if self.statistic is None and not cfg.ignore and not cfg.schemes:
            listed = described_linears(self.ckpt)
            if listed is not None:
                return listed
        self.skeleton = build_skeleton(self.ckpt)
        return self.skeleton

    @property
    def groups(self) -> list[TensorGroup]:
        return self.ckpt.groups("layer" if self.calibrated else "tensor")

    def plan(self, group: TensorGroup) -> list[TensorSpec]:
        specs = []
        for n in group.names:
            t, info = self.by_tensor.get(n), self.ckpt.info(n)
            specs += (
                self.fmt.plan(t, self.cfg_for(t))
                if t
                else [TensorSpec(n, info.torch_dtype, info.shape)]
            )
        return specs

    def apply(self, group: TensorGroup) -> Iterator[tuple[str, Any]]:
        done: dict[str, list] = {}  # tensor -> its stored tensors, from the calibrated layer step
        if self.calibrated is not None and group.layer is not None:
            done = self.calibrated.run_layer(group.layer)
        for n in group.names:
            t = self.by_tensor.get(n)
            if n in done:
                yield from done.pop(n)
            elif t is not None:
                yield from self.encode(t, self.quantized(t))
            elif n in self.rewritten:
                t = self.rewritten[n]
                yield n, self.fmt.rewrite(n, self.read(n), t, self.quantized(t, n), self.cfg_for(t))
            else:
                yield self._copy(n)  # as stored, checked finite

    def _copy(self, name: str) -> tuple[str, Any]:
        """Tensor ``name`` as stored: when the native check can take it (bfloat16/float32,
        streamed runs), checked in place through a memory map and copied in the kernel, as
        ``convert`` copies; else read in chunks, each checked on the way."""
        if self.scratch is None or self.ckpt.raw_location(name) is None:
            return checked_copy(self.ckpt, name)
        with self.ckpt.mapped_flat(name) as flat:
            checked = self._checked(flat, name)
        return (name, RawTensor.of(self.ckpt, name)) if checked else checked_copy(self.ckpt, name)

    def _checked(self, flat: torch.Tensor, name: str) -> bool:
        """True when the native check found no NaN/Inf in tensor ``name``'s ``flat`` values,
        False when it cannot take them; a CheckpointError when it found some."""
        bad = count_nonfinite(flat)
        if bad:
            raise CheckpointError(f"{self.ckpt.path}: tensor {name!r} holds NaN or Inf values")
        return bad is not None

    def read(self, name: str) -> torch.Tensor:
        return require_finite(self.ckpt.get_tensor(name), str(self.ckpt.path), name)

    def cfg_for(self, t: LinearTarget | None) -> QuantConfig:
        """The run's config for Linear ``t``: its own scheme's grid when the scheme map gave
        it one (None, or no scheme: the run's config)."""
        if t is None or t.scheme is None:
            return self.cfg
        if t.scheme not in self._cfgs:
            self._cfgs[t.scheme] = self.cfg.with_scheme(t.scheme)
        return self._cfgs[t.scheme]

    def quant_args_for(self, t: LinearTarget | None) -> dict[str, Any]:
        """``dtype``/``zero_min`` for the method's function on Linear ``t``."""
        if t is None or t.scheme is None:
            return self.quant_args
        return {**self.quant_args, "zero_min": self.fmt.zero_min(self.cfg_for(t).options)}

    def quantize(
        self, w: torch.Tensor, stat: Any = None, target: LinearTarget | None = None
    ) -> Any:
        """The method's own function on one weight (``w`` as stored, or the compute dtype) with
        the grid of Linear ``target`` (None: the run's)."""
        opts = self.cfg_for(target).options
        return self.method.fn(w, opts, stat, **self.quant_args_for(target))

    def quantized(self, t: LinearTarget, use: str | None = None) -> Any:
        """Linear ``t``'s quantized weight, kept until it and its rewritten tensors are out."""
        if t.module not in self._pending:
            qw = self._streamed(t)
            if qw is None:
                qw = self.quantize(self.read(t.tensor), self.weight_stat(t), t)
            self._pending[t.module] = (qw, {t.tensor, *self.fmt.rewrites(t, self.cfg_for(t))})
        qw, waiting = self._pending[t.module]
        waiting.discard(use or t.tensor)
        if not waiting:
            del self._pending[t.module]
        return qw

    def _streamed(self, t: LinearTarget) -> Any:
        """Linear ``t`` quantized from its memory-mapped bytes into the job's scratch buffers
        (no copy of the weight, nothing allocated per tensor), or None where that does not
        apply: the method takes no scratch, computes weight statistics, or its quantized
        weight must outlive the next Linear's (a rewritten sibling still waits for it)."""
        if (
            self.scratch is None
            or self.weight_stat(t) is not None
            or self.fmt.rewrites(t, self.cfg_for(t))
        ):
            return None
        with self.ckpt.mapped_flat(t.tensor) as flat:
            if not self._checked(flat, t.tensor):  # no kernel for this dtype: read it
                return None
            opts = self.cfg_for(t).options
            args = self.quant_args_for(t)
            return self.method.fn(flat.view(t.shape), opts, None, **args, scratch=self.scratch)

    def weight_stat(self, t: LinearTarget) -> Any:
        """What a data-free method's options compute from the weights first, for ``t`` (NVFP4:
        max|W| of its fused set), by ``weight_stats(job)``; None when they compute nothing."""
        prepare = getattr(self.cfg.options, "weight_stats", None)
        if prepare is None:
            return None
        if self._weight_stats is None:
            self._weight_stats = prepare(self)
        return self._weight_stats.get(t.module)

    def encode(self, t: LinearTarget, qw: Any) -> Iterator[tuple[str, torch.Tensor]]:
        qw = on_host(qw)  # quantized on a CUDA device: packed and written on the host
        if "zeros" in qw.info:
            self.stats["zeros"] = (self.stats["zeros"] or 0) + qw.info["zeros"]
        if "loss" in qw.info:
            self.stats["loss"][t.module] = qw.info["loss"]
        for name, v in self.fmt.encode(t, qw, self.cfg_for(t)).items():
            bad = count_nonfinite(v) if v.is_floating_point() else 0  # native: bf16/f32
            if bad or (bad is None and not all_finite(v)):  # float8 too
                raise ConfigError(f"{name}: quantizing {t.tensor} gives non-finite values "
                                  f"(overflows {v.dtype})")  # fmt: skip
            if self.scratch is not None and self.scratch.owns(v):
                v = v.clone()  # written behind: must not change when the buffer is reused
            yield name, v

    def patch(self, config: dict) -> dict:
        per_module = {"targets": self.targets} if self.cfg.schemes else {}
        config["quantization_config"] = self.fmt.quantization_config(
            self.cfg, self.ignored, self.dtype, **per_module
        )
        return config


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
    device = str(select_device(device))  # auto -> cuda/cpu; unknown or absent: refused now
    start = time.perf_counter()
    with open_checkpoint(path) as ckpt:
        require_described(ckpt.arch, f"{ckpt.root}: quantize")
        fused = natively_fused(ckpt.arch.experts)  # else: fused experts kept, reported
        if fused and native_fused_format(ckpt, cfg):  # gpt-oss's own MXFP4 experts
            record = {"operation": "quantize", "config": cfg.record(), **(provenance or {})}
            result, extra = quantize_fused_mxfp4(ckpt, out, cfg, force=force, progress=progress,
                                                 max_shard_size=max_shard_size, provenance=record)  # fmt: skip
            r = QuantizeResult(**result.__dict__)
            r.wall_s, r.extra = round(time.perf_counter() - start, 3), extra
            return r
        if not fused:
            refuse_fused_experts(ckpt, f"{ckpt.root}: quantize")
        job = QuantizeJob(ckpt, cfg, device)  # reads and tokenizes calibration text: no output yet
        calib = job.calibrated.info if job.calibrated else {}
        record = {"operation": "quantize", "config": cfg.record(), "calibration": calib}
        result = rewrite_checkpoint(
            ckpt,
            job.groups,
            out,
            plan=job.plan if job.fmt.planned else None,
            apply=job.apply,
            options=WriteOptions(max_shard_size, force, progress),
            description=f"quantize {cfg.method}",
            provenance={**record, **(provenance or {})},
            config_patch=job.patch,
        )
    r = QuantizeResult(**result.__dict__)
    r.wall_s = round(time.perf_counter() - start, 3)
    r.extra = _summary(job, ckpt, result, calib)
    return r


def _summary(job: QuantizeJob, ckpt: Checkpoint, result: StreamResult, calib: dict) -> dict:
    cfg, total = job.cfg, ckpt.num_params
    quantized = sum(t.shape[0] * t.shape[1] for t in job.targets)
    fo = job.cfg.format_options
    zeros = job.stats["zeros"]
    return {
        "method": cfg.method,
        "format": cfg.format,
        **cfg.options.describe(),  # bits, group_size, symmetric
        **({k: v for k, v in asdict(fo).items() if k != "version"} if fo is not None else {}),
        "input_size": ckpt.total_bytes,
        "output_size": result.total_size,
        "quantized_linears": len(job.targets),
        "kept_linears": job.ignored,
        **({"kept_experts": job.kept_experts, "notes": [job.note]} if job.note else {}),
        "params": total,
        "quantized_params": quantized,
        "fraction_quantized": quantized / total if total else 0.0,
        "zero_fraction": None if zeros is None else zeros / quantized,  # levels that are 0
        "calibration": calib or None,
        "rtn_fallbacks": job.stats["fallbacks"],
        **moe_summary(job.stats, "rtn"),
        "loss": job.stats["loss"] or None,
        **_schemes_summary(job),
    }


def _schemes_summary(job: QuantizeJob) -> dict:
    """The report's per-scheme counts and average bits per weight (integer-grid methods)."""
    o = job.cfg.options
    if not isinstance(o, GridConfig):
        return {}
    return {"schemes": scheme_summary(job.targets, Scheme.of(o), modules=bool(job.cfg.schemes))}


def on_host(qw: Any) -> Any:
    """A quantized weight (a dataclass of tensors and settings) with its tensors on the CPU;
    ``qw`` itself when they already are."""
    if not is_dataclass(qw):
        return qw
    moved = {
        f.name: v.cpu()
        for f in fields(qw)
        if isinstance(v := getattr(qw, f.name), torch.Tensor) and v.device.type != "cpu"
    }
    return replace(qw, **moved) if moved else qw
