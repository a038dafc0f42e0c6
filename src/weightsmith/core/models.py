"""Load causal LMs and their tokenizers (transformers) for training, generation and evaluation."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from weightsmith.errors import CheckpointError


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
