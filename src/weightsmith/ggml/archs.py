"""How each Hugging Face model family becomes a llama.cpp GGUF: architecture name, tensor names,
hyper-parameter keys and the Q/K row permutation, as llama.cpp's ``convert_hf_to_gguf.py`` does.

Only families weightsmith has tested against transformers' own GGUF loader are described; any
other ``model_type`` is refused by name before anything is written.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import gguf
import numpy as np

from weightsmith.errors import ConfigError


@dataclass(frozen=True)
class GgufArch:
    """One llama.cpp architecture and the HF families written as it."""

    name: str  # general.architecture
    model_types: tuple[str, ...]
    permute_qk: (
        bool  # llama.cpp's LlamaModel.permute of q_proj/k_proj rows (rotate-half -> interleaved)
    )
    writes_vocab_size: bool  # LlamaModel adds {arch}.vocab_size
    writes_rope_dims: bool  # LlamaModel adds {arch}.rope.dimension_count
    norm_shift: float = 0.0  # added to every *norm.weight (Gemma's RMSNorm scales by 1 + w)


ARCHS: tuple[GgufArch, ...] = (
    GgufArch(
        "llama",
        ("llama", "mistral"),
        permute_qk=True,
        writes_vocab_size=True,
        writes_rope_dims=True,
    ),
    GgufArch(
        "qwen2", ("qwen2",), permute_qk=False, writes_vocab_size=False, writes_rope_dims=False
    ),
    GgufArch(
        "qwen3", ("qwen3",), permute_qk=False, writes_vocab_size=False, writes_rope_dims=False
    ),
    GgufArch("phi3", ("phi3",), permute_qk=False, writes_vocab_size=False, writes_rope_dims=True),
    GgufArch("gemma", ("gemma",), False, False, False, norm_shift=1.0),
    GgufArch("gemma2", ("gemma2",), False, False, False, norm_shift=1.0),
    GgufArch("gemma3", ("gemma3_text",), False, False, False, norm_shift=1.0),
)
GEMMA = ("gemma", "gemma2", "gemma3")

# HF name (layer part with {bid}) -> GGUF name, as gguf-py's tensor_mapping.py maps them.
_GLOBAL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
# Phi-3 keeps its fused projections: qkv as attn_qkv, gate+up as ffn_up (llama.cpp splits them).
_PHI3 = {"self_attn.qkv_proj.weight": "attn_qkv.weight", "mlp.gate_up_proj.weight": "ffn_up.weight"}
# Gemma 2/3 norm the attention and MLP outputs too (gguf-py's tensor_mapping for GEMMA2/3).
_GEMMA2 = {
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")
_BLK_RE = re.compile(r"blk\.(\d+)\.(.+)")
_SKIPPED = (".rotary_emb.inv_freq",)  # llama.cpp computes these itself


def gguf_arch_for(config: dict | None) -> GgufArch:
    """The GGUF architecture for a checkpoint's config.json, or a one-line refusal naming it."""
    model_type = (config or {}).get("model_type")
    for arch in ARCHS:
        if model_type in arch.model_types:
            return arch
    archs = (config or {}).get("architectures") or ["?"]
    known = ", ".join(t for a in ARCHS for t in a.model_types)
    raise ConfigError(
        f"architecture {archs[0]} (model_type {model_type!r}) has no GGUF description in "
        f"weightsmith (supported: {known})"
    )


def _layer_map(arch_name: str) -> dict[str, str]:
    if arch_name == "phi3":
        return {**_LAYER, **_PHI3}
    if arch_name in ("gemma2", "gemma3"):
        return {**_LAYER, **_GEMMA2}
    return _LAYER


def gguf_name(hf_name: str, arch_name: str = "llama") -> str | None:
    """The GGUF tensor name of a HF tensor in an ``arch_name`` file; None for tensors llama.cpp
    does not store."""
    if hf_name.endswith(_SKIPPED):
        return None
    if hf_name in _GLOBAL:
        return _GLOBAL[hf_name]
    m = _LAYER_RE.fullmatch(hf_name)
    layer = {**_LAYER, **_PHI3, **(_GEMMA2 if arch_name in ("gemma2", "gemma3") else {})}
    if m and m.group(2) in layer:
        return f"blk.{m.group(1)}.{layer[m.group(2)]}"
    raise ConfigError(f"tensor {hf_name!r} has no GGUF name in weightsmith's description")


