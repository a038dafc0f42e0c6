"""``weightsmith compare A B``: how two checkpoints differ, tensor by tensor.

For inspecting merges and quantization or pruning damage: relative L2 difference, cosine
similarity, max absolute difference and sparsity per tensor, computed in float64 one block of
rows at a time (never two whole models in memory), plus tensors present on one side only.
Quantized Linears in any output format weightsmith registers (compressed-tensors
``pack-quantized``, GPTQ v1, bitsandbytes NF4, BitNet; dispatched on ``config.json``'s
``quantization_config`` to the format's own decoder) are dequantized one at a time and compared
as dense weights, so ``compare base quantized`` shows the rounding error.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from weightsmith.io.reader import Checkpoint, open_checkpoint

_BLOCK_ELEMENTS = 16 << 20  # floats per block: bounds memory for huge embeddings


@dataclass(frozen=True)
class TensorDiff:
    """How tensor ``name`` in B differs from A."""

    name: str
    shape: tuple[int, ...]
    rel_l2: float  # ||b - a|| / ||a|| (inf when a is zero and b is not)
    cosine: float  # <a, b> / (||a|| ||b||), 1.0 when both are zero
    max_abs: float
    equal: bool  # bit-for-bit equal values
    norm_a: float = 0.0  # ||a||, ||b||, ||b - a||: enough to pool tensors (per layer)
    norm_b: float = 0.0
    norm_diff: float = 0.0
    zeros_b: int = 0  # exact zeros in b (sparsity = zeros_b / numel)
    numel: int = 0
    layer: int | None = None  # decoder layer of the tensor in A, None outside the layers
    dequantized: bool = False  # b (or a) was decoded from a quantized format


def tensor_diff(a: torch.Tensor, b: torch.Tensor, name: str = "") -> TensorDiff:
    """Difference statistics of two same-shape tensors (pure function)."""
    acc = _Accumulator()
    acc.add(a, b)
    return acc.result(name, tuple(a.shape))


class _Accumulator:
    def __init__(self) -> None:
        self.aa = self.bb = self.ab = self.dd = 0.0
        self.max_abs = 0.0
        self.equal = True
        self.zeros_b = self.numel = 0

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        self.equal = self.equal and torch.equal(a, b)
        a64, b64 = a.double(), b.double()
        d = b64 - a64
        self.aa += float((a64 * a64).sum())
        self.bb += float((b64 * b64).sum())
        self.ab += float((a64 * b64).sum())
        self.dd += float((d * d).sum())
        self.zeros_b += int((b64 == 0).sum())
        self.numel += b64.numel()
        if d.numel():
            self.max_abs = max(self.max_abs, float(d.abs().max()))

    def result(self, name: str, shape: tuple[int, ...], **extra) -> TensorDiff:
        na, nb, nd = math.sqrt(self.aa), math.sqrt(self.bb), math.sqrt(self.dd)
        if na == 0.0:
            rel = 0.0 if self.dd == 0.0 else math.inf
        else:
            rel = nd / na
        cos = 1.0 if na == nb == 0.0 else (self.ab / (na * nb) if na and nb else 0.0)
        return TensorDiff(
            name, shape, rel, cos, self.max_abs, self.equal, na, nb, nd, self.zeros_b,
            self.numel, **extra,
        )  # fmt: skip


# --------------------------------------------------------------------- quantized Linears
@dataclass(frozen=True)
class PackedWeight:
    """A Linear weight stored quantized: the tensors holding it and how to decode them."""

    name: str  # the dense weight's name, e.g. "model.layers.0.mlp.up_proj.weight"
    parts: tuple[str, ...]  # the checkpoint tensors that store it
    decode: Callable[[Checkpoint], torch.Tensor]  # -> float32 (out, in)


def packed_weights(ckpt: Checkpoint) -> dict[str, PackedWeight]:
    """The quantized Linears of ``ckpt`` by dense weight name, decoded by the registered output
    format that wrote config.json's ``quantization_config`` ({} for a dense checkpoint, or a
    quantization this version cannot decode; see :func:`quantization_method`)."""
    qc = (ckpt.config or {}).get("quantization_config") or {}
    fmt = _format(qc.get("quant_method"), qc.get("format"))
    if fmt is None:
        return {}
    out: dict[str, PackedWeight] = {}
    for name, parts in fmt.stored_linears(ckpt.tensors, qc).items():
        module = name[: -len(".weight")]

        def decode(c: Checkpoint, m: str = module, ps: tuple[str, ...] = parts) -> torch.Tensor:
            return fmt.decode(qc, m, {p: c.get_tensor(p) for p in ps}).float()

        out[name] = PackedWeight(name, parts, decode)
    return out


def quantization_method(ckpt: Checkpoint) -> str | None:
    qc = (ckpt.config or {}).get("quantization_config") or {}
    return qc.get("quant_method")


def _format(quant_method: str | None, variant: str | None = None):
    """The registered output format that writes ``quant_method`` (None: none does)."""
    from weightsmith.compress import quantize as _registers  # noqa: F401
    from weightsmith.compress.registry import format_reading

    return format_reading(quant_method, variant) if quant_method else None


class _DenseView:
    """A checkpoint's tensors as dense weights: stored ones as they are, packed ones decoded."""

    def __init__(self, ckpt: Checkpoint) -> None:
        self.ckpt = ckpt
        self.packed = packed_weights(ckpt)
        owner = {p: w for w in self.packed.values() for p in w.parts}
        self.names: list[str] = []
        for n in ckpt.tensors:
            w = owner.get(n)
            if w is None:
                self.names.append(n)
            elif n == w.parts[0]:
                self.names.append(w.name)

    def get(self, name: str) -> torch.Tensor:
        w = self.packed.get(name)
        return self.ckpt.get_tensor(name) if w is None else w.decode(self.ckpt)


