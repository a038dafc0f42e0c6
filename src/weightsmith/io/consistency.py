"""config.json must describe the tensors it ships with: checked once, when a checkpoint opens.

A config that disagrees with its tensors (``hidden_size`` 128 on a 64-wide model, 3 layers
declared on a 5-layer model) makes transformers fail to load the output, or worse, load it
with randomly initialised layers. Each architecture description lists which tensor dimension
each config size must equal (``config_shapes``); this module checks them all and names the
first disagreement. Unknown architectures, absent keys and absent or packed (integer)
tensors are not checked: there is nothing to compare against.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

from weightsmith.errors import CheckpointError, OutputError
from weightsmith.io.architectures import Architecture, detect_architecture

_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}  # packed/quantized tensors have other shapes


def check_config_shapes(
    config: Mapping | None,
    arch: Architecture,
    shapes: Mapping[str, tuple[tuple[int, ...], str]],
    where: str,
) -> None:
    """Refuse a config whose layer count or sizes disagree with ``shapes`` (name -> (shape,
    safetensors dtype)); ``where`` names the config file in the message."""
    if not config or not arch.known:
        return
    prefix = f"{arch.text_config}." if arch.text_config else ""  # named in the messages
    config = arch.sizes(config)  # a multimodal model's text_config
    _check_layer_count(config, arch, shapes, where, prefix)
    for expr, template, dim in arch.config_shapes:
        for name, layer in _matching(template, shapes):
            shape, dtype = shapes[name]
            if dtype not in _FLOAT_DTYPES or dim >= len(shape):
                continue
            want = _evaluate(expr, config, layer)
            if want is not None and shape[dim] != want[0]:
                raise CheckpointError(
                    f"{where}: {prefix}{want[1]} but tensor {name!r} has shape {list(shape)} "
                    f"(dim {dim} is {shape[dim]}): config.json does not match the weights"
                )


def _check_layer_count(
    config: Mapping, arch: Architecture, shapes: Mapping[str, object], where: str, prefix: str
) -> None:
    declared = config.get(arch.num_layers_key)
    if not _is_int(declared):
        return
    found = sorted({i for n in shapes if (i := arch.layer_of(n)) is not None})
    if len(found) != declared or (found and found[-1] != len(found) - 1):
        held = f"layers {found[0]}..{found[-1]}" if found else "no layers"
        raise CheckpointError(
            f"{where}: {prefix}{arch.num_layers_key} is {declared} but the tensors hold "
            f"{len(found)} decoder layers ({held}): config.json does not match the weights"
        )


def _matching(template: str, shapes: Mapping[str, object]) -> list[tuple[str, int | None]]:
    """Tensor names matching ``template`` with the layer index each stands for."""
    if "{layer}" not in template:
        return [(template, None)] if template in shapes else []
    head, _, tail = template.partition("{layer}")
    pattern = re.compile(re.escape(head) + r"(\d+)" + re.escape(tail) + "$")
    found = [(n, int(m.group(1))) for n in shapes if (m := pattern.match(n))]
    return sorted(found, key=lambda f: f[1])  # the first disagreement is the lowest layer


def _evaluate(expr: str, config: Mapping, layer: int | None) -> tuple[int, str] | None:
    """The value of ``a*b+2*c`` over config keys and a phrase saying how it was computed (for
    the message); None when a key is absent or not an integer."""
    total, shown = 0, []
    for term in expr.split("+"):
        product, factors = 1, []
        for factor in term.split("*"):
            value = int(factor) if factor.isdigit() else _config_int(config, factor, layer)
            if value is None:
                return None
            product *= value
            factors.append(str(value))
        total += product
        shown.append("*".join(factors))
    if expr.isidentifier():
        return total, f"{expr} is {total}"
    return total, f"{expr} is {' + '.join(shown)} = {total}"


def _config_int(config: Mapping, key: str, layer: int | None) -> int | None:
    value = config.get(key)
    if value is None and key == "head_dim":  # transformers' default
        hidden, heads = _config_int(config, "hidden_size", None), config.get("num_attention_heads")
        return hidden // heads if hidden is not None and _is_int(heads) and heads else None
    if value is None and key == "num_key_value_heads":  # no GQA: as many as query heads
        value = config.get("num_attention_heads")
    if isinstance(value, list) and layer is not None and layer < len(value):
        value = value[layer]  # per-layer sizes (e.g. intermediate_size of some models)
    return value if _is_int(value) else None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_written_config(
    cfg: Path, shapes: Mapping[str, tuple[tuple[int, ...], str]], where: str
) -> None:
    """Check an output's config.json (``cfg``, about to be committed) against the tensors
    written, so no command commits a model that would not load."""
    if not cfg.is_file() or not shapes:
        return
    try:
        config = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, RecursionError, json.JSONDecodeError):
        return  # copied as it came: the input's reader already judged it
    if isinstance(config, dict):
        arch = detect_architecture(config, list(shapes))
        try:
            check_config_shapes(config, arch, shapes, where)
        except CheckpointError as e:
            raise OutputError(f"refusing to write a model that would not load: {e}") from None
