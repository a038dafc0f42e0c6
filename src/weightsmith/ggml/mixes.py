"""llama.cpp's quantization mixes (``Q4_K_M`` ...): the GGML type of each tensor.

A mix is a default type plus llama.cpp's per-tensor rules (``llama_tensor_get_type`` in
src/llama-quant.cpp): the output (and tied token embeddings) at Q6_K, more bits for attn_v and
for the ffn_down of the first, last and every third layer, the 70B/MoE/Falcon special cases, and
the fallback to a 32-block type (or F16) when a row is not a multiple of the block size.

:func:`plan_types` chooses for a whole model exactly as llama.cpp does (including its counters,
which walk the tensors in its order: by layer, then by name); :func:`tensor_type` chooses for one
tensor, taking the layer number from the name (the same for dense models).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from weightsmith.errors import ConfigError

# mix -> (llama_ftype value, default GGML type)
MIXES: dict[str, tuple[int, str]] = {
    "F32": (0, "F32"),
    "F16": (1, "F16"),
    "BF16": (32, "BF16"),
    "Q4_0": (2, "Q4_0"),
    "Q4_1": (3, "Q4_1"),
    "Q5_0": (8, "Q5_0"),
    "Q5_1": (9, "Q5_1"),
    "Q8_0": (7, "Q8_0"),
    "Q2_K": (10, "Q2_K"),
    "Q2_K_S": (21, "Q2_K"),
    "Q3_K_S": (11, "Q3_K"),
    "Q3_K_M": (12, "Q3_K"),
    "Q3_K_L": (13, "Q3_K"),
    "Q4_K_S": (14, "Q4_K"),
    "Q4_K_M": (15, "Q4_K"),
    "Q5_K_S": (16, "Q5_K"),
    "Q5_K_M": (17, "Q5_K"),
    "Q6_K": (18, "Q6_K"),
    "TQ1_0": (36, "TQ1_0"),
    "TQ2_0": (37, "TQ2_0"),
}
BLOCK_SIZE = {"F32": 1, "F16": 1, "BF16": 1, "Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32,
              "Q8_0": 32, "Q2_K": 256, "Q3_K": 256, "Q4_K": 256, "Q5_K": 256, "Q6_K": 256,
              "TQ1_0": 256, "TQ2_0": 256}  # fmt: skip
_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "TQ1_0": "Q4_0", "TQ2_0": "Q4_0", "Q4_K": "Q5_0",
             "Q5_K": "Q5_1", "Q6_K": "Q8_0"}  # fmt: skip
_NOT_QUANTIZED = ("_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup",
                  "laurel", "per_layer_model_proj", "ssm_conv1d", "shortconv.conv.weight",
                  "indexer.k_proj.weight", "indexer.q_proj.weight", "time_mix_first.weight",
                  "time_mix_w0.weight", "time_mix_w1.weight", "time_mix_w2.weight",
                  "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight",
                  "time_mix_a0.weight", "time_mix_a1.weight", "time_mix_a2.weight",
                  "time_mix_g1.weight", "time_mix_g2.weight", "time_mix_decay_w1.weight",
                  "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight", "attn_rel_b.weight",
                  ".position_embd", "sam.pos_embd", "sam.neck.", "sam.net_", ".rel_pos",
                  ".patch_embd", ".patch_merger", "a.rvq.codebook", "mm.a.code_embd")  # fmt: skip
_LAYER = re.compile(r"^blk\.(\d+)\.")


@dataclass(frozen=True)
class ModelFacts:
    """What llama.cpp's choice depends on besides the tensor itself.

    ``tied_embeddings``: the GGUF has no ``output.weight`` (token_embd then gets the output's
    type); :func:`plan_types` derives it from the tensor list. ``n_attn_v``: attn_v-like tensors
    in the model (default ``n_layer``)."""

    n_layer: int
    n_head: int
    n_head_kv: int
    n_expert: int = 0
    arch: str = "llama"
    has_imatrix: bool = False
    tied_embeddings: bool = False
    n_attn_v: int | None = None

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv if self.n_head_kv else 0

    @property
    def is_70b(self) -> bool:
        """llama.cpp's LLM_TYPE_70B for the architectures weightsmith writes."""
        if self.n_layer != 80:
            return False
        return self.arch == "qwen2" or (self.arch == "llama" and self.n_head != self.n_head_kv)