def hf_name(name: str, arch_name: str = "llama") -> str:
    """The HF tensor name of a GGUF tensor in an ``arch_name`` file (the inverse of
    :func:`gguf_name`)."""
    for hf, g in _GLOBAL.items():
        if g == name:
            return hf
    m = _BLK_RE.fullmatch(name)
    if m:
        for hf, g in reversed(_layer_map(arch_name).items()):
            if g == m.group(2):
                return f"model.layers.{m.group(1)}.{hf}"
    raise ConfigError(f"GGUF tensor {name!r} has no Hugging Face name in weightsmith's description")


def norm_shift(arch: GgufArch, name: str) -> float:
    """What is added to a tensor when written (subtracted when read back): Gemma's norms."""
    return arch.norm_shift if name.endswith("norm.weight") else 0.0


def heads(config: dict) -> tuple[int, int]:
    n_head = int(config["num_attention_heads"])
    return n_head, int(config.get("num_key_value_heads") or n_head)


def permute_rows(w: np.ndarray, n_head: int, inverse: bool = False) -> np.ndarray:
    """llama.cpp's Q/K permutation: per head, rows (half, 2) <- (2, half); ``inverse`` undoes it."""
    half = w.shape[0] // n_head // 2
    split = (n_head, half, 2) if inverse else (n_head, 2, half)
    return w.reshape(*split, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def qk_heads(arch: GgufArch, name: str, config: dict) -> int | None:
    """Heads to permute a GGUF tensor's rows by (q: n_head, k: n_head_kv), None when unpermuted."""
    if not arch.permute_qk:
        return None
    n_head, n_kv = heads(config)
    if name.endswith(("attn_q.weight", "attn_q.bias")):
        return n_head
    if name.endswith(("attn_k.weight", "attn_k.bias")):
        return n_kv
    return None


def rope_settings(config: dict) -> tuple[float | None, dict]:
    """(theta, scaling dict) from transformers 5's ``rope_parameters`` or the older keys."""
    params = dict(config.get("rope_parameters") or {})
    scaling = dict(config.get("rope_scaling") or {})
    theta = params.get("rope_theta", config.get("rope_theta"))
    merged = {**scaling, **params}
    merged.setdefault("rope_type", merged.get("type", "default"))
    return theta, merged


def write_hparams(w: gguf.GGUFWriter, arch: GgufArch, config: dict) -> None:
    """The hyper-parameter keys llama.cpp's TextModel/LlamaModel/Qwen2Model write."""
    if arch.name == "phi3":
        _write_phi3_hparams(w, config)
        return
    if arch.name in GEMMA:
        write_gemma_hparams(w, arch, config)
        return
    w.add_block_count(int(config["num_hidden_layers"]))
    if "max_position_embeddings" in config:
        w.add_context_length(int(config["max_position_embeddings"]))
    w.add_embedding_length(int(config["hidden_size"]))
    w.add_feed_forward_length(int(config["intermediate_size"]))
    n_head, n_kv = heads(config)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    theta, rope = rope_settings(config)
    if theta is not None:
        w.add_rope_freq_base(float(theta))
    w.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    if config.get("head_dim") is not None:
        w.add_key_length(int(config["head_dim"]))
        w.add_value_length(int(config["head_dim"]))
    if arch.writes_vocab_size:
        w.add_vocab_size(int(config["vocab_size"]))
    if arch.writes_rope_dims:
        head_dim = config.get("head_dim") or int(config["hidden_size"]) // n_head
        w.add_rope_dimension_count(int(head_dim))
    _write_rope_scaling(w, arch, rope)


def _write_rope_scaling(w: gguf.GGUFWriter, arch: GgufArch, rope: dict) -> None:
    kind = rope.get("rope_type") or "default"
    if kind == "default" or (kind == "llama3" and arch.name == "llama"):
        return  # llama3: no keys, the rope_freqs tensor (extra_tensors)
    if kind == "linear" and arch.name in ("llama", "gemma3"):
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
        return
    if kind == "yarn" and arch.name in ("qwen2", "qwen3"):
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rope["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
        return
    raise ConfigError(f"RoPE scaling {kind!r} is not supported by the GGUF writer for {arch.name}")


def _write_phi3_hparams(w: gguf.GGUFWriter, config: dict) -> None:
    """llama.cpp's Phi3MiniModel.set_gguf_parameters (LongRoPE factors are not supported)."""
    theta, rope = rope_settings(config)
    if rope.get("long_factor") or rope.get("rope_type") not in ("default", None):
        raise ConfigError(
            f"RoPE scaling {rope.get('rope_type')!r} is not supported by the GGUF writer for phi3"
        )
    n_embd, n_head = int(config["hidden_size"]), int(config["num_attention_heads"])
    orig = rope.get(
        "original_max_position_embeddings", config.get("original_max_position_embeddings")
    )
    rot_pct = float(rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)))
    w.add_context_length(int(config["max_position_embeddings"]))
    w.add_rope_scaling_orig_ctx_len(
        int(orig if orig is not None else config["max_position_embeddings"])
    )
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(int(config["intermediate_size"]))
    w.add_block_count(int(config["num_hidden_layers"]))
    w.add_head_count(n_head)
    w.add_head_count_kv(heads(config)[1])
    w.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    w.add_rope_dimension_count(int(rot_pct * n_embd) // n_head)
    w.add_rope_freq_base(float(theta if theta is not None else 10000.0))
    w.add_sliding_window(int(config.get("sliding_window") or 0))


# llama.cpp's per-arch defaults (src/models/gemma2.cpp, gemma3.cpp): every n-th layer is full
# attention, the others sliding; queries are scaled by 1/sqrt(head_dim), except at the layer
# count of the 27B models, where by 1/sqrt(hidden / heads).
_GEMMA_SWA_EVERY = {"gemma2": 2, "gemma3": 6}
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def write_gemma_hparams(w: gguf.GGUFWriter, arch: GgufArch, config: dict) -> None:
    """llama.cpp's GemmaModel/Gemma2Model/Gemma3Model.set_gguf_parameters, plus what its
    defaults would otherwise assume: the RoPE base (Gemma/Gemma 2 do not write it; llama.cpp
    then uses 10000) and the per-layer sliding pattern when config.json's differs."""
    if config.get("use_bidirectional_attention"):
        raise ConfigError("bidirectional Gemma 3 (EmbeddingGemma) is not a causal LM GGUF")
    n_head, n_kv = heads(config)
    n_embd, n_layer = int(config["hidden_size"]), int(config["num_hidden_layers"])
    head_dim = int(config.get("head_dim") or n_embd // n_head)
    w.add_context_length(int(config.get("max_position_embeddings", 131072)))
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(int(config["intermediate_size"]))
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    full, local = _gemma_rope(arch, config)
    w.add_rope_freq_base(float(full.get("rope_theta", 10000.0)))
    _write_rope_scaling(w, arch, full)
    if arch.name == "gemma":
        return
    _check_query_scale(arch, config, n_embd // n_head if n_layer == _GEMMA_27B_LAYERS[arch.name]
                       else head_dim)  # fmt: skip
    if arch.name == "gemma2":
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if config.get(key) is None:
                raise ConfigError(f"gemma2 without {key}: llama.cpp's gemma2 graph always caps")
        w.add_attn_logit_softcapping(float(config["attn_logit_softcapping"]))
        w.add_final_logit_softcapping(float(config["final_logit_softcapping"]))
    else:
        if config.get("attn_logit_softcapping") is not None:
            raise ConfigError("gemma3 with attn_logit_softcapping: llama.cpp's gemma3 has none")
        if config.get("final_logit_softcapping"):
            w.add_final_logit_softcapping(float(config["final_logit_softcapping"]))
        if local is not None:
            w.add_rope_freq_base_swa(float(local.get("rope_theta", 10000.0)))
    _write_gemma_swa(w, arch, config, n_layer)


def _gemma_rope(arch: GgufArch, config: dict) -> tuple[dict, dict | None]:
    """(full-attention RoPE, sliding-attention RoPE or None) from transformers 5's per-layer-type
    ``rope_parameters`` or the older ``rope_theta``/``rope_local_base_freq``/``rope_scaling``."""
    params = config.get("rope_parameters") or {}
    if "full_attention" in params:
        return dict(params["full_attention"]), params.get("sliding_attention")
    theta, full = rope_settings(config)
    if theta is not None:
        full["rope_theta"] = theta
    local = config.get("rope_local_base_freq")
    if arch.name == "gemma3" and local is not None:
        return full, {"rope_theta": local}
    return full, None


def _check_query_scale(arch: GgufArch, config: dict, llama_cpp: int) -> None:
    scalar = config.get("query_pre_attn_scalar")
    if scalar is not None and float(scalar) != float(llama_cpp):
        raise ConfigError(
            f"{arch.name} with query_pre_attn_scalar {scalar}: llama.cpp scales queries by "
            f"1/sqrt({llama_cpp}) for this shape, so no GGUF of it computes the same function"
        )


def _write_gemma_swa(w: gguf.GGUFWriter, arch: GgufArch, config: dict, n_layer: int) -> None:
    """The sliding window, and the layers that use it when they are not llama.cpp's default
    (every ``n``-th layer full: ``il % n == n - 1``)."""
    every = _GEMMA_SWA_EVERY[arch.name]
    default = [il % every < every - 1 for il in range(n_layer)]
    types = config.get("layer_types")
    swa = default if types is None else [t == "sliding_attention" for t in types]
    if len(swa) != n_layer or (types and set(types) - {"sliding_attention", "full_attention"}):
        raise ConfigError(f"{arch.name} layer_types {types!r} are not sliding/full per layer")
    window = config.get("sliding_window")
    if not any(swa) and arch.name == "gemma3":
        return  # llama.cpp: no sliding_window key -> no sliding attention
    if window is None:
        raise ConfigError(f"{arch.name} has sliding layers but no sliding_window")
    w.add_sliding_window(int(window))
    if swa != default:
        w.add_sliding_window_pattern(swa)


def gemma_hf_config(arch_name: str, field) -> dict:
    """config.json values transformers' GGUF loader leaves at its defaults for a Gemma 2/3 file
    (``field(key, default)`` reads its metadata): query scaling, soft-caps and the sliding
    pattern, as llama.cpp computes with them."""
    if arch_name not in ("gemma2", "gemma3"):
        return {}
    key = lambda k, d=None: field(f"{arch_name}.{k}", d)  # noqa: E731
    n_layer, n_embd = int(key("block_count")), int(key("embedding_length"))
    n_head, head_dim = int(key("attention.head_count")), int(key("attention.key_length"))
    big = n_layer == _GEMMA_27B_LAYERS[arch_name]
    every = _GEMMA_SWA_EVERY[arch_name]
    swa = key("attention.sliding_window_pattern")
    if swa is None:
        sliding = arch_name == "gemma2" or key("attention.sliding_window") is not None
        swa = [sliding and il % every < every - 1 for il in range(n_layer)]
    out = {
        "query_pre_attn_scalar": n_embd // n_head if big else head_dim,
        "final_logit_softcapping": key("final_logit_softcapping"),
        "layer_types": ["sliding_attention" if s else "full_attention" for s in swa],
    }
    if arch_name == "gemma2":
        out["attn_logit_softcapping"] = key("attn_logit_softcapping", 50.0)
        out["final_logit_softcapping"] = key("final_logit_softcapping", 30.0)
    return out


def extra_tensors(arch: GgufArch, config: dict) -> dict[str, np.ndarray]:
    """Tensors llama.cpp computes from config.json rather than reads from the checkpoint
    (``LlamaModel.generate_extra_tensors``): Llama 3's ``rope_freqs.weight``, the factor each
    RoPE frequency is divided by."""
    theta, rope = rope_settings(config)
    if arch.name != "llama" or str(rope.get("rope_type")).lower() != "llama3":
        return {}
    import torch

    n_head = int(config["num_attention_heads"])
    dim = int(config.get("head_dim") or int(config["hidden_size"]) // n_head)
    base = float(theta if theta is not None else 10000.0)
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_ctx = float(rope.get("original_max_position_embeddings", 8192))
    factors = []
    for freq in freqs:  # llama.cpp's loop, in the same float32 tensor arithmetic
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            factors.append(1)
        elif wavelen > old_ctx / low:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return {"rope_freqs.weight": torch.tensor(factors, dtype=torch.float32).numpy()}
