"""Merge recipes: mergekit's YAML schema as frozen dataclasses, validated strictly.

Every CLI command builds a :class:`MergeRecipe`; ``merge run`` reads one from mergekit YAML.
Unknown keys, unsupported methods and unknown parameters are errors, never ignored. The
resolved recipe (absolute paths) is written beside the merged weights as ``mergekit_config.yml``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from weightsmith.errors import ConfigError
from weightsmith.merge.methods import MERGE_METHODS, get_method
from weightsmith.merge.params import BOOL, Param, check_declared, check_setting
from weightsmith.merge.vocab_config import (
    BASE,
    UNION,
    TokenizerSpec,
    check_chat_template,
    parse_tokenizer_block,
    parse_tokenizer_source,
)

RECIPE_VERSION = 1
PASSTHROUGH = "passthrough"
PASSTHROUGH_DECLARED = (Param("scale", 1.0, help="factor applied to the copied tensor"),)
PASSTHROUGH_PARAMS = {p.name for p in PASSTHROUGH_DECLARED}
# Accepted for compatibility; they change nothing here (say so in the docs).
NO_OP_DECLARED = (Param("int8_mask", False, kind=BOOL),)
NO_OP_PARAMS = {p.name for p in NO_OP_DECLARED}
TOP_KEYS = {
    "merge_method",
    "models",
    "slices",
    "base_model",
    "parameters",
    "dtype",
    "out_dtype",
    "compute_dtype",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
    "name",
}
UNSUPPORTED_KEYS = {"modules": "multi-module merges"}
DTYPES = {"float32", "float16", "bfloat16"}
LORA_SEPARATOR = "+"  # MODEL+ADAPTER: a model with a PEFT LoRA adapter folded in


@dataclass(frozen=True)
class ModelInput:
    """One model of a ``models:`` recipe, with its own parameters (weight, density, ...)."""

    model: str
    parameters: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class InputSlice:
    """Layers ``[start, end)`` of one model feeding an output slice."""

    model: str
    layer_range: tuple[int, int]
    parameters: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OutputSlice:
    sources: tuple[InputSlice, ...]
    base_model: str | None = None
    parameters: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MergeRecipe:
    """A complete merge: method, inputs, parameters and output dtype (mergekit's schema)."""

    merge_method: str
    models: tuple[ModelInput, ...] = ()
    slices: tuple[OutputSlice, ...] = ()
    base_model: str | None = None
    parameters: Mapping[str, Any] = field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    version: int = RECIPE_VERSION
    # weightsmith's own key: the arithmetic's dtype when it must not be ``dtype`` (mergekit
    # computes in ``dtype``, else in the inputs' dtype); ``float32`` keeps the exact arithmetic
    compute_dtype: str | None = None
    tokenizer: TokenizerSpec | None = None  # mergekit's ``tokenizer:`` block
    chat_template: str | None = None

    # ------------------------------------------------------------------ derived
    @property
    def vocabulary(self) -> TokenizerSpec | None:
        """The output vocabulary asked for (``tokenizer:`` or ``tokenizer_source``), or None:
        the reference model's vocabulary, rows merged by id."""
        if self.tokenizer is not None:
            return self.tokenizer
        if self.tokenizer_source is not None:
            return TokenizerSpec(self.tokenizer_source)
        return None

    @property
    def output_dtype(self) -> str | None:
        return self.out_dtype or self.dtype

    def referenced_models(self) -> list[str]:
        refs = [m.model for m in self.models]
        for s in self.slices:
            refs += [src.model for src in s.sources]
            if s.base_model:
                refs.append(s.base_model)
        if self.base_model:
            refs.append(self.base_model)
        return list(dict.fromkeys(refs))

    def to_dict(self) -> dict:
        """The recipe as mergekit YAML data (defaults left out)."""
        out: dict[str, Any] = {"merge_method": self.merge_method}
        if self.base_model:
            out["base_model"] = self.base_model
        if self.models:
            out["models"] = [_model_dict(m.model, m.parameters) for m in self.models]
        if self.slices:
            out["slices"] = [
                {
                    "sources": [
                        {
                            **_model_dict(s.model, s.parameters),
                            "layer_range": list(s.layer_range),
                        }
                        for s in sl.sources
                    ],
                    **({"base_model": sl.base_model} if sl.base_model else {}),
                    **({"parameters": dict(sl.parameters)} if sl.parameters else {}),
                }
                for sl in self.slices
            ]
        if self.parameters:
            out["parameters"] = _plain(dict(self.parameters))
        for key in ("dtype", "out_dtype", "compute_dtype", "tokenizer_source"):
            if getattr(self, key):
                out[key] = getattr(self, key)
        if self.tokenizer is not None:
            out["tokenizer"] = self.tokenizer.to_dict()
        if self.chat_template:
            out["chat_template"] = self.chat_template
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    def record(self) -> dict:
        """What goes into ``weightsmith.json``: the recipe plus its schema version."""
        return {**asdict(self), "mergekit": self.to_dict()}

    # ------------------------------------------------------------------ validation
    def validate(self, where: str | None = None) -> MergeRecipe:
        """Check method, inputs, parameter names and every parameter value against the
        method's declarations (``where``, e.g. the recipe file, prefixes errors); return self."""
        method = self.merge_method
        if method != PASSTHROUGH:
            get_method(method)  # unsupported -> ConfigError listing the known ones
        if bool(self.models) == bool(self.slices):
            raise ConfigError("a recipe needs exactly one of 'models' or 'slices'")
        declared = {
            p.name: p
            for p in (
                PASSTHROUGH_DECLARED
                if method == PASSTHROUGH
                else (*MERGE_METHODS[method].global_params, *MERGE_METHODS[method].model_params)
            )
        }
        declared.update({p.name: p for p in NO_OP_DECLARED})
        known = set(declared)
        levels = [("parameters", self.parameters)]
        levels += [(f"models[{i}].parameters", m.parameters) for i, m in enumerate(self.models)]
        for i, sl in enumerate(self.slices):
            levels.append((f"slices[{i}].parameters", sl.parameters))
            levels += [
                (f"slices[{i}].sources[{j}].parameters", s.parameters)
                for j, s in enumerate(sl.sources)
            ]
            lengths = {s.layer_range[1] - s.layer_range[0] for s in sl.sources}
            if len(lengths) != 1:
                raise ConfigError(f"slices[{i}]: all sources must span the same number of layers")
            if method == PASSTHROUGH and len(sl.sources) != 1:
                raise ConfigError(f"slices[{i}]: passthrough takes exactly one source per slice")
            for s in sl.sources:
                a, b = s.layer_range
                if not 0 <= a < b:
                    raise ConfigError(f"slices[{i}]: bad layer_range [{a}, {b}]")
        prefix = f"{where}: " if where else ""
        for label, params in levels:
            bad = sorted(set(params) - known)
            if bad:
                raise ConfigError(
                    f"{prefix}{label}: unknown parameter(s) {', '.join(bad)} for {method} "
                    f"(known: {', '.join(sorted(known - NO_OP_PARAMS))})"
                )
            for key, setting in params.items():
                check_declared(declared[key], setting, f"{prefix}{label}.{key}")
        if self.tokenizer_source is not None and self.tokenizer is not None:
            raise ConfigError(f"{prefix}give either 'tokenizer_source' or 'tokenizer', not both")
        check_chat_template(self.chat_template, f"{prefix}chat_template")
        for ref in self.referenced_models():
            if has_adapter(ref):
                split_reference(ref, where or "recipe")
        for key in ("dtype", "out_dtype", "compute_dtype"):
            value = getattr(self, key)
            if value is not None and value not in DTYPES:
                raise ConfigError(f"{key} {value!r}: choose from {', '.join(sorted(DTYPES))}")
        if (
            method == "linear"
            and self.base_model
            and self.models
            and self.base_model not in {m.model for m in self.models}
        ):
            raise ConfigError("linear has no base model: list it under 'models' instead")
        return self

    def resolved(self, resolve) -> MergeRecipe:
        """The same recipe with every model reference mapped through ``resolve``."""
        return replace(
            self,
            base_model=resolve(self.base_model) if self.base_model else None,
            models=tuple(replace(m, model=resolve(m.model)) for m in self.models),
            slices=tuple(
                replace(
                    sl,
                    base_model=resolve(sl.base_model) if sl.base_model else None,
                    sources=tuple(replace(s, model=resolve(s.model)) for s in sl.sources),
                )
                for sl in self.slices
            ),
            tokenizer_source=(
                resolve(self.tokenizer_source)
                if self.tokenizer_source not in (None, UNION, BASE)
                else self.tokenizer_source
            ),
            tokenizer=self.tokenizer.resolved(resolve) if self.tokenizer else None,
        )


def _model_dict(model: str, params: Mapping[str, Any]) -> dict:
    d: dict[str, Any] = {"model": model}
    if params:
        d["parameters"] = _plain(dict(params))
    return d


def _plain(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


# ---------------------------------------------------------------------- parsing
def recipe_from_dict(data: Any, where: str = "recipe") -> MergeRecipe:
    """Build a validated recipe from mergekit YAML data."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping at the top level")
    for key, what in UNSUPPORTED_KEYS.items():
        if key in data:
            raise ConfigError(f"{where}: '{key}' ({what}) is not supported")
    unknown = sorted(set(data) - TOP_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}")
    if "merge_method" not in data:
        raise ConfigError(f"{where}: missing 'merge_method'")
    models = tuple(
        ModelInput(_ref(m, f"{where}: models[{i}]"), _params(m, f"{where}: models[{i}]"))
        for i, m in enumerate(_list(data.get("models"), f"{where}: models"))
    )
    slices = []
    for i, sl in enumerate(_list(data.get("slices"), f"{where}: slices")):
        w = f"{where}: slices[{i}]"
        if not isinstance(sl, Mapping):
            raise ConfigError(f"{w}: expected a mapping")
        bad = sorted(set(sl) - {"sources", "base_model", "parameters"})
        if bad:
            raise ConfigError(f"{w}: unknown key(s) {', '.join(bad)}")
        sources = []
        for j, src in enumerate(_list(sl.get("sources"), f"{w}.sources")):
            ws = f"{w}.sources[{j}]"
            if not isinstance(src, Mapping):
                raise ConfigError(f"{ws}: expected a mapping")
            bad = sorted(set(src) - {"model", "layer_range", "parameters"})
            if bad:
                raise ConfigError(f"{ws}: unknown key(s) {', '.join(bad)}")
            lr = src.get("layer_range")
            if (
                not isinstance(lr, (list, tuple))
                or len(lr) != 2
                or not all(isinstance(x, int) for x in lr)
            ):
                raise ConfigError(f"{ws}: layer_range must be [start, end]")
            sources.append(InputSlice(_ref(src, ws), (lr[0], lr[1]), _params(src, ws)))
        if not sources:
            raise ConfigError(f"{w}: no sources")
        base = sl.get("base_model")
        slices.append(OutputSlice(tuple(sources), str(base) if base else None, _params(sl, w)))
    base = data.get("base_model")
    recipe = MergeRecipe(
        merge_method=str(data["merge_method"]),
        models=models,
        slices=tuple(slices),
        base_model=str(base) if base is not None else None,
        parameters=_params(data, where, top=True),
        dtype=data.get("dtype"),
        out_dtype=data.get("out_dtype"),
        compute_dtype=data.get("compute_dtype"),
        tokenizer_source=parse_tokenizer_source(data.get("tokenizer_source"), where),
        tokenizer=parse_tokenizer_block(data.get("tokenizer"), where),
        chat_template=data.get("chat_template"),
    )
    return recipe.validate(where)


def load_recipe(path: str | os.PathLike[str]) -> MergeRecipe:
    """Read and validate a mergekit YAML recipe file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read recipe ({e.strerror})") from None
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else "invalid YAML"
        raise ConfigError(f"{path}: invalid YAML ({first})") from None
    return recipe_from_dict(data, str(path))


def _list(value: Any, where: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(f"{where}: expected a list")
    return value


def _ref(entry: Any, where: str) -> str:
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where}: expected a mapping with 'model'")
    bad = sorted(set(entry) - {"model", "parameters", "layer_range"})
    if bad:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(bad)}")
    model = entry.get("model")
    if not isinstance(model, str) or not model:
        raise ConfigError(f"{where}: 'model' must be a path")
    return model


def has_adapter(ref: str) -> bool:
    """Whether ``ref`` is ``MODEL+ADAPTER`` (not a path that exists as named)."""
    return LORA_SEPARATOR in ref and not Path(ref).expanduser().exists()


def split_reference(ref: str, where: str = "model") -> tuple[str, str | None]:
    """``"MODEL+ADAPTER"`` (mergekit's reference to a model with a LoRA adapter folded in)
    -> ``(MODEL, ADAPTER)``; ``"MODEL"`` -> ``(MODEL, None)``."""
    parts = ref.split(LORA_SEPARATOR)
    if len(parts) == 1:
        return ref, None
    if len(parts) == 2 and all(p.strip() for p in parts):
        return parts[0], parts[1]
    raise ConfigError(f"{where}: model reference {ref!r}: expected MODEL or MODEL+ADAPTER")


def _params(entry: Mapping, where: str, top: bool = False) -> dict:
    params = entry.get("parameters") or {}
    if not isinstance(params, Mapping):
        raise ConfigError(f"{where}: 'parameters' must be a mapping")
    label = f"{where}: parameters" if top else f"{where}.parameters"
    return {str(k): check_setting(v, f"{label}.{k}") for k, v in params.items()}
