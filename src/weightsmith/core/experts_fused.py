"""Fused 3-D expert tensors, as a checkpoint stores them (gpt-oss's released layout, or a
Mixtral/Qwen3-MoE saved with transformers' in-memory names).

gpt-oss stores ``model.layers.N.mlp.experts.gate_up_proj`` as ``(experts, hidden, 2·I)``: its
forward computes ``x @ gate_up_proj[e] + gate_up_proj_bias[e]``, so expert ``e``'s Linear weight
``(out, in)`` is the transpose of slice ``e`` (``fused_layout: "in_out"``); gate and up are
interleaved along the output dim (even columns gate, odd up). Mixtral/Qwen3-MoE's in-memory
layout is ``(experts, out, in)`` (``"out_in"``), gate and up concatenated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from weightsmith.io.architectures import ExpertLayout
from weightsmith.io.reader import Checkpoint

__all__ = [
    "FusedExpertTensor",
    "RoutingCounter",
    "expert_weight",
    "fused_experts",
    "natively_fused",
    "routing_counters",
    "stack_expert_weights",
]


@dataclass(frozen=True)
class FusedExpertTensor:
    """One fused 3-D expert tensor of the checkpoint and its per-expert bias, if stored."""

    tensor: str  # "model.layers.0.mlp.experts.gate_up_proj"
    layer: int
    linear: str  # "gate_up_proj", as the description names the per-expert Linear
    bias: str | None  # "model.layers.0.mlp.experts.gate_up_proj_bias"
    layout: str  # "in_out" (experts, in, out) or "out_in" (experts, out, in)


def natively_fused(layout: ExpertLayout | None) -> bool:
    """Whether the family's released checkpoints store fused 3-D experts (gpt-oss)."""
    return layout is not None and layout.storage == "fused"


def fused_experts(ckpt: Checkpoint) -> list[FusedExpertTensor]:
    """The checkpoint's fused 3-D expert tensors by layer, each layer's in execution order
    (gate/up before down, as the description's ``sequential_linears``); empty if none."""
    layout, arch = ckpt.arch.experts, ckpt.arch
    if layout is None:
        return []
    parts = dict(layout.fused)
    out = []
    for name in ckpt.tensors:
        prefix, layer = arch.layer_prefix(name), arch.layer_of(name)
        if prefix is None or layer is None or name[len(prefix) :] not in parts:
            continue
        linears = parts[name[len(prefix) :]]
        bias = name + layout.fused_bias_suffix if layout.fused_bias_suffix else None
        out.append(FusedExpertTensor(name, layer, "+".join(linears),
                                     bias if bias in ckpt.tensors else None,
                                     layout.fused_layout))  # fmt: skip
    stage = {n: i for i, g in enumerate(layout.sequential_linears) for n in g}
    return sorted(out, key=lambda f: (f.layer, stage.get(f.linear.split("+")[0], len(stage))))


def expert_weight(fused: torch.Tensor, expert: int, layout: str) -> torch.Tensor:
    """Expert ``expert``'s Linear weight ``(out, in)`` from a fused 3-D tensor."""
    w = fused[expert]
    return w.t() if layout == "in_out" else w


def stack_expert_weights(weights: list[torch.Tensor], layout: str) -> torch.Tensor:
    """Inverse of :func:`expert_weight` over all experts: ``(out, in)`` weights -> 3-D."""
    return torch.stack([w.t() if layout == "in_out" else w for w in weights]).contiguous()


class RoutingCounter:
    """Counts, for one fused experts module, the (token, slot) pairs its router sends each
    expert: a forward pre-hook reads the router's top-k indices, the experts module's second
    argument (``router_indices`` in gpt-oss, ``top_k_index`` in Mixtral/Qwen3-MoE), so the
    model's own forward runs unchanged. Same attributes as
    :class:`~weightsmith.core.experts.ExpertLinears` (``counts``, ``num_experts``,
    ``all_tokens``; ``module`` is the counted experts module)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.num_experts = int(module.gate_up_proj.shape[0])
        self.counts = torch.zeros(self.num_experts, dtype=torch.long)
        self.all_tokens = False
        module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        index = args[1] if len(args) > 1 else next(iter(v for k, v in kwargs.items()
                                                        if k in ("router_indices", "top_k_index")))  # fmt: skip
        self.counts += torch.bincount(index.reshape(-1).cpu(), minlength=self.num_experts)[
            : self.num_experts
        ]


def routing_counters(layer: nn.Module) -> list[RoutingCounter]:
    """A :class:`RoutingCounter` per fused experts module (3-D ``gate_up_proj``) of a decoder
    layer, made once per module and reused."""
    out = []
    for m in layer.modules():
        p = getattr(m, "gate_up_proj", None)
        if isinstance(p, nn.Parameter) and p.dim() == 3:
            counter = m.__dict__.get("_weightsmith_counter")
            if counter is None:
                counter = m.__dict__["_weightsmith_counter"] = RoutingCounter(m)
            out.append(counter)
    return out
