"""Load teacher and student for training (transformers), wrap LoRA/QLoRA students (peft)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from weightsmith.distill.config import LoraSettings
from weightsmith.errors import CheckpointError, ConfigError


def load_tokenizer(path: str | os.PathLike[str]):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # transformers raises many types for a missing/odd tokenizer
        raise CheckpointError(f"{path}: cannot load its tokenizer ({type(e).__name__})") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.convert_ids_to_tokens(0)
    return tok


def load_model(
    path: str | os.PathLike[str],
    device: torch.device,
    *,
    nf4: bool = False,
    trainable: bool = False,
):
    """A causal LM in float32 (or with NF4 linear weights for QLoRA) on ``device``."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json (expected a Hugging Face model folder)")
    kwargs: dict = {"dtype": torch.float32}
    if nf4:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.float32 if device.type == "cpu" else torch.bfloat16,
            bnb_4bit_use_double_quant=False,
        )
        kwargs["device_map"] = {"": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: cannot load as a causal LM ({e})") from None
    if not nf4:
        model.to(device)
    model.train(trainable)
    if not trainable:
        model.requires_grad_(False)
    return model


def logits_width(model) -> int:
    return int(model.get_output_embeddings().weight.shape[0])


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


def lora_deltas(peft_model) -> dict[str, torch.Tensor]:
    """``{weight name in the checkpoint: ΔW}`` with ΔW = scale · B @ A in the stored layout."""
    deltas: dict[str, torch.Tensor] = {}
    prefix = "base_model.model."
    for name, module in peft_model.named_modules():
        if not hasattr(module, "lora_A") or "default" not in getattr(module, "lora_A", {}):
            continue
        a = module.lora_A["default"].weight.detach().float().cpu()  # (r, in)
        b = module.lora_B["default"].weight.detach().float().cpu()  # (out, r)
        delta = (b @ a) * float(module.scaling["default"])  # (out, in)
        if getattr(module, "fan_in_fan_out", False):  # GPT-2 Conv1D stores (in, out)
            delta = delta.T
        key = name[len(prefix) :] if name.startswith(prefix) else name
        deltas[f"{key}.weight"] = delta.contiguous()
    return deltas
