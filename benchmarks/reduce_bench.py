"""CPU and wall time of one tensor's native bfloat16 merge (statistics + output) for nuslerp,
multislerp and model_stock, with the native torch-order reductions and with torch's (the
previous path: a kernel writes each reduced tensor, torch reduces it), and whether the bits
agree. CPU time is the process's (all threads), so it means something on a busy machine.

    python benchmarks/reduce_bench.py [--cache ~/.cache/weightsmith/merge-bench]
        [--tensor model.embed_tokens.weight] [--repeat 3]
    python benchmarks/reduce_bench.py --all     # every tensor of the model, one run each
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from safetensors import safe_open

from weightsmith.core.parallel import compute_pool
from weightsmith.merge.methods import get_method, sphere_native
from weightsmith.merge.methods.base import TensorChunks, TensorParams, with_defaults


class Stored(TensorChunks):
    def __init__(self, tensors: list[torch.Tensor], name: str) -> None:
        super().__init__(tensors, name)
        self._flat = [t.reshape(-1) for t in tensors]

    def stored(self, i: int):
        import contextlib

        return contextlib.nullcontext(self._flat[i])


def load(cache: Path, name: str) -> list[torch.Tensor]:
    out = []
    for model in ("base", "ft1", "ft2"):
        for shard in sorted((cache / model).glob("*.safetensors")):
            with safe_open(str(shard), "pt") as f:
                if name in f.keys():  # noqa: SIM118 (safe_open has no __contains__)
                    out.append(f.get_tensor(name))
    return out


def run(method: str, xs: list[torch.Tensor], native: bool) -> tuple[float, float, torch.Tensor]:
    m = get_method(method)
    models = () if method == "model_stock" else ({"weight": 1.0}, {"weight": 1.0})
    p = TensorParams("t", {}, models, has_base=True, compute_dtype=torch.bfloat16)
    p = with_defaults(m, p, len(xs))
    saved = sphere_native.native_reductions
    if not native:
        sphere_native.native_reductions = lambda: False
    try:
        c0, w0 = time.process_time(), time.perf_counter()
        with compute_pool(2):
            out = torch.cat(
                [c.reshape(-1) for c in m.stream_stored(Stored(xs, "t"), p, xs[0].dtype)]
            )
        return time.process_time() - c0, time.perf_counter() - w0, out
    finally:
        sphere_native.native_reductions = saved


def names(cache: Path) -> list[str]:
    out = []
    for shard in sorted((cache / "base").glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            out.extend(f.keys())
    return out


def whole_model(cache: Path) -> None:
    """Every tensor, each method with both reductions: summed CPU and wall, bits compared."""
    for method in ("nuslerp", "multislerp", "model_stock"):
        cpu, wall, same = {False: 0.0, True: 0.0}, {False: 0.0, True: 0.0}, 0
        tensors = names(cache)
        for name in tensors:
            xs = load(cache, name)
            outs = {}
            for native in (False, True):
                c, w, outs[native] = run(method, xs, native)
                cpu[native] += c
                wall[native] += w
            same += torch.equal(outs[True].view(torch.int16), outs[False].view(torch.int16))
        print(
            f"{method:12s} all {len(tensors)} tensors: torch reductions cpu {cpu[False]:.2f} s "
            f"wall {wall[False]:.2f} s | native cpu {cpu[True]:.2f} s wall {wall[True]:.2f} s "
            f"| same bits {same}/{len(tensors)}",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache/weightsmith/merge-bench")
    ap.add_argument("--tensor", default="model.embed_tokens.weight")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--all", action="store_true", help="every tensor, one run each")
    a = ap.parse_args()
    if a.all:
        sphere_native.native_reductions()
        return whole_model(a.cache)
    xs = load(a.cache, a.tensor)
    sphere_native.native_reductions()  # the once-per-process check, outside the timings
    print(f"{a.tensor}: {xs[0].numel()} entries, torch threads {torch.get_num_threads()}")
    for method in ("nuslerp", "multislerp", "model_stock"):
        rows = {}
        for native in (False, True):
            runs = [run(method, xs, native) for _ in range(a.repeat)]
            cpu = sorted(r[0] for r in runs)[len(runs) // 2]
            wall = sorted(r[1] for r in runs)[len(runs) // 2]
            rows[native] = (cpu, wall, runs[0][2])
        same = torch.equal(rows[True][2].view(torch.int16), rows[False][2].view(torch.int16))
        print(
            f"{method:12s} torch reductions cpu {rows[False][0]:.3f} s wall {rows[False][1]:.3f} s"
            f" | native cpu {rows[True][0]:.3f} s wall {rows[True][1]:.3f} s | same bits: {same}"
        )


if __name__ == "__main__":
    main()