def _category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for key, cat in (("attn_qkv.weight", "attn_v"), ("attn_kv_b.weight", "attn_v"),
                     ("attn_v.weight", "attn_v"), ("attn_k.weight", "attn_k"),
                     ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
                     ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down")):  # fmt: skip
        if key in name:
            return cat
    return "other"


def allows_quantization(name: str, shape: tuple[int, ...]) -> bool:
    """llama.cpp's ``tensor_allows_quantization`` (2-D/3-D ``*weight`` tensors except norms...)."""
    if len(shape) < 2 or not name.endswith("weight"):
        return False
    if name in ("position_embd.weight", "token_types.weight"):
        return False
    return not any(s in name for s in _NOT_QUANTIZED)


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _attn_v(mix: str, new: str, f: ModelFacts, i_v: int, n_v: int) -> str:
    if mix == "Q2_K":
        new = "Q4_K" if f.n_gqa >= 4 else "Q3_K"
    elif mix == "Q2_K_S" and f.n_gqa >= 4:
        new = "Q4_K"
    elif mix == "Q3_K_M":
        new = "Q5_K" if i_v < 2 else "Q4_K"
    elif mix == "Q3_K_L":
        new = "Q5_K"
    elif mix in ("Q4_K_M", "Q5_K_M") and _use_more_bits(i_v, n_v):
        new = "Q6_K"
    elif mix == "Q4_K_S" and i_v < 4:
        new = "Q5_K"
    if f.is_70b and new in ("Q3_K", "Q4_K"):
        new = "Q5_K"
    return "Q8_0" if f.n_expert == 8 else new


def _ffn_down(mix: str, new: str, f: ModelFacts, i: int) -> str:
    n, falcon = f.n_layer, f.arch == "falcon"
    if mix == "Q2_K":
        return "Q3_K"
    if mix == "Q2_K_S":
        return "Q4_K" if i < n // 8 else new
    if mix == "Q3_K_M":
        if i < n // 16:
            return "Q5_K"
        return "Q4_K" if not falcon or _use_more_bits(i, n) else "Q3_K"
    if mix == "Q3_K_L":
        return "Q4_K" if falcon else "Q5_K"
    if mix == "Q4_K_M":
        if falcon:
            return "Q6_K" if i < n // 16 else "Q5_K" if _use_more_bits(i, n) else "Q4_K"
        return "Q6_K" if _use_more_bits(i, n) else new
    if mix == "Q5_K_M" and _use_more_bits(i, n):
        return "Q6_K"
    if mix == "Q4_K_S" and not falcon and i < n // 8:
        return "Q5_K"
    if mix in ("Q4_0", "Q5_0") and f.has_imatrix and i < n // 8:
        return "Q4_1" if mix == "Q4_0" else "Q5_1"
    return new


def _attn_output(mix: str, new: str, f: ModelFacts) -> str:
    if f.arch == "falcon":
        return "Q4_K" if mix == "Q3_K_L" else new
    if f.n_expert == 8:
        moe = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M")
        return "Q5_K" if mix in moe else new
    return {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K"}.get(mix, new)


def _choose(
    mix: str, name: str, shape: tuple[int, ...], f: ModelFacts, i_v: int, i_down: int
) -> str:
    """``llama_tensor_get_type_impl`` for the non-IQ mixes."""
    new = MIXES[mix][1]
    cat = _category(name)
    if cat == "output" or (f.tied_embeddings and cat == "token_embd"):
        if f.arch == "falcon" or shape[-1] % BLOCK_SIZE[new]:
            return "Q8_0"
        return "Q6_K" if new != "Q8_0" else new
    if cat == "token_embd":
        return "Q4_K" if mix in ("TQ1_0", "TQ2_0") else new
    if cat == "attn_v":
        return _attn_v(mix, new, f, i_v, f.n_attn_v or f.n_layer)
    if cat == "attn_k":
        return "Q8_0" if f.n_expert == 8 else new
    if cat == "ffn_down":
        return _ffn_down(mix, new, f, i_down)
    if cat == "attn_output":
        return _attn_output(mix, new, f)
    return new


def fallback_type(type_name: str, n_cols: int) -> str:
    """llama.cpp's ``tensor_type_fallback``: a type whose block divides the row, else F16."""
    if n_cols % BLOCK_SIZE[type_name] == 0:
        return type_name
    out = _FALLBACK.get(type_name, type_name)
    return out if n_cols % BLOCK_SIZE[out] == 0 else "F16"


def _check(mix: str) -> None:
    if mix not in MIXES:
        raise ConfigError(f"unknown GGUF type {mix!r}; choose one of {', '.join(MIXES)}")


def _layer_of(name: str) -> int:
    m = _LAYER.match(name)
    return int(m.group(1)) if m else -1


def tensor_type(
    mix: str, name: str, shape: tuple[int, ...], arch: ModelFacts, source_type: str = "F32"
) -> str:
    """llama.cpp's type for GGUF tensor ``name`` of numpy ``shape`` (rows..., columns) in
    ``mix``, including the fallback when a row is not a multiple of the block size.

    Tensors llama.cpp does not quantize (1-D, norms, ...) keep ``source_type``. The attn_v and
    ffn_down counters are taken as the layer number (exact for dense models; use
    :func:`plan_types` for a whole model)."""
    _check(mix)
    if not allows_quantization(name, shape):
        return source_type
    default = MIXES[mix][1]
    if BLOCK_SIZE[default] == 1:
        return default
    layer = max(_layer_of(name), 0)
    return fallback_type(_choose(mix, name, shape, arch, layer, layer), shape[-1])


def plan_types(
    mix: str, shapes: Mapping[str, tuple[int, ...]], facts: ModelFacts, source_type: str = "F32"
) -> dict[str, str]:
    """Every tensor's type, as llama.cpp chooses for a model with these tensors: counters walk
    the tensors by layer then name, ties are detected from the absence of ``output.weight``."""
    _check(mix)
    order = sorted(shapes, key=lambda n: (_layer_of(n), n))
    n_v = sum(_category(n) == "attn_v" for n in order)
    f = ModelFacts(**{**facts.__dict__, "tied_embeddings": "output.weight" not in shapes,
                      "n_attn_v": n_v or facts.n_layer})  # fmt: skip
    out, i_v, i_down = {}, 0, 0
    for name in order:
        shape = tuple(shapes[name])
        if not allows_quantization(name, shape):
            out[name] = source_type
            continue
        default = MIXES[mix][1]
        if BLOCK_SIZE[default] == 1:
            out[name] = default
            continue
        layer_down = _layer_of(name) if f.n_expert > 1 else i_down
        out[name] = fallback_type(_choose(mix, name, shape, f, i_v, layer_down), shape[-1])
        cat = _category(name)
        i_v += cat == "attn_v"
        i_down += cat == "ffn_down"
    return out


def requires_imatrix(mix: str, name: str, type_name: str) -> bool:
    """llama.cpp refuses these without an importance matrix (Q2_K tensors of a Q2_K_S file)."""
    if name in ("token_embd.weight", "per_layer_token_embd.weight", "output.weight"):
        return False
    return type_name == "Q2_K" and mix == "Q2_K_S"
