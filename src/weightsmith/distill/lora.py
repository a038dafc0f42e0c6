"""LoRA/QLoRA students (peft): wrap a loaded model, and read its adapters back as ΔW."""

from __future__ import annotations

import torch

from weightsmith.distill.config import LoraSettings
from weightsmith.errors import ConfigError


def wrap_lora(model, lora: LoraSettings, *, nf4: bool, seed: int):
    """Add LoRA adapters (seeded, so every process starts from the same weights)."""
    try:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    except ImportError:
        raise ConfigError("LoRA students need peft: pip install peft") from None
    if nf4:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules(),
        use_rslora=lora.rslora,
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(seed)
    try:
        return get_peft_model(model, config)
    except ValueError as e:  # e.g. target modules not found
        raise ConfigError(f"--lora-targets {lora.targets}: {str(e).splitlines()[0]}") from None


def lora_deltas(peft_model, state: dict | None = None) -> dict[str, torch.Tensor]:
    """``{weight name in the checkpoint: ΔW}`` with ΔW = scale · B @ A in the stored layout;
    A and B from ``state`` when given (an FSDP model's gathered full state dict)."""
    deltas: dict[str, torch.Tensor] = {}
    prefix = "base_model.model."
    for name, module in peft_model.named_modules():
        if not hasattr(module, "lora_A") or "default" not in getattr(module, "lora_A", {}):
            continue
        a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
        if state is not None:
            a, b = state[f"{name}.lora_A.default.weight"], state[f"{name}.lora_B.default.weight"]
        a, b = a.detach().float().cpu(), b.detach().float().cpu()  # (r, in), (out, r)
        delta = (b @ a) * float(module.scaling["default"])  # (out, in)
        if getattr(module, "fan_in_fan_out", False):  # GPT-2 Conv1D stores (in, out)
            delta = delta.T
        key = name[len(prefix) :] if name.startswith(prefix) else name
        deltas[f"{key}.weight"] = delta.contiguous()
    return deltas