def compare_checkpoints(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> dict:
    """Compare every tensor the two checkpoints share; list what only one side has. Either
    side may be a ``.gguf`` file: its tensors are dequantized one at a time, under their HF
    names and layout."""
    from weightsmith.ggml.reader import is_gguf

    if is_gguf(a) or is_gguf(b):
        return _compare_gguf(a, b)
    with open_checkpoint(a) as ca, open_checkpoint(b) as cb:
        va, vb = _DenseView(ca), _DenseView(cb)
        in_b = set(vb.names)
        in_a = set(va.names)
        diffs, mismatched = [], []
        for name in va.names:
            if name not in in_b:
                continue
            layer = ca.arch.layer_of(name)
            if name in va.packed or name in vb.packed:
                ta, tb = va.get(name), vb.get(name)
                if ta.shape != tb.shape:
                    mismatched.append({"name": name, "a": list(ta.shape), "b": list(tb.shape)})
                    continue
                acc = _Accumulator()
                acc.add(ta, tb)
                diffs.append(acc.result(name, tuple(ta.shape), layer=layer, dequantized=True))
                continue
            ia, ib = ca.info(name), cb.info(name)
            if ia.shape != ib.shape:
                mismatched.append({"name": name, "a": list(ia.shape), "b": list(ib.shape)})
                continue
            diffs.append(_diff_streamed(ca, cb, name, layer))
        return {
            "a": str(ca.path),
            "b": str(cb.path),
            "quantization": {"a": quantization_method(ca), "b": quantization_method(cb)},
            "compared": len(diffs),
            "identical": sum(d.equal for d in diffs),
            "dequantized": sum(d.dequantized for d in diffs),
            "only_in_a": [n for n in va.names if n not in in_b],
            "only_in_b": [n for n in vb.names if n not in in_a],
            "shape_mismatch": mismatched,
            "tensors": [asdict(d) for d in diffs],
        }


def _compare_gguf(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> dict:
    from weightsmith.ggml.reader import GgufFile, is_gguf

    def side(path):
        return GgufFile(path) if is_gguf(path) else open_checkpoint(path)

    sa, sb = side(a), side(b)
    try:
        names_a, names_b = _names(sa), _names(sb)
        diffs, mismatched = [], []
        for name in names_a:
            if name not in names_b:
                continue
            ta, tb = _dense(sa, name), _dense(sb, name)
            if ta.shape != tb.shape:
                mismatched.append({"name": name, "a": list(ta.shape), "b": list(tb.shape)})
                continue
            acc = _Accumulator()
            acc.add(ta, tb)
            layer = next(
                (s.arch.layer_of(name) for s in (sa, sb) if isinstance(s, Checkpoint)), None
            )
            decoded = any(_gguf_type(s, name) not in (None, "F32") for s in (sa, sb))
            diffs.append(acc.result(name, tuple(ta.shape), layer=layer, dequantized=decoded))
            del ta, tb
        return {
            "a": str(sa.path),
            "b": str(sb.path),
            "quantization": {"a": None, "b": None},
            "gguf": {
                k: s.field("general.file_type")
                for k, s in (("a", sa), ("b", sb))
                if not isinstance(s, Checkpoint)
            },
            "compared": len(diffs),
            "identical": sum(d.equal for d in diffs),
            "dequantized": sum(d.dequantized for d in diffs),
            "only_in_a": [n for n in names_a if n not in names_b],
            "only_in_b": [n for n in names_b if n not in names_a],
            "shape_mismatch": mismatched,
            "tensors": [asdict(d) for d in diffs],
        }
    finally:
        for s in (sa, sb):
            if isinstance(s, Checkpoint):
                s.close()


def _names(side) -> list[str]:
    return list(side.tensors) if isinstance(side, Checkpoint) else list(side.by_hf)


def _dense(side, name: str) -> torch.Tensor:
    return (side.get_tensor(name) if isinstance(side, Checkpoint) else side.tensor(name)).float()


def _gguf_type(side, name: str) -> str | None:
    return None if isinstance(side, Checkpoint) else side.type_of(name)


def _diff_streamed(ca: Checkpoint, cb: Checkpoint, name: str, layer: int | None) -> TensorDiff:
    info = ca.info(name)
    rows = info.shape[0] if info.shape else 1
    per_row = max(1, info.numel // max(rows, 1))
    step = max(1, _BLOCK_ELEMENTS // per_row)
    acc = _Accumulator()
    if not info.shape:
        acc.add(ca.get_tensor(name), cb.get_tensor(name))
    for start in range(0, rows if info.shape else 0, step):
        acc.add(ca.read_rows(name, start, start + step), cb.read_rows(name, start, start + step))
    return acc.result(name, info.shape, layer=layer)


def format_comparison(result: dict, top: int = 20) -> str:
    """A table of the ``top`` most different tensors, then a summary."""
    diffs = sorted(result["tensors"], key=lambda d: -d["rel_l2"])
    width = max([len(d["name"]) for d in diffs[:top]] + [6])
    lines = [f"{'tensor':<{width}}  {'rel L2':>10}  {'cosine':>9}  {'max |Δ|':>10}"]
    for d in diffs[:top]:
        lines.append(
            f"{d['name']:<{width}}  {d['rel_l2']:>10.3e}  {d['cosine']:>9.6f}  {d['max_abs']:>10.3e}"
        )
    if len(diffs) > top:
        lines.append(f"... {len(diffs) - top} more (use --top or --json)")
    lines.append(
        f"{result['compared']} tensors compared, {result['identical']} identical; "
        f"{len(result['only_in_a'])} only in A, {len(result['only_in_b'])} only in B, "
        f"{len(result['shape_mismatch'])} with different shapes"
        + (f", {result['dequantized']} dequantized" if result.get("dequantized") else "")
    )
    for side, method in (result.get("quantization") or {}).items():
        if method and _format(method) is None:
            lines.append(f"{side.upper()} is quantized with {method!r}, which compare cannot "
                         "decode: its packed tensors are listed as present on one side only")  # fmt: skip
    return "\n".join(lines)
