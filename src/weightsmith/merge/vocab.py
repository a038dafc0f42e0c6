"""Vocabulary-aware merging: the output tokenizer and, per input model, where each output
token's embedding row comes from — mergekit 0.1.5's ``BuildTokenizer`` semantics.

- ``base``: the base model's tokenizer, stripped of ids >= its config's ``vocab_size``;
- ``union``: the base tokenizer plus every token of the other models it lacks (as added
  tokens, base first, then the models in recipe order, each by id), then every model's
  added tokens. mergekit takes the same tokens, but its order of models is a Python set's and
  its order of tokens the tokenizer's hash map's, so with more than two models its new ids
  vary from run to run; weightsmith's do not;
- a model: that model's tokenizer.
Tokens the ``tokenizer:`` block names are added when missing. A permutation maps each output
id to the model's own id, or -1 when the model lacks the token (ids >= the model's
``vocab_size`` do not count).
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from weightsmith.errors import CheckpointError, ConfigError
from weightsmith.merge.recipe import has_adapter, split_reference
from weightsmith.merge.vocab_config import BASE, BUILTIN_TEMPLATES, UNION, TokenizerSpec


@dataclass
class Vocabulary:
    """The merged vocabulary: ``tokenizer`` (a transformers tokenizer), ``vocab`` (token ->
    output id), ``size`` (rows of the output embedding: ``len(vocab)`` padded to the asked
    multiple), per-model ``perms`` (output id -> model id or -1) and original vocabularies."""

    tokenizer: Any
    vocab: dict[str, int]
    size: int
    perms: dict[str, np.ndarray]
    original: dict[str, dict[str, int]]


@dataclass
class VocabMerge:
    """What the engine needs to map a vocabulary tensor's rows: the merged vocabulary, the
    recipe's vocabulary settings and the base model (None without one)."""

    vocabulary: Vocabulary
    spec: TokenizerSpec
    base: str | None

    def rows(self, tensors: Sequence[Any], models: Sequence[str]) -> list[Any]:
        return permuted_rows(tensors, models, self.vocabulary, self.spec, self.base)


def load_tokenizer(path: str) -> Any:
    """The fast tokenizer saved with a model (no remote code, nothing downloaded); for
    ``MODEL+ADAPTER``, the model's."""
    import transformers

    if has_adapter(path):
        path = split_reference(path)[0]

    try:
        return transformers.AutoTokenizer.from_pretrained(
            path, use_fast=True, local_files_only=True
        )
    except Exception as e:  # transformers raises many kinds here; the message says which
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: cannot load its tokenizer ({first})") from None


def stripped_tokenizer(path: str, vocab_size: int) -> Any:
    """``path``'s tokenizer without the tokens whose ids are >= ``vocab_size``."""
    import json

    import tokenizers

    tok = load_tokenizer(path)
    unused = {t for t, i in tok.get_vocab().items() if i >= vocab_size}
    if not unused:
        return tok
    data = json.loads(tok.backend_tokenizer.to_str())
    if data["model"]["type"] != "BPE":
        raise CheckpointError(
            f"{path}: its tokenizer ({data['model']['type']}) has tokens past vocab_size "
            f"{vocab_size}; only BPE tokenizers can be stripped for a vocabulary merge"
        )
    data["added_tokens"] = [e for e in data["added_tokens"] if e["id"] < vocab_size]
    for t in unused:
        data["model"]["vocab"].pop(t, None)
    data["model"]["merges"] = [m for m in data["model"]["merges"] if not _uses(m, unused)]
    tok._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(data))
    return tok


def _uses(merge: Any, unused: set[str]) -> bool:
    parts = merge.split(" ") if isinstance(merge, str) else list(merge)
    return any(p in unused for p in parts)


def union_tokenizer(base_tok: Any, toks: Mapping[str, tuple[Any, int]]) -> Any:
    """The base tokenizer plus every token the others have (``toks``: model -> (tokenizer,
    vocab_size), base first)."""
    out_vocab: dict[str, int] = {}
    out_added: dict[str, Any] = {}
    for tok, vocab_size in toks.values():
        added = tok.added_tokens_decoder
        added_names = {info.content for info in added.values()}
        for t, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if i < vocab_size and t not in added_names and t not in out_vocab:
                out_vocab[t] = len(out_vocab)
        for i, info in sorted(added.items()):
            if i < vocab_size and info.content not in out_added:
                out_added[info.content] = info
    res = _copy_tokenizer(base_tok)
    base_vocab = base_tok.get_vocab()
    for t in out_vocab:
        if t not in out_added and t not in base_vocab:
            res.add_tokens(t)
    for info in out_added.values():
        res.add_tokens(info)
    return res


