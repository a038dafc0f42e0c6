"""Tiny, deterministic multimodal checkpoints (Qwen2.5-VL, Gemma 3, LLaVA) built in-process
with transformers' own classes, and a hand-made image input for a forward pass (no hub
access, no image processor: the pixel tensors have the shapes each class's processor makes)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from weightsmith.testing.tiny import train_tiny_tokenizer

VOCAB = 320  # the tiny tokenizer uses ids < 300; image/special tokens sit above
IMAGE_TOKEN, START_TOKEN, END_TOKEN, VIDEO_TOKEN = 310, 311, 312, 313
_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256,
             bos_token_id=0, eos_token_id=0, pad_token_id=1)  # fmt: skip


def _configs() -> dict[str, tuple[object, str]]:
    import transformers as tf

    qwen = tf.Qwen2_5_VLConfig(
        text_config=dict(_TEXT, rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                           out_hidden_size=64, patch_size=4, spatial_merge_size=2,
                           temporal_patch_size=2, window_size=16, fullatt_block_indexes=[1]),
        image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN,
        vision_start_token_id=START_TOKEN, vision_end_token_id=END_TOKEN,
        tie_word_embeddings=False,
    )  # fmt: skip
    gemma = tf.Gemma3Config(
        text_config=dict(_TEXT, head_dim=16, sliding_window=8,
                         layer_types=["sliding_attention", "full_attention"]),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=32, patch_size=8),
        mm_tokens_per_image=4, image_token_index=IMAGE_TOKEN, boi_token_index=START_TOKEN,
        eoi_token_index=END_TOKEN,
    )  # fmt: skip
    llava = tf.LlavaConfig(
        text_config=dict(_TEXT, model_type="llama", tie_word_embeddings=False),
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2, image_size=16,
                           patch_size=8, projection_dim=32),
        image_token_index=IMAGE_TOKEN, vision_feature_layer=-2, image_seq_length=4,
        tie_word_embeddings=False,
    )  # fmt: skip
    return {
        "qwen2_5_vl": (qwen, "Qwen2_5_VLForConditionalGeneration"),
        "gemma3": (gemma, "Gemma3ForConditionalGeneration"),
        "llava": (llava, "LlavaForConditionalGeneration"),
    }


MULTIMODAL_ARCHS = ("qwen2_5_vl", "gemma3", "llava")


def model_class(kind: str) -> type:
    """The transformers class of a tiny multimodal ``kind``."""
    import transformers

    return getattr(transformers, _configs()[kind][1])


def build_tiny_multimodal(
    out: str | os.PathLike[str],
    kind: str,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    vision_seed: int | None = None,
) -> Path:
    """Save a tiny seeded multimodal ``kind`` (one of :data:`MULTIMODAL_ARCHS`) with a tokenizer.

    Every parameter is drawn from N(0, 0.02) with a generator seeded by ``seed``; the vision
    tower and projector (every tensor outside the text decoder) by ``vision_seed`` (default:
    ``seed``), so two models can share a vision tower and differ in their text decoders."""
    config, _ = _configs()[kind]
    torch.manual_seed(seed)
    model = model_class(kind)(config)
    text = torch.Generator().manual_seed(seed)
    vision = torch.Generator().manual_seed(seed if vision_seed is None else vision_seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            gen = text if "language_model" in name or name.startswith("lm_head") else vision
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    model = model.to(dtype)
    out = Path(out)
    model.save_pretrained(out, max_shard_size="100KB", safe_serialization=True)
    train_tiny_tokenizer(300).save_pretrained(out)
    return out


def image_inputs(kind: str, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """A forward pass's inputs with one image: text tokens around the image tokens, and pixel
    values (seeded) in the shapes the class's image processor produces."""
    gen = torch.Generator().manual_seed(seed)
    before, after = [5, 17, 42, 99], [3, 250, 7, 64, 128, 11]
    if kind == "qwen2_5_vl":  # 4x4 patches of 3x2x4x4 values, merged 2x2: 4 image tokens
        pixels = torch.randn(16, 3 * 2 * 4 * 4, generator=gen)
        ids = [*before, START_TOKEN, *[IMAGE_TOKEN] * 4, END_TOKEN, *after]
        extra = {"image_grid_thw": torch.tensor([[1, 4, 4]])}
    elif kind == "gemma3":  # 32x32 image, 4x4 patches pooled to 4 tokens
        pixels = torch.randn(1, 3, 32, 32, generator=gen)
        ids = [*before, START_TOKEN, *[IMAGE_TOKEN] * 4, END_TOKEN, *after]
        extra = {"token_type_ids": torch.tensor([[int(i == IMAGE_TOKEN) for i in ids]])}
    elif kind == "llava":  # 16x16 image, 2x2 patches (the CLS token dropped): 4 tokens
        pixels = torch.randn(1, 3, 16, 16, generator=gen)
        ids = [*before, *[IMAGE_TOKEN] * 4, *after]
        extra = {}
    else:
        raise ValueError(f"unknown multimodal kind {kind!r}")
    return {"input_ids": torch.tensor([ids]), "pixel_values": pixels, **extra}
