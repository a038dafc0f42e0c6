"""Measure models: perplexity on a text file, and divergence from a reference model."""

from weightsmith.evaluate.perplexity import PerplexityResult, perplexity, token_windows

__all__ = ["PerplexityResult", "perplexity", "token_windows"]
