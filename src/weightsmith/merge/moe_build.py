"""Write the Mixtral MoE of a :class:`~weightsmith.merge.moe.MoeConfig`, streamed per tensor."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from typing import Any

import torch

from weightsmith.core.streaming import StreamResult
from weightsmith.core.transform import (
    WriteOptions,
    checked_copy,
    require_finite,
    rewrite_checkpoint,
)
from weightsmith.errors import CheckpointError
from weightsmith.io.dtypes import parse_user_dtype
from weightsmith.io.reader import Checkpoint, open_checkpoint
from weightsmith.io.writer import DEFAULT_MAX_SHARD_SIZE, TensorSpec
from weightsmith.merge.moe import DENSE_TYPES, MoeConfig, cheap_embed_gates, load_tokenizer
from weightsmith.merge.moe_qwen import (
    QWEN_TYPES,
    qwen_apply,
    qwen_config,
    qwen_layout,
    qwen_shape,
    source_name,
)

MLP = "model.layers.{}.mlp.{}.weight"


@dataclass(frozen=True)
class _Group:
    key: str
    names: tuple[str, ...]


def _layers(ck: Checkpoint) -> int:
    n = (ck.config or {}).get("num_hidden_layers")
    if not isinstance(n, int) or n < 1:
        raise CheckpointError(f"{ck.root}: config.json has no num_hidden_layers")
    return n


def _check_inputs(base: Checkpoint, experts: list[Checkpoint], qwen: bool) -> None:
    """Models of one supported type, every expert with the base's MLP shapes."""
    kinds = {(c.config or {}).get("model_type") for c in [base, *experts]}
    allowed, what = (QWEN_TYPES, "Qwen MoE output needs Llama, Mistral or Qwen2") if qwen else (
        DENSE_TYPES, "Mixtral output needs Llama or Mistral"
    )  # fmt: skip
    if len(kinds) != 1 or not kinds <= set(allowed):
        raise CheckpointError(f"{what} models of one type, got {sorted(map(str, kinds))}")
    for i in range(_layers(base)):
        for p in ("gate_proj", "up_proj", "down_proj"):
            name = MLP.format(i, p)
            if name not in base.tensors:
                raise CheckpointError(f"{base.root}: no tensor {name!r}")
            for ex in experts:
                if name not in ex.tensors or ex.info(name).shape != base.info(name).shape:
                    raise CheckpointError(
                        f"{ex.root}: {name!r} is missing or not shaped as the base's"
                    )


def gate_params(cfg: MoeConfig, base: Checkpoint, gen: torch.Generator) -> torch.Tensor:
    """(layers, experts, hidden) float32 router rows (``gen`` drawn from for random modes);
    the shared expert's row last (Qwen MoE)."""
    layers, hidden = _layers(base), base.config["hidden_size"]
    gated = (*cfg.experts, *cfg.shared_experts)
    shape = (layers, len(gated), hidden)
    if cfg.gate_mode == "random":
        return torch.randn(shape, generator=gen)
    if cfg.gate_mode == "uniform_random":
        scale = math.sqrt(1.0 / hidden)
        return torch.rand(shape, generator=gen) * 2 * scale - scale
    if cfg.gate_mode in ("hidden", "hidden_last"):
        from weightsmith.merge.moe_hidden import hidden_gates

        return hidden_gates(base, load_tokenizer(base.root), gated)
    embed = require_finite(base.get_tensor("model.embed_tokens.weight"), str(base.root), "embed")
    return cheap_embed_gates(embed, load_tokenizer(base.root), gated, layers)


def mixtral_config(base: Checkpoint, cfg: MoeConfig, out_dtype: torch.dtype | None) -> dict:
    """mergekit's ``MixtralMoE._generate_config``: the base config as Mistral, then Mixtral."""
    import transformers

    base_cfg = transformers.AutoConfig.from_pretrained(str(base.root))
    if not isinstance(base_cfg, transformers.MistralConfig):
        mistral = transformers.MistralConfig(**base_cfg.to_dict())
        mistral.sliding_window = None
        mistral.max_position_embeddings = base_cfg.max_position_embeddings
        base_cfg = mistral
    out = transformers.MixtralConfig(**base_cfg.to_dict())
    out.architectures = ["MixtralForCausalLM"]
    out.num_local_experts = len(cfg.experts)
    out.num_experts_per_tok = cfg.experts_per_token
    out.sliding_window = None
    if out_dtype is not None:
        out.dtype = out_dtype
    return json.loads(out.to_json_string(use_diff=True))


def _out_dtype(cfg: MoeConfig, base: Checkpoint) -> torch.dtype | None:
    if cfg.dtype:
        return parse_user_dtype(cfg.dtype)
    stored = (base.config or {}).get("dtype") or (base.config or {}).get("torch_dtype")
    return parse_user_dtype(stored) if isinstance(stored, str) else None


def _expert_tensor(
    ck: Checkpoint, name: str, expert, gen: torch.Generator, residual: bool
) -> torch.Tensor:
    """mergekit's ``noise_and_scale`` (noise drawn in the stored dtype from ``gen``)."""
    t = require_finite(ck.get_tensor(name), str(ck.root), name)
    if expert.noise_scale is not None:
        t = t + torch.randn(t.shape, generator=gen, dtype=t.dtype) * expert.noise_scale
    if residual and expert.residual_scale is not None:
        t = t * expert.residual_scale
    return t


