"""compressed-tensors ``quantization_config`` blocks exactly as llm-compressor 0.14 writes them
(``QuantizationConfig.model_dump()`` of its preset schemes, compressed-tensors 0.19): every
``QuantizationArgs`` field present, the config group named after the preset scheme."""

from __future__ import annotations

import re
from typing import Any

CT_VERSION = "0.19.0"  # the compressed-tensors release whose layout these outputs reproduce


def ct_args(num_bits: int, type: str, strategy: str, **over: Any) -> dict:
    """One ``QuantizationArgs`` as model_dump() writes it (``over``: the non-default fields)."""
    args = {
        "actorder": None, "block_structure": None, "dynamic": False, "group_size": None,
        "num_bits": num_bits, "observer": None, "observer_kwargs": {}, "scale_dtype": None,
        "strategy": strategy, "symmetric": True, "type": type, "zp_dtype": None,
    }  # fmt: skip
    unknown = set(over) - set(args)
    if unknown:
        raise ValueError(f"not QuantizationArgs fields: {sorted(unknown)}")
    return {**args, **over}


def ct_scheme(fmt: str, weights: dict, input_activations: dict | None = None) -> dict:
    """One config group (a ``QuantizationScheme``) targeting every Linear."""
    return {
        "format": fmt, "input_activations": input_activations, "output_activations": None,
        "targets": ["Linear"], "weights": weights,
    }  # fmt: skip


def ct_quantization_config(group: str, scheme: dict, ignored: list[str]) -> dict:
    """config.json's ``quantization_config`` for one config group named ``group``."""
    return {
        "config_groups": {group: scheme},
        "format": scheme["format"],
        "global_compression_ratio": None,
        "ignore": list(ignored),
        "kv_cache_scheme": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "transform_config": {},
        "version": CT_VERSION,
    }


def single_group(qc: dict) -> dict | None:
    """The one config group of ``qc`` (None when it has zero or several)."""
    groups = list((qc.get("config_groups") or {}).values())
    return groups[0] if len(groups) == 1 else None


def ct_group_for(qc: dict, module: str, cls: str = "Linear") -> dict | None:
    """The config group of ``qc`` that compressed-tensors applies to Linear ``module``: a
    target naming it exactly first, then a ``re:`` target matching it, then the class name
    (``match_targets``' order); None when no group targets it."""
    groups = list((qc.get("config_groups") or {}).values())
    for hit in (
        lambda t: t == module,
        lambda t: t.startswith("re:") and re.match(t[3:], module) is not None,
        lambda t: t == cls,
    ):
        for group in groups:
            if any(hit(t) for t in group.get("targets") or ()):
                return group
    return None
