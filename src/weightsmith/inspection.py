"""``weightsmith inspect``: what a checkpoint holds, from headers only (no tensor data read)."""

from __future__ import annotations

import os
from collections import Counter

from weightsmith.core.experts import expert_linears, fused_expert_tensors
from weightsmith.io.reader import open_checkpoint
from weightsmith.io.sizes import format_size


def inspect_checkpoint(path: str | os.PathLike[str], *, allow_pickle: bool = False) -> dict:
    """Summarise a checkpoint: architecture, parameters, dtypes, shards, layers, tying (a
    ``.gguf`` file: its metadata and every tensor's GGUF type and shape)."""
    from weightsmith.ggml.reader import GgufFile, is_gguf

    if is_gguf(path):
        return GgufFile(path).summary()
    with open_checkpoint(path, allow_pickle=allow_pickle) as ckpt:
        config = ckpt.config or {}
        dtypes: Counter[str] = Counter()
        for info in ckpt.tensors.values():
            dtypes[info.dtype] += info.numel
        shards = []
        for shard in ckpt.shards:
            names = [i for i in ckpt.tensors.values() if i.shard == shard]
            shards.append(
                {
                    "file": shard,
                    "tensors": len(names),
                    "bytes": (ckpt.root / shard).stat().st_size,
                }
            )
        layers = ckpt.num_layers
        config_layers = ckpt.arch.sizes(config).get(ckpt.arch.num_layers_key)  # text_config
        warnings = []
        if isinstance(config_layers, int) and config_layers != layers:
            warnings.append(f"config.json says {config_layers} layers, the weights hold {layers}")
        if not ckpt.arch.known:
            warnings.append("architecture not described by weightsmith; layers found by name")
        archs = config.get("architectures") or []
        return {
            "path": str(ckpt.path),
            "format": ckpt.format,
            "architecture": archs[0] if archs else None,
            "model_type": config.get("model_type"),
            "family": ckpt.arch.name,
            "num_params": ckpt.num_params,
            "num_tensors": len(ckpt.tensors),
            "dtypes": dict(dtypes.most_common()),
            "size_on_disk": sum(s["bytes"] for s in shards),
            "tensor_bytes": ckpt.total_bytes,
            "shards": shards,
            "num_layers": layers,
            "tied_embeddings": ckpt.tied_embeddings,
            "hidden_size": config.get("hidden_size", config.get("n_embd")),
            "vocab_size": config.get("vocab_size"),
            "has_config": ckpt.config is not None,
            "experts": _experts(ckpt),
            "warnings": warnings,
        }


def _experts(ckpt) -> dict | None:
    """A mixture-of-experts checkpoint's experts per layer, router top-k and storage layout."""
    layout = ckpt.arch.experts
    if layout is None:
        return None
    fused = fused_expert_tensors(ckpt)
    return {
        "per_layer": layout.num_experts(ckpt.config),
        "top_k": (ckpt.config or {}).get(layout.top_k_key),
        "layout": "fused 3-D" if fused else "one Linear per expert",
        "expert_linears": len(expert_linears(ckpt)),
    }


def format_inspection(info: dict) -> str:
    """The human-readable form of :func:`inspect_checkpoint`'s result."""
    if info.get("format") == "gguf":
        from weightsmith.ggml.reader import format_gguf_summary

        return format_gguf_summary(info)
    total = max(info["num_params"], 1)
    dtype_text = ", ".join(f"{d} {n / total:.1%}" for d, n in info["dtypes"].items())
    rows = [
        ("path", info["path"]),
        ("architecture", f"{info['architecture'] or '?'} (family: {info['family']})"),
        ("parameters", f"{info['num_params']:,} ({_human(info['num_params'])})"),
        ("tensors", str(info["num_tensors"])),
        ("dtypes", dtype_text or "-"),
        ("size on disk", format_size(info["size_on_disk"])),
        ("shards", str(len(info["shards"]))),
        ("decoder layers", str(info["num_layers"])),
        ("tied embeddings", "yes" if info["tied_embeddings"] else "no"),
    ]
    if info["hidden_size"] is not None:
        rows.append(("hidden size", str(info["hidden_size"])))
    if info["vocab_size"] is not None:
        rows.append(("vocab size", str(info["vocab_size"])))
    if info.get("experts"):
        e = info["experts"]
        rows.append(("experts", f"{e['per_layer']} per layer, top-{e['top_k']} ({e['layout']})"))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    if len(info["shards"]) > 1:
        lines += [
            f"  {s['file']}  {s['tensors']} tensors  {format_size(s['bytes'])}"
            for s in info["shards"]
        ]
    lines += [f"warning: {w}" for w in info["warnings"]]
    return "\n".join(lines)


def _human(n: int) -> str:
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)