def build_moe(
    cfg: MoeConfig,
    out: str | os.PathLike[str],
    *,
    seed: int = 0,
    config_text: str | None = None,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    force: bool = False,
    progress: bool = True,
) -> StreamResult:
    """Write the MoE of ``cfg`` (Mixtral, or Qwen2-MoE with a shared expert) to ``out``
    (atomically); ``seed`` seeds the random gates and expert noise (mergekit's
    ``--random-seed``)."""
    qwen = bool(cfg.shared_experts)
    with ExitStack() as stack:
        base = stack.enter_context(open_checkpoint(cfg.base_model))
        experts = [stack.enter_context(open_checkpoint(e.source_model)) for e in cfg.experts]
        shared = [stack.enter_context(open_checkpoint(e.source_model)) for e in cfg.shared_experts]
        _check_inputs(base, [*experts, *shared], qwen)
        gen = torch.Generator().manual_seed(seed)
        gates = gate_params(cfg, base, gen)
        out_dtype = _out_dtype(cfg, base)
        if qwen:
            new_config = qwen_config(base, len(experts), cfg.experts_per_token, out_dtype)
            groups, plan, apply = _qwen_steps(base, experts, shared[0], cfg, gen, gates, out_dtype)
        else:
            new_config = mixtral_config(base, cfg, out_dtype)
            groups, plan, apply = _mixtral_steps(base, experts, cfg, gen, gates, out_dtype)

        def before_commit(writer) -> None:
            if config_text is not None:
                writer.write_text("mergekit_moe_config.yml", config_text)

        return rewrite_checkpoint(
            base,
            groups,
            out,
            plan=plan,
            apply=apply,
            options=WriteOptions(max_shard_size, force, progress),
            sources=[base, *experts, *shared],
            config_patch=lambda _old: new_config,
            description="merge moe",
            provenance={"operation": "merge_moe", "config": asdict(cfg), "seed": seed},
            before_commit=before_commit,
        )


def _qwen_steps(base, experts, shared_ck, cfg, gen, gates, out_dtype):
    groups = qwen_layout(base, len(experts), _layers(base))

    def dt(name: str) -> torch.dtype:
        src = source_name(name)
        if out_dtype is not None:
            return out_dtype
        return base.info(src).torch_dtype if src in base.tensors else torch.float32

    def plan(group) -> list[TensorSpec]:
        return [TensorSpec(n, dt(n), qwen_shape(base, n, len(experts))) for n in group.names]

    def apply(group):
        return qwen_apply(group, base, experts, shared_ck, cfg, gen, dt, gates, _expert_tensor)

    return groups, plan, apply


def _mixtral_steps(base, experts, cfg, gen, gates, out_dtype):
    outer = [n for n in base.tensors if ".mlp." not in n]
    groups = [_Group("base", tuple(outer))] + [
        _Group(f"layer {i}", _layer_names(i)) for i in range(_layers(base))
    ]

    def dt(name: str) -> torch.dtype:
        return out_dtype or base.info(name).torch_dtype

    def plan(group: _Group) -> list[TensorSpec]:
        if group.key == "base":
            return [TensorSpec(n, dt(n), base.info(n).shape) for n in group.names]
        i = int(group.key.split()[1])
        g, d = base.info(MLP.format(i, "gate_proj")), base.info(MLP.format(i, "down_proj"))
        e, (inter, hidden) = len(experts), g.shape
        return [
            TensorSpec(group.names[0], dt(g.name), (e, 2 * inter, hidden)),
            TensorSpec(group.names[1], dt(d.name), (e, *d.shape)),
            TensorSpec(group.names[2], out_dtype or torch.float32, (e, hidden)),
        ]

    def apply(group: _Group) -> Iterator[tuple[str, Any]]:
        if group.key == "base":
            for n in group.names:
                if dt(n) == base.info(n).torch_dtype:
                    yield checked_copy(base, n)
                else:
                    yield n, require_finite(base.get_tensor(n), str(base.root), n).to(dt(n))
            return
        i = int(group.key.split()[1])
        yield from _layer_tensors(i, cfg, experts, gen, dt, gates[i], out_dtype)

    return groups, plan, apply


def _layer_names(i: int) -> tuple[str, str, str]:
    p = f"model.layers.{i}.mlp"
    return (f"{p}.experts.gate_up_proj", f"{p}.experts.down_proj", f"{p}.gate.weight")


def _layer_tensors(i, cfg, experts, gen, dt, gate_rows, out_dtype):
    """Layer ``i``'s fused expert tensors and router, reading one expert tensor at a time
    (noise drawn in mergekit's order: per expert gate_proj, down_proj, up_proj)."""
    names = _layer_names(i)
    gate_up = down = None
    for e, (ck, expert) in enumerate(zip(experts, cfg.experts, strict=True)):
        w1 = _expert_tensor(ck, MLP.format(i, "gate_proj"), expert, gen, False)
        w2 = _expert_tensor(ck, MLP.format(i, "down_proj"), expert, gen, True)
        w3 = _expert_tensor(ck, MLP.format(i, "up_proj"), expert, gen, False)
        if gate_up is None:
            inter = w1.shape[0]
            gate_up = torch.empty(
                (len(experts), 2 * inter, w1.shape[1]), dtype=dt(MLP.format(i, "gate_proj"))
            )
            down = torch.empty((len(experts), *w2.shape), dtype=dt(MLP.format(i, "down_proj")))
        gate_up[e, : w1.shape[0]] = w1.to(gate_up.dtype)
        gate_up[e, w1.shape[0] :] = w3.to(gate_up.dtype)
        down[e] = w2.to(down.dtype)
        del w1, w2, w3
    yield names[0], require_finite(gate_up, "merge moe", names[0])
    yield names[1], require_finite(down, "merge moe", names[1])
    yield names[2], gate_rows.to(out_dtype or torch.float32).contiguous()
