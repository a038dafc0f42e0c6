"""Benchmark the GGML encoders (weightsmith.ggml) against llama.cpp's C on one tensor.

Times ``quantize_tensor`` per type, without and with an importance matrix, on a
(576, 1536) float32 tensor (SmolLM2-135M's ffn_down shape; seeded Gaussian * 0.05) and, when
the llama.cpp peer is built (``bash .ci/peers.sh`` -> ``$LLAMACPP_VENV``), llama.cpp's own
``ggml_quantize_chunk`` (one thread, through ctypes) on the same rows, checking the bytes agree.
Median of ``--repeat`` runs.

    python benchmarks/kquants_bench.py [--rows 576] [--cols 1536] [--repeat 3]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import time
from pathlib import Path

import numpy as np

from weightsmith.ggml.kquants import BLOCK_BYTES, quantize_tensor
from weightsmith.ggml.kquants_legacy import LEGACY_BLOCK_BYTES

GGML_TYPE = {"Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8,
             "Q2_K": 10, "Q3_K": 11, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14}  # fmt: skip


def llama_cpp_quantizer():
    venv = os.environ.get("LLAMACPP_VENV")
    lib = Path(venv or "") / "build" / "bin" / "libggml-base.so"
    if not venv or not lib.exists():
        return None
    c = ctypes.CDLL(str(lib))
    c.ggml_quantize_chunk.restype = ctypes.c_size_t
    c.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                      ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]  # fmt: skip

    def run(x: np.ndarray, t: str, imx: np.ndarray | None) -> np.ndarray:
        rows, n = x.shape
        block = BLOCK_BYTES.get(t) or LEGACY_BLOCK_BYTES[t]
        out = np.zeros((rows, n // (256 if t in BLOCK_BYTES else 32) * block), np.uint8)
        ptr = None if imx is None else imx.ctypes.data
        c.ggml_quantize_chunk(GGML_TYPE[t], x.ctypes.data, out.ctypes.data, 0, rows, n, ptr)
        return out

    return run


def timed(fn, repeat: int) -> tuple[float, np.ndarray]:
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=576)
    ap.add_argument("--cols", type=int, default=1536)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((a.rows, a.cols)) * 0.05).astype(np.float32)
    imx = rng.lognormal(0, 2, a.cols).astype(np.float32)
    ref = llama_cpp_quantizer()
    print(
        f"tensor {a.rows} x {a.cols}, median of {a.repeat}; llama.cpp: {'yes' if ref else 'no peer'}"
    )
    print("| type | imatrix | weightsmith s | llama.cpp s (1 thread) | bytes equal |")
    print("|---|---|---:|---:|---|")
    for t in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        for use in (False, True):
            if t in LEGACY_BLOCK_BYTES and not use:
                continue  # gguf.quants' own code without an imatrix
            w = imx if use else None
            ours_s, ours = timed(lambda t=t, w=w: quantize_tensor(x, t, w), a.repeat)
            c_s, same = "–", "–"
            if ref is not None:
                secs, theirs = timed(lambda t=t, w=w: ref(x, t, w), a.repeat)
                c_s, same = f"{secs:.3f}", str(bool((theirs == ours).all()))
            print(f"| {t} | {'yes' if use else 'no'} | {ours_s:.3f} | {c_s} | {same} |")


if __name__ == "__main__":
    main()
