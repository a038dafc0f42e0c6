"""Helpers for tests, demos and benchmarks: tiny seeded models, a trained tokenizer, and the
location of the real models and text in ``../shared``. Nothing here downloads anything."""

from weightsmith.testing.shared import shared_dir, shared_model, shared_text, smollm2_dir
from weightsmith.testing.tiny import TINY_ARCHS, build_tiny_model, train_tiny_tokenizer

__all__ = [
    "TINY_ARCHS",
    "build_tiny_model",
    "shared_dir",
    "shared_model",
    "shared_text",
    "smollm2_dir",
    "train_tiny_tokenizer",
]
