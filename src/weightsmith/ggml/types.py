"""GGUF tensor types: which one each tensor gets for a ``--type``, and its encoding.

Float, legacy (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) and ternary (TQ1_0, TQ2_0) types are encoded by
``gguf.quants.quantize`` (the ggml project's own reference). Every 2-D ``.weight`` except norms
gets the requested type; 1-D tensors, norms and biases stay F32, as ``convert_hf_to_gguf.py``
keeps them. A row length the block size does not divide falls back to F16 for that tensor, as
``convert_hf_to_gguf.py`` does on ``QuantError``, and the fallback is listed in the report.

K-quant mixes (Q4_K_M, ...) choose per tensor with ``mixes.tensor_type`` (llama.cpp's
``llama_tensor_get_type``) and encode with ``kquants.quantize_k``; builds without those modules
refuse them in one line.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import gguf
import numpy as np

from weightsmith.errors import ConfigError

FLOAT_TYPES = ("F32", "F16", "BF16")
LEGACY_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
TERNARY_TYPES = ("TQ1_0", "TQ2_0")
DIRECT_TYPES = FLOAT_TYPES + LEGACY_TYPES + TERNARY_TYPES
K_MIXES = (
    "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K",
)  # fmt: skip
ALL_TYPES = DIRECT_TYPES + K_MIXES
# tensor types whose llama.cpp encoding reads an importance matrix (Q8_0 and floats ignore it)
IMATRIX_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
_FILE_TYPE_ALIASES = {"F32": "ALL_F32", "Q2_K": "MOSTLY_Q2_K", "Q6_K": "MOSTLY_Q6_K"}


@dataclass(frozen=True)
class TensorType:
    """The type chosen for one tensor, and why it differs from the requested one (if it does)."""

    name: str
    fallback: str | None = None


def check_type(type_name: str) -> str:
    """The canonical name of a ``--type``, or a one-line refusal."""
    name = type_name.upper()
    if name not in ALL_TYPES:
        raise ConfigError(
            f"--type {type_name}: unknown GGUF type (choose from {', '.join(ALL_TYPES)})"
        )
    if name in K_MIXES:
        k_backend()  # refuse now, before any work, when this build has no K-quant encoder
    return name


def k_backend():
    """(mixes, kquants) modules, or the one-line refusal of builds without them."""
    try:
        from weightsmith.ggml import kquants, mixes
    except ImportError:
        raise ConfigError(
            "K-quant GGUF types (Q2_K ... Q6_K, Q4_K_M, ...) are not available in this build"
        ) from None
    return mixes, kquants


def file_type(type_name: str) -> int:
    """general.file_type: llama.cpp's LlamaFileType of a whole-file type."""
    key = _FILE_TYPE_ALIASES.get(type_name, f"MOSTLY_{type_name}")
    return int(gguf.LlamaFileType[key])


def quantizable(name: str, shape: tuple[int, ...]) -> bool:
    """Tensors that take the file's type; the rest stay F32 as llama.cpp keeps them."""
    return len(shape) >= 2 and name.endswith(".weight") and not name.endswith("_norm.weight")


def block_size(type_name: str) -> int:
    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]][0]


def model_facts(mixes, arch_name: str, config: dict, has_imatrix: bool = False, tied: bool = False):
    """mixes.ModelFacts from config.json, filling fields by their names."""
    n_head = int(config["num_attention_heads"])
    values = {
        "n_layer": int(config["num_hidden_layers"]),
        "n_head": n_head,
        "n_head_kv": int(config.get("num_key_value_heads") or n_head),
        "n_expert": int(config.get("num_local_experts") or 0),
        "has_imatrix": has_imatrix,
        "tied_embeddings": tied,
    }
    kwargs = {}
    for f in fields(mixes.ModelFacts):
        if f.name in values:
            kwargs[f.name] = values[f.name]
        elif "arch" in f.name:
            kwargs[f.name] = arch_name
    return mixes.ModelFacts(**kwargs)


