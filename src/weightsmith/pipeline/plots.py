"""PNG plots of a recipe run (per-layer weight error and sparsity, size vs perplexity) and of
``compare`` (per-tensor difference by layer), each with its numbers beside it as JSON and CSV
so CI can diff them.

matplotlib is optional (``pip install 'weightsmith[plots]'``) and imported only here, drawing
with the Agg canvas (no display, no global backend switch). The numbers come from
:func:`weightsmith.compare.compare_checkpoints` and the step reports the runner already holds.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any

from weightsmith.errors import ConfigError

PLOTS_HINT = "plots need matplotlib, which is not installed: pip install 'weightsmith[plots]'"


def require_matplotlib() -> None:
    """Fail early, in one line, when matplotlib is missing (before any work starts)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ConfigError(PLOTS_HINT) from None


# ----------------------------------------------------------------------------- numbers
def layer_stats(tensors: list[dict]) -> list[dict]:
    """Pool ``compare`` per-tensor statistics over each decoder layer's 2-D weights.

    ``rel_l2 = sqrt(Σ||b-a||²) / sqrt(Σ||a||²)``; cosine from the pooled norms
    (``<a,b> = (||a||² + ||b||² - ||b-a||²) / 2``); ``sparsity`` = zeros in b / elements.
    """
    acc: dict[int, dict[str, float]] = {}
    for t in tensors:
        if t.get("layer") is None or len(t["shape"]) != 2:
            continue
        s = acc.setdefault(t["layer"], dict(aa=0.0, bb=0.0, dd=0.0, zeros=0, numel=0, n=0))
        s["aa"] += t["norm_a"] ** 2
        s["bb"] += t["norm_b"] ** 2
        s["dd"] += t["norm_diff"] ** 2
        s["zeros"] += t["zeros_b"]
        s["numel"] += t["numel"]
        s["n"] += 1
    out = []
    for layer, s in sorted(acc.items()):
        na, nb = math.sqrt(s["aa"]), math.sqrt(s["bb"])
        rel = s["dd"] ** 0.5 / na if na else (0.0 if s["dd"] == 0 else math.inf)
        cos = 1.0 if na == nb == 0 else ((s["aa"] + s["bb"] - s["dd"]) / (2 * na * nb) if na and nb else 0.0)  # fmt: skip
        out.append({"layer": layer, "rel_l2": rel, "cosine": cos,
                    "sparsity": s["zeros"] / s["numel"] if s["numel"] else 0.0,
                    "tensors": int(s["n"])})  # fmt: skip
    return out


def weight_change(reference: str | os.PathLike[str], output: str | os.PathLike[str]) -> dict:
    """Per-layer weight error and sparsity of ``output`` against ``reference`` (one read of
    each, through ``compare``; quantized outputs are dequantized)."""
    from weightsmith.compare import compare_checkpoints

    r = compare_checkpoints(reference, output)
    return {
        "reference": str(reference),
        "layers": layer_stats(r["tensors"]),
        "compared": r["compared"],
        "dequantized": r["dequantized"],
        "only_in_reference": len(r["only_in_a"]),
        "only_in_output": len(r["only_in_b"]),
        "shape_mismatch": len(r["shape_mismatch"]),
    }


def size_ppl_points(steps: list[dict]) -> list[dict]:
    """(size, perplexity) of every model an eval step measured (and of its reference),
    labelled with the id of the step that produced the model (or the path's name)."""

    def key(p: str) -> str:
        return str(Path(p).resolve())

    made_by = {key(s["output"]): s["id"] for s in steps if s["kind"] != "eval" and s.get("output")}
    points: list[dict] = []
    seen: set[tuple] = set()
    for s in steps:
        result = s.get("result") or {}
        if s["kind"] != "eval" or not isinstance(result.get("ppl"), (int, float)):
            continue
        candidates = [("model", s.get("output"), s.get("output_size"), result["ppl"])]
        if result.get("reference") and isinstance(result.get("reference_ppl"), (int, float)):
            candidates.append(
                ("reference", result["reference"], s.get("reference_size"), result["reference_ppl"])
            )
        for role, model, size, ppl in candidates:
            if model is None or (key(model), ppl) in seen:
                continue
            seen.add((key(model), ppl))
            label = made_by.get(key(model), Path(model).name)
            points.append({"label": label, "eval": s["id"], "role": role, "model": str(model),
                           "size": size, "ppl": ppl})  # fmt: skip
    return points


# ----------------------------------------------------------------------------- files
def _finite(x: Any) -> Any:
    return None if isinstance(x, float) and not math.isfinite(x) else x


def write_numbers(png: Path, meta: dict, rows: list[dict], columns: list[str]) -> list[Path]:
    """``<png stem>.json`` (meta + rows) and ``<png stem>.csv`` (the rows) beside the PNG."""
    rows = [{c: _finite(r.get(c)) for c in columns} for r in rows]
    js, cs = png.with_suffix(".json"), png.with_suffix(".csv")
    js.write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n", encoding="utf-8")
    with cs.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)
    return [js, cs]


def _figure(rows: int, height: float = 3.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, height * rows), layout="constrained")
    FigureCanvasAgg(fig)  # the Agg canvas renders PNGs without touching pyplot's backend
    return fig, [fig.add_subplot(rows, 1, k + 1) for k in range(rows)]


