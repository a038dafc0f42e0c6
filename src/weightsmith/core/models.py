"""Load causal LMs and their tokenizers (transformers) for training, generation and evaluation."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from weightsmith.errors import CheckpointError
from weightsmith.io.reader import open_checkpoint


def load_tokenizer(path: str | os.PathLike[str]):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # transformers raises many types for a missing/odd tokenizer
        raise CheckpointError(f"{path}: cannot load its tokenizer ({type(e).__name__})") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.convert_ids_to_tokens(0)
    return tok


def auto_class(config: dict):
    """The transformers auto class that loads a model of ``config`` (config.json's dict) in its
    own class: ``AutoModelForCausalLM``, or for a multimodal model it does not map (Qwen2.5-VL,
    LLaVA) ``AutoModelForImageTextToText``, whose models also take text alone (``input_ids``
    -> ``logits`` over the text vocabulary)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    kind = config.get("model_type")
    if (
        kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        and kind in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
    ):
        return AutoModelForImageTextToText
    return AutoModelForCausalLM  # its own error names an unknown model type


# compressed-tensors formats whose weights it decompresses to bfloat16 on the fly, whatever
# the model's dtype: a float32 model of them fails in its first Linear (float != BFloat16)
BF16_FORMATS = ("nvfp4-pack-quantized", "mxfp4-pack-quantized")


def runtime_dtype(config: dict, dtype: torch.dtype) -> torch.dtype:
    """The dtype transformers can run a checkpoint in: ``dtype``, except bfloat16 for an
    NVFP4/MXFP4-packed compressed-tensors model (its Linears' weights come out in bfloat16)."""
    qc = config.get("quantization_config") or {}
    groups = (qc.get("config_groups") or {}).values()
    formats = {qc.get("format"), *(g.get("format") for g in groups if isinstance(g, dict))}
    return torch.bfloat16 if formats & set(BF16_FORMATS) else dtype


def load_causal_lm(path: str | os.PathLike[str], dtype: torch.dtype = torch.float32, **kwargs):
    """Load any checkpoint transformers can (plain, compressed-tensors, GPTQ, bitsandbytes), in
    eval mode, in its own class (:func:`auto_class`: a multimodal model for text-only use);
    ``kwargs`` go to ``from_pretrained``."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    if not (p / "config.json").is_file():
        raise CheckpointError(f"{p}: no config.json (expected a Hugging Face model folder)")
    # What weightsmith's reader refuses, transformers must not load either: pickles, headers
    # with no tensors (random weights), a config.json that disagrees with the tensors,
    # symlinks out of the folder.
    with open_checkpoint(p) as ckpt:
        auto = auto_class(ckpt.config or {})
        dtype = runtime_dtype(ckpt.config or {}, dtype)
    try:
        model = auto.from_pretrained(str(p), dtype=dtype, **kwargs)
    except Exception as e:  # transformers raises many types for unloadable checkpoints
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(
            f"{p}: transformers cannot load it ({type(e).__name__}: {msg})"
        ) from None
    return model.eval()


def load_model(
    path: str | os.PathLike[str],
    device: torch.device,
    *,
    nf4: bool = False,
    trainable: bool = False,
):
    """A causal LM in float32 (or with NF4 linear weights for QLoRA) on ``device``; frozen
    unless ``trainable``."""
    kwargs: dict = {}
    if nf4:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.float32 if device.type == "cpu" else torch.bfloat16,
            bnb_4bit_use_double_quant=False,
        )
        kwargs["device_map"] = {"": device}
    model = load_causal_lm(path, torch.float32, **kwargs)
    if not nf4:
        model.to(device)
    model.train(trainable)
    if not trainable:
        model.requires_grad_(False)
    return model


def logits_width(model) -> int:
    return int(model.get_output_embeddings().weight.shape[0])
