"""Fully sharded data parallelism: FSDP2 (``torch.distributed.fsdp.fully_shard``) for training.

Asked by ``--fsdp`` or by ``accelerate launch --use_fsdp`` / an accelerate config with
``distributed_type: FSDP`` (the launcher sets ``ACCELERATE_USE_FSDP=true``). weightsmith always
shards with FSDP2 whatever ``FSDP_VERSION`` says; of accelerate's other ``fsdp_*`` settings only
``fsdp_reshard_after_forward`` (true/false) is read.

Each decoder layer is one FSDP unit, then the root (embeddings, final norm, lm_head, and a LoRA
student's remaining adapters). The layers are the modules the architecture description's
layer templates name (``model.layers.{layer}.`` → ``model.layers.0`` … ``model.layers.L-1``),
never guessed from class names: a checkpoint whose architecture is not described, or whose
model does not hold those modules, is refused in one line before any training.

Parameters become DTensors sharded on dim 0 over the processes, so the AdamW states built from
them are sharded too; a unit is all-gathered just before its forward (and again in backward)
and freed after. Gradients are reduce-scattered as a plain SUM (divide factor 1): the engine
already divides every micro-batch loss by the global token count, as in data parallelism, so
the trained weights equal a one-process run up to float32 summation order. At the end
:func:`full_state_dict` gathers the full weights onto rank 0's CPU for the usual atomic save.
Everything stays float32 (no mixed precision: the point is to match one process on CPU).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from weightsmith.errors import ConfigError
from weightsmith.io.architectures import GENERIC, Architecture

FSDP_ENV = "ACCELERATE_USE_FSDP"
_TRUE = ("1", "true", "yes")


def fsdp_from_env() -> bool:
    """Whether the launcher asked for FSDP (``accelerate launch --use_fsdp`` or its config)."""
    return os.environ.get(FSDP_ENV, "").strip().lower() in _TRUE


def fsdp_requested(flag: bool) -> bool:
    """``--fsdp``, or an FSDP launch."""
    return bool(flag) or fsdp_from_env()


def reshard_after_forward() -> bool:
    """accelerate's ``fsdp_reshard_after_forward`` (FSDP2 spelling true/false; default true)."""
    value = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").strip().lower()
    return value not in ("false", "0", "no", "shard_grad_op", "no_shard")


def layer_names(arch: Architecture, config: dict | None, model_name: str) -> list[list[str]]:
    """The module names of the decoder layers, one list per layer template of the description
    (alternatives: GPT-2 checkpoints name their layers ``transformer.h.N`` or ``h.N``).

    ``model_name`` names the checkpoint in the error of an architecture that cannot be wrapped.
    """
    if not arch.known or arch.name == GENERIC or not arch.layer_templates:
        raise ConfigError(
            f"--fsdp cannot wrap {model_name}: architecture {arch.name!r} is not described "
            "in weightsmith, so its decoder layers are unknown (add a JSON description in "
            "src/weightsmith/io/architectures/)"
        )
    count = (config or {}).get(arch.num_layers_key)
    if not isinstance(count, int) or count < 1:
        raise ConfigError(
            f"--fsdp cannot wrap {model_name}: config.json has no {arch.num_layers_key!r} "
            "(the number of decoder layers)"
        )
    return [[t.replace("{layer}", str(i)).rstrip(".") for i in range(count)]
            for t in arch.layer_templates]  # fmt: skip


def decoder_layers(model: torch.nn.Module, candidates: list[list[str]]) -> list[torch.nn.Module]:
    """The modules of the first list in ``candidates`` that ``model`` holds entirely (a peft
    wrapper is looked through); refuses a model that holds none of them."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for names in candidates:
        try:
            return [base.get_submodule(name) for name in names]
        except AttributeError:
            continue
    first = candidates[0][0] if candidates and candidates[0] else "?"
    raise ConfigError(
        f"--fsdp cannot wrap {type(base).__name__}: it has no module {first!r} "
        "(the architecture description's decoder layer)"
    )


def shard(model: torch.nn.Module, layers: list[torch.nn.Module], world: int) -> torch.nn.Module:
    """``fully_shard`` every layer, then the root; gradients reduce as a SUM. In place; a
    one-process run is left as it is (nothing to shard)."""
    if world == 1:
        return model
    from torch.distributed.fsdp import FSDPModule, fully_shard

    device = next(model.parameters()).device
    if device.type == "cuda":  # the default mesh uses the current device: this process's GPU
        torch.cuda.set_device(device)
    again = reshard_after_forward()
    for layer in layers:
        fully_shard(layer, reshard_after_forward=again)
    fully_shard(model, reshard_after_forward=again)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # gloo has no AVG / PREMUL_SUM
    return model


def local_numel(t: torch.Tensor) -> int:
    """Elements this process stores of ``t`` (its shard when ``t`` is a DTensor)."""
    local = t.to_local() if hasattr(t, "to_local") else t
    return int(local.numel())


@dataclass(frozen=True)
class ShardStats:
    """What one process holds: parameter and optimizer-state elements, peak RSS."""

    rank: int
    param_elements: int  # all parameters (frozen ones too), this process's shards
    trainable_elements: int
    optimizer_elements: int  # AdamW exp_avg + exp_avg_sq (not the step counters)
    peak_rss: int = 0


def shard_stats(model: torch.nn.Module, optimizer, rank: int) -> ShardStats:
    """Count what this process stores of ``model``'s parameters and ``optimizer``'s state."""
    params = list(model.parameters())
    opt = 0
    for state in optimizer.state.values():
        for key, value in state.items():
            if key != "step" and isinstance(value, torch.Tensor):
                opt += local_numel(value)
    return ShardStats(
        rank=rank,
        param_elements=sum(local_numel(p) for p in params),
        trainable_elements=sum(local_numel(p) for p in params if p.requires_grad),
        optimizer_elements=opt,
    )


def full_state_dict(model: torch.nn.Module, world: int) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict on CPU; on rank 0 only under FSDP (empty elsewhere).
    Collective: every process must call it."""
    if world == 1:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)
