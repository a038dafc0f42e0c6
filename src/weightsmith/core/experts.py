"""Mixture-of-experts layers, as their architecture description (``experts`` in the JSON) names
them: which checkpoint tensors are expert Linears, which are routers, and which are fused 3-D
expert tensors.

transformers 5.x keeps experts in memory as fused 3-D parameters (``mlp.experts.gate_up_proj``
of shape (experts, 2·intermediate, hidden)) but saves and loads checkpoints with one Linear per
expert (``block_sparse_moe.experts.3.w1.weight``), converting on load. weightsmith works on the
per-expert names: each expert Linear is quantized or pruned like any other Linear, the router
never is.
"""

from __future__ import annotations

from dataclasses import dataclass

from weightsmith.errors import CheckpointError
from weightsmith.io.architectures import Architecture, ExpertLayout
from weightsmith.io.reader import Checkpoint

__all__ = ["ExpertLinear", "expert_linears", "is_router", "refuse_fused_experts"]


@dataclass(frozen=True)
class ExpertLinear:
    """One per-expert Linear weight of the checkpoint."""

    tensor: str  # "model.layers.0.block_sparse_moe.experts.3.w1.weight"
    layer: int
    expert: int
    linear: str  # "w1", as the description names it

    @property
    def module(self) -> str:
        return self.tensor[: -len(".weight")]


def _split(arch: Architecture, name: str) -> tuple[int, str] | None:
    prefix = arch.layer_prefix(name)
    layer = arch.layer_of(name)
    if prefix is None or layer is None:
        return None
    return layer, name[len(prefix) :]


def expert_linears(ckpt: Checkpoint) -> list[ExpertLinear]:
    """Every per-expert Linear weight, in checkpoint order (empty for a dense model)."""
    layout = ckpt.arch.experts
    if layout is None:
        return []
    out = []
    for name in ckpt.tensors:
        split = _split(ckpt.arch, name)
        hit = layout.expert_of(split[1]) if split else None
        if split and hit:
            out.append(ExpertLinear(name, split[0], hit[0], hit[1]))
    return out


def is_router(arch: Architecture, name: str) -> bool:
    """Whether ``name`` is an MoE router (gate) tensor: never quantized or pruned."""
    layout: ExpertLayout | None = arch.experts
    split = _split(arch, name)
    return bool(layout and split and split[1].startswith(layout.router + "."))


def fused_expert_tensors(ckpt: Checkpoint) -> list[str]:
    """The checkpoint's fused 3-D expert tensors (``mlp.experts.gate_up_proj``)."""
    layout = ckpt.arch.experts
    if layout is None:
        return []
    fused = {k for k, _ in layout.fused}
    return [n for n in ckpt.tensors if (s := _split(ckpt.arch, n)) and s[1] in fused]


def refuse_fused_experts(ckpt: Checkpoint, what: str) -> None:
    """Refuse ``what`` on fused 3-D experts: compressed-tensors quantizes Linear modules and
    transformers loads quantized experts only in the per-expert layout."""
    fused = fused_expert_tensors(ckpt)
    if fused:
        raise CheckpointError(
            f"{what}: {fused[0]} holds fused 3-D experts, which weightsmith does not "
            "quantize or prune yet; save the model with transformers (it writes one Linear "
            "per expert) or convert it to the per-expert layout first"
        )
