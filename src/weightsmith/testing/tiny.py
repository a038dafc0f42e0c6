"""Tiny, deterministic Hugging Face checkpoints built in-process (no hub access)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

# Small but non-degenerate: hidden 64, 2 layers, GQA where the family supports it.
TINY_ARCHS: dict[str, tuple[str, dict]] = {
    "llama": (
        "LlamaConfig",
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
             tie_word_embeddings=False),
    ),
    "qwen2": (
        "Qwen2Config",
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
             tie_word_embeddings=True),
    ),
    "gpt_neox": (
        "GPTNeoXConfig",
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, max_position_embeddings=256, tie_word_embeddings=False),
    ),
    "gpt2": (
        "GPT2Config",
        dict(n_embd=64, n_inner=128, n_layer=2, n_head=4, n_positions=256,
             bos_token_id=0, eos_token_id=0),
    ),
}  # fmt: skip

TOKENIZER_CORPUS = [
    "Once upon a time there was a little robot who wanted to learn how to merge models.",
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.",
    "Quantization rounds weights to a few bits; pruning sets the smallest ones to zero.",
    "Lily and Tom went to the park. They played with a red ball and laughed all day.",
    "A teacher model shows a small student which words come next, and the student learns.",
] * 20


def train_tiny_tokenizer(vocab_size: int = 256):
    """A byte-level BPE tokenizer trained here on a fixed corpus, as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TOKENIZER_CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
        pad_token="<|pad|>",
    )  # fmt: skip


def build_tiny_model(
    out: str | os.PathLike[str],
    arch: str = "llama",
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | int = "100KB",
    vocab_size: int = 320,
    with_tokenizer: bool = True,
    **overrides: object,
) -> Path:
    """Save a tiny seeded ``arch`` model (sharded by ``max_shard_size``) with a tokenizer.

    Weights are drawn from N(0, 0.02) with a seeded generator (not ones/eye, which hide
    transposition and ordering bugs). Returns the directory.
    """
    import transformers

    cls_name, kwargs = TINY_ARCHS[arch]
    config = getattr(transformers, cls_name)(vocab_size=vocab_size, **{**kwargs, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    model = model.to(dtype)
    out = Path(out)
    model.save_pretrained(out, max_shard_size=max_shard_size, safe_serialization=True)
    if with_tokenizer:
        train_tiny_tokenizer(min(vocab_size, 300)).save_pretrained(out)
    return out
