"""Mixture-of-experts support for ``compress quantize`` and Wanda: which formats can hold
quantized experts, per-expert calibration token counts, and the fallback of experts that saw
too few calibration tokens.

The model skeleton carries one Linear per expert under its checkpoint name
(:func:`weightsmith.core.experts.unfuse_model`), so expert Linears are targets like any other
Linear; routers are not Linear modules and are never targets.
"""

from __future__ import annotations

from typing import Any

from weightsmith.core.calibration import CalibrationLayer
from weightsmith.core.experts import expert_blocks
from weightsmith.core.experts_fused import routing_counters
from weightsmith.errors import ConfigError
from weightsmith.io.architectures import Architecture
from weightsmith.io.reader import Checkpoint

__all__ = [
    "EXPERT_FORMATS",
    "KEEP_EXPERT_FORMATS",
    "ExpertRouting",
    "drop_dense_layers",
    "keep_experts",
    "kept_experts_note",
    "moe_summary",
    "refuse_moe",
]

# Formats whose quantized per-expert Linears transformers loads back into its fused experts
# (compressed-tensors' MoE conversion).
EXPERT_FORMATS = ("compressed-tensors",)
# Formats that keep routed experts unquantized, as transformers itself does: bitsandbytes
# replaces nn.Linear modules only, and transformers holds routed experts as fused 3-D
# parameters (its own ``load_in_4bit`` leaves them in float). Every other format refuses them.
KEEP_EXPERT_FORMATS = ("bnb",)
DEFAULT_MIN_EXPERT_TOKENS = 32


def _expert_of(ckpt: Checkpoint, tensor: str) -> tuple[int, str] | None:
    layout, prefix = ckpt.arch.experts, ckpt.arch.layer_prefix(tensor)
    if layout is None or prefix is None:
        return None
    return layout.expert_of(tensor[len(prefix) :])


def keep_experts(ckpt: Checkpoint, cfg: Any, targets: list) -> tuple[list, list[str]]:
    """The ``targets`` (:class:`~weightsmith.compress.registry.LinearTarget` list) that
    ``cfg.format`` quantizes, and the expert Linear modules it keeps as stored (those of a
    :data:`KEEP_EXPERT_FORMATS` format); a one-line refusal for a format transformers cannot
    load quantized experts from."""
    experts = {t.tensor for t in targets if _expert_of(ckpt, t.tensor)}
    if not experts or cfg.format in EXPERT_FORMATS:
        return targets, []
    if cfg.format not in KEEP_EXPERT_FORMATS:
        raise ConfigError(
            f"{ckpt.root}: --format {cfg.format} cannot hold quantized MoE experts that "
            f"transformers loads (it quantizes nn.Linear modules only); use --format "
            f"{EXPERT_FORMATS[0]} (--method rtn or gptq), or keep the experts with "
            "--ignore 're:.*experts.*'"
        )
    kept = sorted(t.module for t in targets if t.tensor in experts)
    return [t for t in targets if t.tensor not in experts], kept


def kept_experts_note(ckpt: Checkpoint, cfg: Any, kept: list[str], fused: bool) -> str:
    """The one-line stderr note of a run that keeps the experts ``kept`` as stored."""
    if fused:
        native = ckpt.arch.experts.quantized_format
        hint = (f"--method {native} quantizes them (the family's own format)" if native
                else "--method rtn or gptq on the released checkpoint (one Linear per expert) "
                "quantizes them")  # fmt: skip
        return (f"{len(kept)} fused 3-D expert tensors kept as stored (not nn.Linear modules, "
                f"which --method {cfg.method} quantizes): listed in --report as kept_experts; "
                f"{hint}")  # fmt: skip
    return (f"{len(kept)} routed-expert Linears kept unquantized (--format {cfg.format} "
            "quantizes nn.Linear modules; transformers holds routed experts as fused 3-D "
            "parameters, as its own load_in_4bit leaves them): listed in --report as "
            f"kept_experts; --format {EXPERT_FORMATS[0]} (--method rtn or gptq) quantizes them")  # fmt: skip