def choose_type(file_type_name: str, name: str, shape: tuple[int, ...]) -> TensorType:
    """The GGUF type of tensor ``name`` (numpy ``shape``: rows first) in a file of one of the
    direct (non-mix) types."""
    if not quantizable(name, shape):
        return TensorType("F32")
    wanted = file_type_name
    if wanted in TERNARY_TYPES and name in ("token_embd.weight", "output.weight"):
        return TensorType("F16", "embeddings and output stay F16 in ternary files")
    row = shape[-1]
    if row % block_size(wanted):
        return TensorType(
            "F16", f"row of {row} not divisible by {wanted}'s block {block_size(wanted)}"
        )
    return TensorType(wanted)


def mix_types(
    mix: str,
    shapes: dict[str, tuple[int, ...]],
    arch_name: str,
    config: dict,
    has_imatrix: bool = False,
) -> dict[str, TensorType]:
    """Every tensor's type in a K-quant mix, as llama.cpp's ``llama_tensor_get_type`` picks
    them (``mixes.plan_types`` walks the whole model for its per-layer counters)."""
    mixes, _ = k_backend()
    tied = "output.weight" not in shapes
    facts = model_facts(mixes, arch_name, config, has_imatrix=has_imatrix, tied=tied)
    plan = getattr(mixes, "plan_types", None)
    if plan is not None:
        chosen = plan(mix, shapes, facts, "F32")
    else:
        chosen = {n: mixes.tensor_type(mix, n, s, facts, "F32") for n, s in shapes.items()}
    out = {}
    for name, shape in shapes.items():
        kind = chosen[name]
        if not quantizable(name, shape):
            out[name] = TensorType("F32")
        elif shape[-1] % 256:
            reason = f"row of {shape[-1]} not a multiple of the K-quant block 256: {kind}"
            out[name] = TensorType(kind, reason)
        else:
            out[name] = TensorType(kind)
    return out


def encode(data: np.ndarray, type_name: str) -> np.ndarray:
    """float32 rows -> the bytes GGUF stores (float arrays for F32/F16)."""
    data = np.ascontiguousarray(data, dtype=np.float32)
    if type_name == "F32":
        return data
    if type_name == "F16":
        return data.astype(np.float16)
    k_types = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
    if type_name in k_types:
        _, kquants = k_backend()
        rows = data.reshape(-1, data.shape[-1])
        return np.ascontiguousarray(kquants.quantize_k(rows, type_name)).view(np.uint8)
    return gguf.quants.quantize(data, gguf.GGMLQuantizationType[type_name]).view(np.uint8)


def encode_imatrix(data: np.ndarray, type_name: str, importance: np.ndarray | None) -> np.ndarray:
    """As :func:`encode`, for a file written with an importance matrix: every quantized type
    takes llama.cpp's own encoder (``kquants.quantize_tensor``), weighted by ``importance``
    (this tensor's entry, or None), since with an imatrix llama.cpp's Q4_0..Q5_1 differ from
    the ``_ref`` path ``gguf.quants`` reproduces."""
    if type_name in FLOAT_TYPES:
        return encode(data, type_name)
    _, kquants = k_backend()
    rows = np.ascontiguousarray(data, dtype=np.float32).reshape(-1, data.shape[-1])
    weights = importance if type_name in IMATRIX_TYPES else None
    return np.ascontiguousarray(kquants.quantize_tensor(rows, type_name, weights)).view(np.uint8)


def stored_shape(shape: tuple[int, ...], type_name: str) -> tuple[tuple[int, ...], np.dtype]:
    """(numpy shape, dtype) of the encoded array GGUFWriter is told about."""
    if type_name == "F32":
        return tuple(shape), np.dtype(np.float32)
    if type_name == "F16":
        return tuple(shape), np.dtype(np.float16)
    qtype = gguf.GGMLQuantizationType[type_name]
    return tuple(gguf.quant_shape_to_byte_shape(shape, qtype)), np.dtype(np.uint8)
