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

import torch
from torch import nn

from weightsmith.errors import CheckpointError
from weightsmith.io.architectures import Architecture, ExpertLayout
from weightsmith.io.reader import Checkpoint

__all__ = [
    "ExpertLinear",
    "ExpertLinears",
    "expert_blocks",
    "expert_groups",
    "expert_linears",
    "is_expert_linear",
    "is_router",
    "refuse_fused_experts",
    "unfuse_layer",
    "unfuse_model",
]


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
            "quantize or prune in this layout; use the released checkpoint (one Linear per "
            "expert)"
        )


# ----------------------------------------------------------------------------- calibration
class ExpertLinears(nn.Module):
    """Drop-in for transformers' fused experts module during layer-streamed calibration: one
    child per expert (``"0"``, ``"1"``, ...) holding the Linears the checkpoint names
    (``w1``/``w3``/``w2``), with the fused module's forward signature
    ``(hidden_states, top_k_index, top_k_weights)``. The router of transformers' own MoE block
    picks the experts, so tokens go where the model sends them; Linear hooks see exactly the
    tokens routed to that expert (every token with :attr:`all_tokens`, each still weighted by
    its routing weight, 0 where not routed, so the block's output is unchanged)."""

    def __init__(self, fused: nn.Module, gate_up: tuple[str, str], down: str) -> None:
        super().__init__()
        n, two_i, hidden = fused.gate_up_proj.shape
        self.num_experts, self.gate_up, self.down = n, gate_up, down
        self.act_fn = fused.act_fn
        for e in range(n):
            expert = nn.Module()
            for name in gate_up:
                expert.add_module(name, nn.Linear(hidden, two_i // 2, bias=False, device="meta"))
            expert.add_module(down, nn.Linear(two_i // 2, hidden, bias=False, device="meta"))
            self.add_module(str(e), expert)
        self.counts = torch.zeros(n, dtype=torch.long)  # routed tokens per expert
        self.all_tokens = False

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        every = torch.arange(hidden_states.shape[0], device=hidden_states.device)
        for e in range(self.num_experts):
            routed = top_k_index == e  # (tokens, top_k)
            self.counts[e] += int(routed.sum())
            if self.all_tokens:
                tok, w = every, (top_k_weights * routed).sum(-1)
            else:
                tok, pos = torch.where(routed)
                w = top_k_weights[tok, pos]
            if tok.numel() == 0:
                continue
            expert = getattr(self, str(e))
            x = hidden_states[tok]
            gate, up = (getattr(expert, n) for n in self.gate_up)
            y = getattr(expert, self.down)(self.act_fn(gate(x)) * up(x)) * w[:, None]
            out.index_add_(0, tok, y.to(out.dtype))
        return out


def unfuse_layer(layer: nn.Module, arch: Architecture) -> None:
    """Replace the fused experts of a (meta) decoder layer by :class:`ExpertLinears`, under the
    names the checkpoint uses (Mixtral's block is registered as ``block_sparse_moe`` and still
    reached as ``mlp`` by the layer's forward). A dense layer (Qwen3-MoE ``mlp_only_layers``)
    is left as it is."""
    layout = arch.experts
    if layout is None or layout.storage == "fused":  # gpt-oss: the model's own 3-D experts
        return
    block = getattr(layer, layout.module, None)
    fused = getattr(block, "experts", None)
    if fused is None or not hasattr(fused, "gate_up_proj") or isinstance(fused, ExpertLinears):
        return
    gate_up = next(parts for _, parts in layout.fused if len(parts) == 2)
    down = next(parts[0] for _, parts in layout.fused if len(parts) == 1)
    block.experts = ExpertLinears(fused, gate_up, down)
    if layout.block != layout.module:
        del layer._modules[layout.module]
        layer.add_module(layout.block, block)
        object.__setattr__(layer, layout.module, block)  # the layer's forward calls self.mlp


def unfuse_model(model: nn.Module, arch: Architecture) -> None:
    """:func:`unfuse_layer` on every decoder layer of a (meta) transformers model, so that its
    modules carry the checkpoint's per-expert Linear names."""
    if arch.experts is None:
        return
    for m in list(model.modules()):
        if isinstance(getattr(m, arch.experts.module, None), nn.Module):
            unfuse_layer(m, arch)


def expert_blocks(module: nn.Module) -> list[ExpertLinears]:
    return [m for m in module.modules() if isinstance(m, ExpertLinears)]


def is_expert_linear(arch: Architecture, rel: str) -> bool:
    """Whether the layer-relative Linear ``rel`` (``block_sparse_moe.experts.3.w1``) is an
    expert's."""
    return arch.experts is not None and arch.experts.expert_of(rel + ".weight") is not None


def expert_groups(arch: Architecture, linears: list[str]) -> list[tuple[str, ...]]:
    """A layer's expert Linears (layer-relative names) in execution order: every expert's
    first stage (gate, up), then every expert's next (down)."""
    layout = arch.experts
    if layout is None:
        return []
    hits = [(n, layout.expert_of(n + ".weight")) for n in linears]
    return [
        g
        for stage in layout.sequential_linears
        if (g := tuple(n for n, h in hits if h and h[1] in stage))
    ]
