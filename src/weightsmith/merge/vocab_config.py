"""The vocabulary keys of a mergekit recipe: ``tokenizer_source``, ``tokenizer:`` and
``chat_template``, parsed into frozen dataclasses with mergekit 0.1.5's schema and defaults.

``tokenizer_source: base | union | <model>`` and the ``tokenizer:`` block (``source`` defaults
to ``union``; per-token ``source`` is a model, ``{kind: model_token, model, token | token_id}``
or ``{kind: zero}``, with ``force``; ``pad_to_multiple_of``) exclude each other, as in mergekit.
``chat_template`` is ``auto``, a built-in name (:data:`BUILTIN_TEMPLATES`) or a literal Jinja
template, which must parse.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from weightsmith.errors import ConfigError

UNION, BASE = "union", "base"
ZERO, MODEL, MODEL_TOKEN = "zero", "model", "model_token"

# Built-in chat templates by name (weightsmith's own text; they render exactly like mergekit
# 0.1.5's files of the same name, tested; mergekit's llama3 puts a newline after each turn).
BUILTIN_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
        "message['content'] + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama3": (
        "{% for message in messages %}{% if loop.first %}{{ bos_token }}{% endif %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + "
        "message['content'] | trim + '<|eot_id|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
        "{% endif %}"
    ),
}


@dataclass(frozen=True)
class TokenSource:
    """Where a token's embedding row comes from: a model's row for the same token
    (``model``), a named token/id of a model (``model_token``), or zeros (``zero``)."""

    kind: str
    model: str | None = None
    token: str | None = None
    token_id: int | None = None


@dataclass(frozen=True)
class TokenEmbedding:
    source: TokenSource | None = None
    force: bool = False


@dataclass(frozen=True)
class TokenizerSpec:
    """The output vocabulary: ``source`` is ``union``, ``base`` or a model reference."""

    source: str = UNION
    tokens: tuple[tuple[str, TokenEmbedding], ...] = ()
    pad_to_multiple_of: int | None = None

    def models(self) -> list[str]:
        refs = [] if self.source in (UNION, BASE) else [self.source]
        return refs + [e.source.model for _, e in self.tokens if e.source and e.source.model]

    def resolved(self, resolve: Callable[[str], str]) -> TokenizerSpec:
        source = self.source if self.source in (UNION, BASE) else resolve(self.source)
        tokens = tuple(
            (tok, replace(e, source=_resolved_source(e.source, resolve))) for tok, e in self.tokens
        )
        return replace(self, source=source, tokens=tokens)

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"source": self.source}
        if self.tokens:
            out["tokens"] = {tok: _embedding_dict(e) for tok, e in self.tokens}
        if self.pad_to_multiple_of:
            out["pad_to_multiple_of"] = self.pad_to_multiple_of
        return out


def _resolved_source(src: TokenSource | None, resolve: Callable[[str], str]):
    if src is None or src.model is None:
        return src
    return replace(src, model=resolve(src.model))


def _embedding_dict(e: TokenEmbedding) -> dict:
    out: dict[str, Any] = {}
    s = e.source
    if s is not None:
        if s.kind == MODEL:
            out["source"] = s.model
        elif s.kind == ZERO:
            out["source"] = {"kind": ZERO}
        else:
            key = ("token", s.token) if s.token is not None else ("token_id", s.token_id)
            out["source"] = {"kind": MODEL_TOKEN, "model": s.model, key[0]: key[1]}
    if e.force:
        out["force"] = True
    return out


# ---------------------------------------------------------------------- parsing
def parse_tokenizer_source(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: tokenizer_source must be 'base', 'union' or a model")
    return value


def parse_tokenizer_block(data: Any, where: str) -> TokenizerSpec | None:
    """mergekit's ``tokenizer:`` block (TokenizerConfig) as a :class:`TokenizerSpec`."""
    if data is None:
        return None
    w = f"{where}: tokenizer"
    if not isinstance(data, Mapping):
        raise ConfigError(f"{w}: expected a mapping")
    bad = sorted(set(data) - {"source", "tokens", "pad_to_multiple_of"})
    if bad:
        raise ConfigError(f"{w}: unknown key(s) {', '.join(bad)}")
    source = parse_tokenizer_source(data.get("source", UNION), f"{w}.source") or UNION
    pad = data.get("pad_to_multiple_of")
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 1):
        raise ConfigError(f"{w}.pad_to_multiple_of: expected a positive integer, got {pad!r}")
    tokens = data.get("tokens") or {}
    if not isinstance(tokens, Mapping):
        raise ConfigError(f"{w}.tokens: expected a mapping of token -> settings")
    parsed = tuple(
        (str(tok), _parse_embedding(cfg, f"{w}.tokens[{tok!r}]")) for tok, cfg in tokens.items()
    )
    return TokenizerSpec(source, parsed, pad)


def _parse_embedding(cfg: Any, where: str) -> TokenEmbedding:
    if cfg is None:
        return TokenEmbedding()
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"{where}: expected a mapping with 'source' and/or 'force'")
    bad = sorted(set(cfg) - {"source", "force"})
    if bad:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(bad)}")
    force = cfg.get("force", False)
    if not isinstance(force, bool):
        raise ConfigError(f"{where}.force: expected true or false")
    return TokenEmbedding(_parse_source(cfg.get("source"), f"{where}.source"), force)


def _parse_source(src: Any, where: str) -> TokenSource | None:
    if src is None:
        return None
    if isinstance(src, str) and src:
        return TokenSource(MODEL, model=src)
    if not isinstance(src, Mapping) or src.get("kind") not in (ZERO, MODEL_TOKEN):
        raise ConfigError(
            f"{where}: expected a model, {{kind: zero}} or {{kind: model_token, model, token}}"
        )
    if src["kind"] == ZERO:
        if set(src) != {"kind"}:
            raise ConfigError(f"{where}: kind zero takes no other keys")
        return TokenSource(ZERO)
    bad = sorted(set(src) - {"kind", "model", "token", "token_id"})
    if bad:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(bad)}")
    model, token, token_id = src.get("model"), src.get("token"), src.get("token_id")
    if not isinstance(model, str) or not model:
        raise ConfigError(f"{where}: model_token needs 'model'")
    if (token is None) == (token_id is None):
        raise ConfigError(f"{where}: give exactly one of 'token' or 'token_id'")
    if token_id is not None and (isinstance(token_id, bool) or not isinstance(token_id, int)):
        raise ConfigError(f"{where}.token_id: expected an integer")
    return TokenSource(MODEL_TOKEN, model, None if token is None else str(token), token_id)


def check_chat_template(value: Any, where: str) -> str | None:
    """``auto``, a built-in name, or a literal template that parses (as mergekit: a literal
    has at least 20 characters and a ``{``)."""
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: chat_template must be a string")
    if value == "auto" or value in BUILTIN_TEMPLATES:
        return value
    if len(value) < 20 or "{" not in value:
        names = ", ".join(["auto", *BUILTIN_TEMPLATES])
        raise ConfigError(
            f"{where}: chat_template {value!r} is neither a built-in name ({names}) nor a template"
        )
    import jinja2

    try:
        jinja2.Environment().parse(value)
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(
            f"{where}: chat_template does not parse (line {e.lineno}: {e.message})"
        ) from None
    return value