def _copy_tokenizer(tok: Any) -> Any:
    import transformers

    with tempfile.TemporaryDirectory() as d:
        tok.save_pretrained(d)
        return transformers.AutoTokenizer.from_pretrained(d, use_fast=True, local_files_only=True)


def build_vocabulary(
    spec: TokenizerSpec, base: str, models: Sequence[str], vocab_sizes: Mapping[str, int]
) -> Vocabulary:
    """The output tokenizer and per-model permutations for ``models`` (``base`` first)."""
    base_tok = stripped_tokenizer(base, vocab_sizes[base])
    toks: dict[str, tuple[Any, int]] = {base: (base_tok, vocab_sizes[base])}
    for m in models:
        if m not in toks:
            toks[m] = (load_tokenizer(m), vocab_sizes[m])
    if spec.source == BASE:
        out = base_tok
    elif spec.source == UNION:
        out = union_tokenizer(base_tok, toks)
    else:
        out = load_tokenizer(spec.source)
    existing = set(out.get_vocab())
    for t, _ in spec.tokens:
        if t not in existing:
            out.add_tokens(t)
            existing.add(t)
    vocab = out.get_vocab()
    size = len(vocab)
    if spec.pad_to_multiple_of and size % spec.pad_to_multiple_of:
        size += spec.pad_to_multiple_of - size % spec.pad_to_multiple_of
    perms = {m: _permutation(vocab, toks[m][0].get_vocab(), vocab_sizes[m]) for m in toks}
    original = {m: t.get_vocab() for m, (t, _) in toks.items()}
    return Vocabulary(out, vocab, size, perms, original)


def _permutation(vocab: Mapping[str, int], model_vocab: Mapping[str, int], n: int) -> np.ndarray:
    """Output id -> the model's id for the same token, -1 where it lacks it (or past ``n``)."""
    p = np.full(max(vocab.values(), default=-1) + 1, -1, dtype=np.int64)
    for t, i in vocab.items():
        j = model_vocab.get(t)
        if j is not None and j < n:
            p[i] = j
    return p


def set_chat_template(tokenizer: Any, template: str | None, models: Sequence[str]) -> str | None:
    """Put ``template`` on ``tokenizer`` (``auto``: the most common one among ``models``,
    first seen on a tie; a built-in name; or the literal text). Returns the template set."""
    if not template:
        return None
    if template == "auto":
        from collections import Counter

        found = []
        for m in models:
            t = load_tokenizer(m).chat_template
            t = t.get("default") if isinstance(t, dict) else t
            if t:
                found.append(t.strip())
        if not found:
            return None
        template = Counter(found).most_common(1)[0][0]
    template = BUILTIN_TEMPLATES.get(template, template)
    tokenizer.chat_template = template
    return template


def tokenizer_files(tokenizer: Any) -> dict[str, bytes]:
    """The files ``tokenizer.save_pretrained`` writes, by name."""
    with tempfile.TemporaryDirectory() as d:
        tokenizer.save_pretrained(d)
        return {p.name: p.read_bytes() for p in sorted(Path(d).iterdir()) if p.is_file()}


def check_token_sources(spec: TokenizerSpec, models: Sequence[str]) -> None:
    """Every model a ``tokenizer.tokens`` entry names must be one of the merged models."""
    for tok, e in spec.tokens:
        if e.source is not None and e.source.model is not None and e.source.model not in models:
            raise ConfigError(
                f"tokenizer.tokens[{tok!r}]: source model {e.source.model} is not one of the "
                "models being merged"
            )


# ---------------------------------------------------------------------- embedding rows
def permuted_rows(
    tensors: Sequence[Any],
    models: Sequence[str],
    vocab: Vocabulary,
    spec: TokenizerSpec,
    base: str | None,
) -> list[Any]:
    """Each model's vocabulary tensor (rows = its ids) re-indexed by the output vocabulary,
    in the tensors' dtype, as mergekit's ``PermutedVocabulary``: a row the model lacks (or a
    forced token) gets the token's default — the one model that has it, the base when it has
    it, the average of the models that have it, zeros, or what ``tokenizer.tokens`` says;
    padding rows get the mean of the real ones."""
    import torch

    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    rows = dict(zip(models, (t.to(dtype) for t in tensors), strict=True))
    configs = dict(spec.tokens)
    average = _assign_sources(vocab, models, configs, base)
    defaults = _default_rows(rows, vocab, configs, average, models)
    n, shape = len(vocab.vocab), tuple(tensors[0].shape[1:])
    out = []
    for m in models:
        new = torch.zeros((vocab.size, *shape), dtype=dtype)
        p = vocab.perms[m]
        forced = {tok for tok, e in configs.items() if e.force}
        for tok, i in vocab.vocab.items():
            if p[i] >= 0 and tok not in forced:
                new[i] = rows[m][int(p[i])]
            elif tok in defaults:
                new[i] = defaults[tok]
            else:
                raise ConfigError(f"no embedding for token {tok!r} in {m}; give it a source")
        if vocab.size > n:
            new[n:] = torch.mean(new[:n], dim=0)
        out.append(new)
    return out


