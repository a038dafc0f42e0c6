"""The calibrated part of the quantize path: one decoder layer at a time, the statistic the
method declares, Linears quantized true-sequentially (see :mod:`.quantize`)."""

from __future__ import annotations

from typing import Any

import torch

from weightsmith.compress.moe import ExpertRouting
from weightsmith.compress.registry import CalibrationFailed, LinearTarget
from weightsmith.compress.rtn import rtn_quantize
from weightsmith.core.calibration import (
    CalibrationLayer,
    LayerStreamer,
    calibration_dtype,
    calibration_windows,
)
from weightsmith.core.device import select_device
from weightsmith.core.experts import is_expert_linear
from weightsmith.core.memory import release_freed_memory
from weightsmith.core.transform import require_finite
from weightsmith.errors import ConfigError

# A Linear at least this big (float32 weight) hands its freed memory back to the OS as soon as
# it is quantized (its statistic and work buffers are as big or bigger); smaller ones wait for
# the end of the layer (each trim costs ~3 ms)
TRIM_BYTES = 16 << 20


class CalibratedRun:
    """Calibration tokens and the :class:`LayerStreamer` of one quantize run. The text is read
    and tokenized at construction, before any output exists; the streamer (which embeds the
    tokens) starts with the first layer."""

    def __init__(self, job: Any, device: str) -> None:  # job: quantize.QuantizeJob
        self.job = job
        outside = [t.tensor for t in job.targets if t.layer is None]
        if outside:
            raise ConfigError(
                f"{outside[0]}: {job.cfg.method} quantizes decoder-layer Linears only; --ignore it"
            )
        o = job.cfg.options
        self.ids, self.info = calibration_windows(
            job.ckpt.root, o.calib, o.calib_samples, o.seq_len
        )
        self.device = select_device(device) if isinstance(device, str) else device
        self.dtype = calibration_dtype(o.calib_dtype, job.ckpt, self.device)  # of the forwards
        self.info["dtype"] = str(self.dtype).removeprefix("torch.")
        self.streamer: LayerStreamer | None = None

    def run_layer(self, layer: int) -> dict[str, list[tuple[str, Any]]]:
        """Quantize layer ``layer``'s targets: tensor name -> its stored tensors."""
        if self.streamer is None:
            self.streamer = LayerStreamer(
                self.job.ckpt, self.ids, device=self.device, model=self.job.skeleton,
                compute_dtype=self.dtype,
            )  # fmt: skip
        step = getattr(self.job.cfg.options, "layer_step", None)  # a method's own (SmoothQuant)
        return self.streamer.run_layer(
            layer, (lambda cl: step(cl, self.job)) if step else self.quantize_layer
        )

    def quantize_layer(self, cl: CalibrationLayer) -> dict[str, list[tuple[str, Any]]]:
        """Every target Linear of one layer, group by group (true-sequential). Memory: each
        statistic is freed as soon as its Linear is quantized, and only the encoded (packed)
        tensors are kept until the layer is written."""
        job, done = self.job, {}
        for rel, t in cl.module.state_dict().items():  # before any statistic is computed
            if cl.prefix + rel in job.ckpt.tensors:
                require_finite(t, str(job.ckpt.path), cl.prefix + rel)
        o = job.cfg.options
        routing = ExpertRouting(
            cl, getattr(o, "min_expert_tokens", 32), getattr(o, "calibrate_all_experts", False)
        )
        routed = False  # whether an expert Linear was calibrated (its routing counted)
        for group in cl.sequential_groups:
            names = [n for n in group if cl.tensor_name(n) in job.by_tensor]
            if not names:
                continue
            routing.reset()
            stats = cl.collect(names, job.statistic)
            experts = any(is_expert_linear(job.ckpt.arch, n) for n in names)
            routed |= experts
            starved = routing.starved(names) if experts else set()  # too few tokens: RTN
            if any(stats[n].n == 0 for n in names if n not in starved):
                raise ConfigError(f"layer {cl.index}: {names[0]} never ran during calibration")
            for n in names:
                t = job.by_tensor[cl.tensor_name(n)]
                w = cl.weight(n)
                big = w.numel() * 4 >= TRIM_BYTES
                if n in starved:
                    job.stats.setdefault("expert_fallbacks", []).append(t.module)
                    stats.pop(n)
                    qw = rtn_quantize(w, job.cfg_for(t).options, **job.quant_args_for(t))
                else:
                    qw = self._quantize(t, w, stats.pop(n).result())
                cl.set_weight(n, qw.dequantize().to(w.device))
                del w
                done[t.tensor] = list(job.encode(t, qw))
                cfg = job.cfg_for(t)
                for r in job.fmt.rewrites(t, cfg):
                    done[r] = [(r, job.fmt.rewrite(r, job.read(r), t, qw, cfg))]
                del qw
                if big:  # small Linears: the layer's own trim (LayerStreamer) is enough
                    release_freed_memory()
        if routed:  # gpt-oss's fused experts are kept: no expert Linear, nothing counted
            routing.record_into(job.stats, [])
        return done

    def _quantize(self, t: LinearTarget, w: torch.Tensor, stat: Any) -> Any:
        job = self.job
        try:
            return job.quantize(w, stat, t)
        except CalibrationFailed as e:
            if not getattr(job.cfg.options, "allow_rtn_fallback", False):
                raise ConfigError(f"{t.module}: {e}; {e.hint}") from None
            job.stats["fallbacks"].append(t.module)
            return rtn_quantize(w, job.cfg_for(t).options, **job.quant_args_for(t))
