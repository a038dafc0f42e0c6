"""``weightsmith compare A B``: how two checkpoints differ, tensor by tensor.

For inspecting merges and quantization or pruning damage: relative L2 difference, cosine
similarity and max absolute difference per tensor, computed in float32 one block of rows at a
time (never two whole models in memory), plus tensors present on one side only.
"""

from __future__ import annotations

import math
import os
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

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        self.equal = self.equal and torch.equal(a, b)
        a64, b64 = a.double(), b.double()
        d = b64 - a64
        self.aa += float((a64 * a64).sum())
        self.bb += float((b64 * b64).sum())
        self.ab += float((a64 * b64).sum())
        self.dd += float((d * d).sum())
        if d.numel():
            self.max_abs = max(self.max_abs, float(d.abs().max()))

    def result(self, name: str, shape: tuple[int, ...]) -> TensorDiff:
        na, nb = math.sqrt(self.aa), math.sqrt(self.bb)
        if na == 0.0:
            rel = 0.0 if self.dd == 0.0 else math.inf
        else:
            rel = math.sqrt(self.dd) / na
        cos = 1.0 if na == nb == 0.0 else (self.ab / (na * nb) if na and nb else 0.0)
        return TensorDiff(name, shape, rel, cos, self.max_abs, self.equal)


def compare_checkpoints(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> dict:
    """Compare every tensor the two checkpoints share; list what only one side has."""
    with open_checkpoint(a) as ca, open_checkpoint(b) as cb:
        common = [n for n in ca.tensors if n in cb.tensors]
        diffs, mismatched = [], []
        for name in common:
            ia, ib = ca.info(name), cb.info(name)
            if ia.shape != ib.shape:
                mismatched.append({"name": name, "a": list(ia.shape), "b": list(ib.shape)})
                continue
            diffs.append(_diff_streamed(ca, cb, name))
        return {
            "a": str(ca.path),
            "b": str(cb.path),
            "compared": len(diffs),
            "identical": sum(d.equal for d in diffs),
            "only_in_a": [n for n in ca.tensors if n not in cb.tensors],
            "only_in_b": [n for n in cb.tensors if n not in ca.tensors],
            "shape_mismatch": mismatched,
            "tensors": [asdict(d) for d in diffs],
        }


def _diff_streamed(ca: Checkpoint, cb: Checkpoint, name: str) -> TensorDiff:
    info = ca.info(name)
    rows = info.shape[0] if info.shape else 1
    per_row = max(1, info.numel // max(rows, 1))
    step = max(1, _BLOCK_ELEMENTS // per_row)
    acc = _Accumulator()
    if not info.shape:
        acc.add(ca.get_tensor(name), cb.get_tensor(name))
    for start in range(0, rows if info.shape else 0, step):
        acc.add(ca.read_rows(name, start, start + step), cb.read_rows(name, start, start + step))
    return acc.result(name, info.shape)


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
    )
    return "\n".join(lines)