def _assign_sources(vocab: Vocabulary, models: Sequence[str], configs: dict, base: str | None):
    """Fill ``configs`` with each partly-present token's source; return the tokens averaged."""
    from weightsmith.merge.vocab_config import MODEL, ZERO, TokenEmbedding, TokenSource

    average = set()
    for tok, i in vocab.vocab.items():
        if tok in configs:
            continue
        has = [vocab.perms[m][i] >= 0 for m in models]
        if sum(has) == 1:
            configs[tok] = TokenEmbedding(TokenSource(MODEL, models[has.index(True)]))
        elif sum(has) == 0:
            configs[tok] = TokenEmbedding(TokenSource(ZERO))
        elif base in models and vocab.perms[base][i] >= 0:
            configs[tok] = TokenEmbedding(TokenSource(MODEL, base))
        else:
            average.add(tok)
    return average


def _default_rows(rows: dict, vocab: Vocabulary, configs: dict, average: set, models):
    defaults = {}
    for tok, i in vocab.vocab.items():
        cfg = configs.get(tok)
        if not (cfg and cfg.force) and all(vocab.perms[m][i] >= 0 for m in models):
            continue
        if tok in average:
            acc, count = None, 0
            for m in models:
                j = vocab.perms[m][i]
                if j >= 0:
                    row = rows[m][int(j)]
                    acc = row.clone() if acc is None else acc + row
                    count += 1
            defaults[tok] = acc / count
        elif cfg is not None:
            defaults[tok] = _source_row(rows, vocab, tok, i, cfg)
    return defaults


def _source_row(rows: dict, vocab: Vocabulary, tok: str, i: int, cfg) -> Any:
    from weightsmith.merge.vocab_config import MODEL_TOKEN, ZERO

    src = cfg.source
    if src is None:
        raise ConfigError(f"tokenizer.tokens[{tok!r}]: give a 'source' for this token")
    first = next(iter(rows.values()))
    if src.kind == ZERO:
        return first.new_zeros(first.shape[1:])
    if src.model not in rows:
        raise ConfigError(f"token {tok!r}: source model {src.model} is not being merged")
    table = rows[src.model]
    if src.kind == MODEL_TOKEN:
        j = src.token_id
        if j is None:
            j = vocab.original[src.model].get(src.token)
            if j is None:
                raise ConfigError(
                    f"token {tok!r}: {src.token!r} is not in {src.model}'s vocabulary"
                )
        if not 0 <= j < table.shape[0]:
            raise ConfigError(f"token {tok!r}: token_id {j} is out of range for {src.model}")
        return table[j]
    j = vocab.perms[src.model][i]
    if j < 0:
        raise ConfigError(f"token {tok!r} is not in {src.model}'s vocabulary")
    return table[int(j)]


# ---------------------------------------------------------------------- recipe level
def vocab_size_of(ckpt: Any) -> int:
    """The config's ``vocab_size`` (top level or ``text_config``), else the embedding rows."""
    config = ckpt.config or {}
    for cfg in (config, config.get("text_config") or {}):
        if isinstance(cfg.get("vocab_size"), int):
            return cfg["vocab_size"]
    names = [n for n in ckpt.arch.embed if n in ckpt.tensors]
    if not names:
        raise CheckpointError(f"{ckpt.path}: no vocab_size in config.json and no embedding")
    return ckpt.tensors[names[0]].shape[0]


def plan_vocabulary(recipe: Any, ckpts: Mapping[str, Any]) -> VocabMerge | None:
    """The merged vocabulary a (resolved) recipe asks for, or None."""
    spec = recipe.vocabulary
    if spec is None:
        return None
    models = recipe.referenced_models()
    check_token_sources(spec, models)
    base = recipe.base_model or models[0]
    sizes = {m: vocab_size_of(ckpts[m]) for m in models}
    return VocabMerge(build_vocabulary(spec, base, models, sizes), spec, recipe.base_model)


def output_tokenizer(recipe: Any, vocab: VocabMerge | None, reference: str) -> dict[str, bytes]:
    """The tokenizer files a merge writes itself (the merged vocabulary's, or the reference's
    re-saved with the asked chat template), or {} when the reference's files are copied."""
    if vocab is not None:
        tok = vocab.vocabulary.tokenizer
    elif recipe.chat_template:
        tok = load_tokenizer(reference)
    else:
        return {}
    set_chat_template(tok, recipe.chat_template, recipe.referenced_models())
    return tokenizer_files(tok)
