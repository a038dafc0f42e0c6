"""Qwen2-MoE output of ``merge moe`` (mergekit-moe 0.1.5's ``QwenMoE``): routed experts plus
one gated shared expert, from Llama/Mistral/Qwen2 models.

Tensor names as mergekit writes them (``mlp.experts.{e}.{gate,up,down}_proj.weight``,
``mlp.shared_expert.*``, ``mlp.gate.weight`` and ``mlp.shared_expert_gate.weight``; transformers
5 fuses the experts on load). Attention biases the base lacks (Llama) are written as zeros.
Expert noise is drawn in mergekit's order: per layer down, gate, up projection, each over the
routed experts, then the shared one. One tensor in memory at a time.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from weightsmith.core.transform import checked_copy, require_finite
from weightsmith.io.reader import Checkpoint

QWEN_TYPES = ("llama", "mistral", "qwen2")
PROJ = ("down_proj", "gate_proj", "up_proj")  # mergekit's (alphabetical) weight order
ATTN = ("k_proj.bias", "k_proj.weight", "o_proj.weight", "q_proj.bias", "q_proj.weight")
ATTN += ("v_proj.bias", "v_proj.weight")


@dataclass(frozen=True)
class _Group:
    key: str
    names: tuple[str, ...]


def qwen_config(base: Checkpoint, n_experts: int, per_token: int, out_dtype) -> dict:
    """mergekit's ``QwenMoE._generate_config``."""
    import transformers

    base_cfg = transformers.AutoConfig.from_pretrained(str(base.root))
    out = transformers.Qwen2MoeConfig(**base_cfg.to_dict())
    out.architectures = ["Qwen2MoeForCausalLM"]
    out.num_experts = n_experts
    out.num_experts_per_tok = per_token
    out.decoder_sparse_step = 1
    out.norm_topk_prob = True
    out.sliding_window = None
    out.use_sliding_window = False
    out.shared_expert_intermediate_size = out.intermediate_size
    out.moe_intermediate_size = out.intermediate_size
    if out_dtype is not None:
        out.dtype = out_dtype
    return json.loads(out.to_json_string(use_diff=True))


def qwen_layout(base: Checkpoint, n_experts: int, layers: int) -> list[_Group]:
    """Output tensor names, one group per layer (after the non-layer tensors)."""
    outer = ["model.embed_tokens.weight", "model.norm.weight"]
    outer += ["lm_head.weight"] if "lm_head.weight" in base.tensors else []
    groups = [_Group("base", tuple(outer))]
    for i in range(layers):
        p = f"model.layers.{i}"
        names = [f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight"]
        names += [f"{p}.self_attn.{a}" for a in ATTN]
        for proj in PROJ:
            names += [f"{p}.mlp.experts.{e}.{proj}.weight" for e in range(n_experts)]
            names.append(f"{p}.mlp.shared_expert.{proj}.weight")
        names += [f"{p}.mlp.gate.weight", f"{p}.mlp.shared_expert_gate.weight"]
        groups.append(_Group(f"layer {i}", tuple(names)))
    return groups


def qwen_shape(base: Checkpoint, name: str, n_experts: int) -> tuple[int, ...]:
    if name.endswith("mlp.gate.weight"):
        return (n_experts, base.config["hidden_size"])
    if name.endswith("shared_expert_gate.weight"):
        return (1, base.config["hidden_size"])
    src = source_name(name)
    if src in base.tensors:
        return tuple(base.info(src).shape)
    weight = base.info(src.replace(".bias", ".weight"))
    return (weight.shape[0],)  # a missing attention bias: one zero per output row


def source_name(name: str) -> str:
    """The dense model's tensor an output tensor comes from."""
    return re.sub(r"\.mlp\.(experts\.\d+|shared_expert)\.", ".mlp.", name)


def qwen_apply(
    group, base, experts, shared_ck, cfg, gen, dt, gates, expert_tensor
) -> Iterator[tuple[str, Any]]:
    """The tensors of one group (``gates``: (layers, experts + 1, hidden), the shared
    expert's row last)."""
    shared = cfg.shared_experts[0]
    for name in group.names:
        if name.endswith("mlp.gate.weight"):
            i = int(name.split(".")[2])
            yield name, gates[i, : len(experts)].to(dt(name)).contiguous()
        elif name.endswith("shared_expert_gate.weight"):
            i = int(name.split(".")[2])
            yield name, gates[i, len(experts) :].to(dt(name)).contiguous()
        elif ".mlp." in name:
            src = source_name(name)
            if ".shared_expert." in name:
                ck, ex = shared_ck, shared
            else:
                e = int(name.split(".mlp.experts.")[1].split(".")[0])
                ck, ex = experts[e], cfg.experts[e]
            yield name, expert_tensor(ck, src, ex, gen, "down_proj" in name).to(dt(name))
        elif name in base.tensors:
            if dt(name) == base.info(name).torch_dtype:
                yield checked_copy(base, name)
            else:
                yield name, require_finite(base.get_tensor(name), str(base.root), name).to(dt(name))
        else:  # Qwen2 attention wants q/k/v biases: zeros, as mergekit writes them
            yield name, torch.zeros(qwen_shape(base, name, len(experts)), dtype=dt(name))
