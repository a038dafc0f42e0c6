"""A checkpoint's tokenizer as GGUF metadata, the way llama.cpp's ``convert_hf_to_gguf.py``
writes it.

Two kinds are represented:

- **SentencePiece-style BPE** (``tokenizer.json`` with a byte-fallback BPE model and a
  ``Sequence`` decoder: Llama 2, TinyLlama, stories): ``tokenizer.ggml.model = "llama"``,
  pre-tokenizer ``default``, tokens with scores and types (byte tokens ``<0xNN>`` BYTE, special
  tokens CONTROL), as llama.cpp's ``_set_vocab_llama_hf``. Where llama.cpp writes a placeholder
  score of -1000 for every token, the score here is minus the merge rank that makes the token
  (0 for bytes and control tokens), so SentencePiece-style merging by score (llama.cpp's SPM
  tokenizer, transformers' GGUF loader) reproduces the source's merge order.
- **GPT-2-style byte-level BPE** (SmolLM2, Qwen2/3, Llama 3): ``tokenizer.ggml.model = "gpt2"``,
  tokens in byte-level spelling, NORMAL/CONTROL/USER_DEFINED types, ``[PADn]`` UNUSED fill up to
  the model's vocabulary, the merges, and the pre-tokenizer name llama.cpp gives that split rule.

Special token ids, add-BOS/EOS flags, merges and the chat template come from ``gguf.SpecialVocab``
(the ggml project's own reader of ``tokenizer_config.json``/``tokenizer.json``/``config.json``).
Anything else is refused in one line before a byte is written.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import gguf

from weightsmith.errors import ConfigError

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLIT_NAMES = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@dataclass
class Vocab:
    """Everything ``tokenizer.*`` in the GGUF holds."""

    model: str  # "llama" | "gpt2"
    pre: str
    tokens: list[str]
    types: list[int]
    scores: list[float] | None
    special: gguf.SpecialVocab
    add_space_prefix: bool | None = None  # None: llama.cpp's default for the model (true)

    def add_to(self, w: gguf.GGUFWriter) -> None:
        w.add_tokenizer_model(self.model)
        w.add_tokenizer_pre(self.pre)
        if self.add_space_prefix is not None:
            w.add_add_space_prefix(self.add_space_prefix)
        w.add_token_list(self.tokens)
        if self.scores is not None:
            w.add_token_scores(self.scores)
        w.add_token_types(self.types)
        self.special.add_to_gguf(w, quiet=True)


def read_vocab(root: Path, config: dict) -> Vocab:
    """The tokenizer beside a checkpoint, or a one-line refusal of one GGUF cannot hold."""
    path = root / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(
            f"{root}: no tokenizer.json; a GGUF needs the tokenizer (save it beside the model)"
        )
    tok = json.loads(path.read_text(encoding="utf-8"))
    model = tok.get("model") or {}
    n_vocab = int(config.get("vocab_size") or 0)
    if model.get("type") == "BPE" and model.get("byte_fallback") and _decoder(tok) == "Sequence":
        return _llama_vocab(root, tok, n_vocab)
    if model.get("type") == "BPE" and not model.get("byte_fallback"):
        pre = _pre_name(tok.get("pre_tokenizer"))
        if pre is not None and _byte_level(tok):
            return _gpt2_vocab(root, tok, pre, n_vocab)
    raise ConfigError(
        f"tokenizer {model.get('type')!r} (pre-tokenizer {_describe(tok.get('pre_tokenizer'))}) "
        "cannot be represented in GGUF by weightsmith (supported: SentencePiece-style "
        "byte-fallback BPE, GPT-2-style byte-level BPE)"
    )


def _decoder(tok: dict) -> str | None:
    return (tok.get("decoder") or {}).get("type")


def _byte_level(tok: dict) -> bool:
    return "ByteLevel" in json.dumps(tok.get("decoder"))


def _describe(pre: dict | None) -> str:
    if not pre:
        return "none"
    if pre.get("type") == "Sequence":
        return "+".join(p.get("type", "?") for p in pre.get("pretokenizers", []))
    return str(pre.get("type"))


def _pre_name(pre: dict | None) -> str | None:
    """llama.cpp's name for a byte-level pre-tokenizer (it hashes a test text; this reads the
    rule itself), or None when it is not one llama.cpp runs."""
    if not pre:
        return None
    if pre.get("type") == "ByteLevel":
        plain = pre.get("use_regex", True) and not pre.get("add_prefix_space")
        return "gpt-2" if plain else None
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    kinds = [p.get("type") for p in parts]
    if kinds and kinds[-1] == "ByteLevel" and parts[-1].get("add_prefix_space"):
        return None  # llama.cpp's byte-level pre-tokenizers never add a leading space
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm" if parts[1].get("use_regex", True) else None
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        pattern = (parts[0].get("pattern") or {}).get("Regex")
        return _SPLIT_NAMES.get(pattern)
    return None


def _llama_vocab(root: Path, tok: dict, n_vocab: int) -> Vocab:
    vocab: dict[str, int] = tok["model"]["vocab"]
    added = {a["content"]: a for a in tok.get("added_tokens", [])}
    for content, a in added.items():
        vocab.setdefault(content, a["id"])
    by_id = {i: t for t, i in vocab.items()}
    merges = tok["model"].get("merges") or []
    rank = {}
    for r, m in enumerate(merges):
        left, right = m if isinstance(m, list) else m.split(" ", 1)
        rank.setdefault(left + right, r)
    size = max(n_vocab, max(by_id) + 1)
    tokens, scores, types = [], [], []
    for i in range(size):
        text = by_id.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            scores.append(-1000.0)
            types.append(int(gguf.TokenType.UNUSED))
        elif _BYTE_TOKEN.fullmatch(text):
            tokens.append(text)
            scores.append(0.0)
            types.append(int(gguf.TokenType.BYTE))
        elif text in added and added[text].get("special"):
            tokens.append(text)
            scores.append(0.0)
            types.append(int(gguf.TokenType.CONTROL))
        elif text in added:  # an added, non-special token: llama.cpp matches it whole
            tokens.append(text)
            scores.append(-1000.0)
            types.append(int(gguf.TokenType.USER_DEFINED))
        else:
            tokens.append(text)
            scores.append(-float(rank.get(text, len(merges) + i)))
            types.append(int(gguf.TokenType.NORMAL))
    special = _special(root, False, len(tokens))
    prefix = None if _prepends_space(tok) else False  # Gemma's tokenizer adds no leading "▁"
    return Vocab("llama", "default", tokens, types, scores, special, prefix)


def _prepends_space(tok: dict) -> bool:
    """Whether the SentencePiece-style tokenizer puts "▁" before the text (a ``Prepend``
    normalizer, or a ``Metaspace`` pre-tokenizer that prepends), as llama.cpp's
    ``add_space_prefix`` does."""
    if '"Prepend"' in json.dumps(tok.get("normalizer")):
        return True
    pre = tok.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    return any(
        p.get("type") == "Metaspace"
        and p.get("prepend_scheme", "always" if p.get("add_prefix_space", True) else "never")
        != "never"
        for p in parts
    )


def _looks_special(text: str) -> bool:
    """llama.cpp's ``does_token_look_special``."""
    return (
        text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (text.startswith("<|") and text.endswith("|>"))
        or (text.startswith("<\uff5c") and text.endswith("\uff5c>"))
        or (text.startswith("<unused") and text.endswith(">"))
    )


def _gpt2_vocab(root: Path, tok: dict, pre: str, n_vocab: int) -> Vocab:
    vocab: dict[str, int] = dict(tok["model"]["vocab"])
    added = {a["id"]: a for a in tok.get("added_tokens", [])}
    for i, a in added.items():
        vocab[a["content"]] = i
    by_id = {i: t for t, i in vocab.items()}
    size = max(n_vocab, max(by_id) + 1)
    tokens, types = [], []
    for i in range(size):
        text = by_id.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
        elif i in added:
            tokens.append(text)
            special = added[i].get("special") or _looks_special(text)
            types.append(int(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED))
        else:
            tokens.append(text)
            types.append(int(gguf.TokenType.NORMAL))
    return Vocab("gpt2", pre, tokens, types, None, _special(root, True, len(tokens)))


def _special(root: Path, merges: bool, n_vocab: int) -> gguf.SpecialVocab:
    """gguf.SpecialVocab, without its warnings about templates it only half parses."""
    log = logging.getLogger("gguf.vocab")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        return gguf.SpecialVocab(root, load_merges=merges, n_vocab=n_vocab)
    finally:
        log.setLevel(level)