def plot_layers(step_id: str, kind: str, change: dict, png: Path) -> list[Path]:
    """Bars per decoder layer: relative weight error vs the step's input, and sparsity when
    the step left any zeros."""
    layers = change["layers"]
    xs = [r["layer"] for r in layers]
    sparse = any(r["sparsity"] > 0 for r in layers)
    fig, axes = _figure(2 if sparse else 1)
    ref = Path(change["reference"]).name
    axes[0].bar(xs, [_finite(r["rel_l2"]) or 0.0 for r in layers], color="tab:red")
    axes[0].set_ylabel("relative L2 error")
    axes[0].set_title(f"{step_id} ({kind}): weights vs {ref}, per decoder layer")
    if sparse:
        axes[1].bar(xs, [r["sparsity"] for r in layers], color="tab:blue")
        axes[1].set_ylabel("sparsity (zero fraction)")
        axes[1].set_ylim(0, 1)
    for ax in axes:
        ax.set_xlabel("decoder layer")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(axis="y", alpha=0.3)
    fig.savefig(png, dpi=100)
    meta = {"step": step_id, "kind": kind, **{k: v for k, v in change.items() if k != "layers"}}
    cols = ["layer", "rel_l2", "cosine", "sparsity", "tensors"]
    return [png, *write_numbers(png, meta, layers, cols)]


def plot_size_ppl(points: list[dict], png: Path) -> list[Path]:
    """Perplexity against model size on disk, one labelled point per evaluated model."""
    fig, (ax,) = _figure(1, height=4.5)
    drawn = [p for p in points if p["size"]]
    for role, color in (("model", "tab:blue"), ("reference", "tab:orange")):
        mine = [p for p in drawn if p["role"] == role]
        if mine:
            ax.scatter([p["size"] / 2**20 for p in mine], [p["ppl"] for p in mine],
                       color=color, label=f"evaluated {role}")  # fmt: skip
    for p in drawn:
        ax.annotate(p["label"], (p["size"] / 2**20, p["ppl"]), textcoords="offset points",
                    xytext=(5, 5))  # fmt: skip
    ax.ticklabel_format(useOffset=False)
    ax.legend(loc="best")
    ax.set_xlabel("size on disk (MiB)")
    ax.set_ylabel("perplexity")
    ax.set_title("size vs perplexity across steps")
    ax.grid(alpha=0.3)
    fig.savefig(png, dpi=100)
    cols = ["label", "eval", "role", "size", "ppl", "model"]
    return [png, *write_numbers(png, {"points": len(drawn)}, points, cols)]


def write_recipe_plots(report: dict, out_dir: str | os.PathLike[str]) -> list[str]:
    """Every plot a run's report supports: ``<step>-layers.png`` per step that changed
    weights, ``size-vs-ppl.png`` when eval steps measured perplexity."""
    require_matplotlib()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    for s in report["steps"]:
        change = s.get("weights")
        if change and change.get("layers"):
            files += plot_layers(s["id"], s["kind"], change, out / f"{s['id']}-layers.png")
    points = size_ppl_points(report["steps"])
    if points:
        files += plot_size_ppl(points, out / "size-vs-ppl.png")
    return [str(f) for f in files]


def plot_comparison(result: dict, png: str | os.PathLike[str]) -> list[str]:
    """``compare --plot``: relative L2 and cosine of every compared tensor, grouped by layer
    (tensors outside the decoder layers last)."""
    require_matplotlib()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    rows = sorted(result["tensors"], key=lambda t: (t["layer"] is None, t["layer"] or 0))
    rows = [{**t, "sparsity": t["zeros_b"] / t["numel"] if t["numel"] else 0.0} for t in rows]
    fig, (ax_rel, ax_cos) = _figure(2, height=3.2)
    xs = list(range(len(rows)))
    colors = ["tab:gray" if t["layer"] is None else f"C{t['layer'] % 10}" for t in rows]
    rel = [_finite(t["rel_l2"]) or 0.0 for t in rows]
    ax_rel.bar(xs, rel, color=colors)
    if any(v > 0 for v in rel) and max(rel) > 100 * min(v for v in rel if v > 0):
        ax_rel.set_yscale("log")
    ax_rel.set_ylabel("relative L2 ||b-a||/||a||")
    ax_rel.set_title(f"{Path(result['b']).name} vs {Path(result['a']).name}, per tensor")
    cos = [t["cosine"] for t in rows]
    ax_cos.scatter(xs, cos, c=colors, s=14)
    ax_cos.set_ylabel("cosine")
    lo = min(cos, default=1.0)
    ax_cos.set_ylim(lo - 0.05 * (1 - lo) - 1e-6, 1 + 0.05 * (1 - lo) + 1e-6)
    ticks = {}  # first tensor of each layer -> "L<n>"
    for x, t in enumerate(rows):
        ticks.setdefault(t["layer"], x)
    for ax in (ax_rel, ax_cos):
        ax.set_xticks(list(ticks.values()),
                      ["other" if k is None else f"L{k}" for k in ticks])  # fmt: skip
        ax.set_xlabel("tensor (grouped by decoder layer)")
        ax.grid(axis="y", alpha=0.3)
    fig.savefig(png, dpi=100)
    meta = {"a": result["a"], "b": result["b"], "compared": result["compared"]}
    cols = ["name", "layer", "rel_l2", "cosine", "max_abs", "sparsity", "dequantized"]
    return [str(p) for p in (png, *write_numbers(png, meta, rows, cols))]