class ExpertRouting:
    """Per-expert calibration tokens of one decoder layer, for a calibrated method.

    ``min_tokens``: an expert whose router sent it fewer calibration tokens falls back to the
    data-free method (RTN, magnitude); one routed no token always does (there is nothing to
    calibrate it on: grouped routers such as DeepSeek-V3's leave whole groups unused on a short
    text); ``all_tokens``: every expert is fed every token (each
    still weighted by its routing weight, so the layer's output is unchanged) and none falls
    back. ``counts`` (expert -> routed tokens) is what the router did either way."""

    def __init__(self, cl: CalibrationLayer, min_tokens: int, all_tokens: bool) -> None:
        self.cl, self.min_tokens, self.all_tokens = cl, min_tokens, all_tokens
        self.blocks = [*expert_blocks(cl.module), *routing_counters(cl.module)]  # gpt-oss: fused
        for b in self.blocks:
            b.all_tokens = all_tokens
            b.counts.zero_()
        self.counts: dict[str, int] = {}

    def reset(self) -> None:
        """Call before a ``collect`` whose counts :meth:`starved` reads."""
        for b in self.blocks:
            b.counts.zero_()

    def _record(self) -> None:
        for b in self.blocks:
            counted = getattr(b, "module", b)  # a RoutingCounter counts a fused module
            rel = next(n for n, m in self.cl.module.named_modules() if m is counted)
            for e in range(b.num_experts):
                self.counts[f"{self.cl.prefix}{rel}.{e}"] = int(b.counts[e])

    def starved(self, names: list[str]) -> set[str]:
        """Of the layer-relative Linear ``names`` just collected, those of an expert that saw
        fewer than ``min_tokens`` routed tokens (none with ``all_tokens``)."""
        if not self.blocks:
            return set()
        self._record()
        if self.all_tokens:
            return set()
        out = set()
        for n in names:
            module = self.cl.prefix + n
            expert = module.rsplit(".", 1)[0]
            if expert in self.counts and self.counts[expert] < max(self.min_tokens, 1):
                out.add(n)
        return out

    def report(self) -> dict[str, int]:
        return dict(self.counts)

    def record_into(self, stats: dict | None, fallbacks: list[str]) -> None:
        """Add this layer's counts and fallback Linears to ``stats`` (see :func:`moe_summary`)."""
        if stats is None or not self.blocks:
            return
        stats.setdefault("expert_tokens", {}).update(self.counts)
        stats.setdefault("expert_fallbacks", []).extend(fallbacks)


def moe_summary(stats: dict, fallback: str) -> dict:
    """The ``--report`` fields of an MoE run (none for a dense model): calibration tokens the
    router sent each expert, and the expert Linears that fell back to ``fallback``."""
    if "expert_tokens" not in stats:
        return {}
    return {
        "expert_tokens": stats["expert_tokens"],
        f"expert_{fallback}_fallbacks": stats.get("expert_fallbacks", []),
    }


def refuse_moe(ckpt: Checkpoint, what: str) -> Checkpoint:
    """``ckpt``, unless it has MoE experts: training (QAT, BitNet) swaps the nn.Linear modules
    of transformers' model, and its experts are fused 3-D parameters."""
    if ckpt.arch.experts is not None:
        raise ConfigError(f"{ckpt.root}: {what} does not train MoE experts yet; quantize "
                          "with compress quantize (--method rtn or gptq)")  # fmt: skip
    return ckpt


def drop_dense_layers(config: dict, arch: Architecture, drop: set[int]) -> list[str]:
    """After dropping decoder layers ``drop``, keep config.json's record of which layers are
    dense (no experts) pointing at the same layers: ``first_k_dense_replace`` becomes the number
    of kept layers below it, ``mlp_only_layers`` is renumbered. Edits ``config`` in place;
    returns the keys it changed."""
    layout = arch.experts
    n = config.get(arch.num_layers_key)
    if layout is None or not isinstance(n, int):
        return []
    kept = [i for i in range(n) if i not in drop]
    edited = []
    key = layout.dense_prefix_key
    if key and isinstance(config.get(key), int):
        config[key] = sum(i < config[key] for i in kept)
        edited.append(key)
    key = layout.dense_layers_key
    if key and isinstance(config.get(key), list) and config[key]:
        config[key] = [kept.index(i) for i in config[key] if i in kept]
        edited.append(key)
    return edited
