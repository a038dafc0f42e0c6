"""llama.cpp as the oracle for the GGML tests: tiny F32 GGUF models and the peer's quantizer.

The peer (``bash .ci/peers.sh`` -> ``$LLAMACPP_VENV``) is llama-cpp-python built from source;
its ``llama_model_quantize`` (ctypes) is the function ``llama-quantize`` calls, and the same
build folder holds the ``llama-quantize`` tool for the imatrix-file tests.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest

from weightsmith.testing.peers import require_peer

# llama_ftype values (include/llama.h of the bundled llama.cpp)
FTYPES = {
    "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K_S": 11,
    "Q3_K_M": 12, "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16, "Q5_K_M": 17,
    "Q6_K": 18, "Q2_K_S": 21, "F16": 1, "BF16": 32, "TQ1_0": 36, "TQ2_0": 37,
}  # fmt: skip

DRIVER = r"""
import ctypes, sys
import numpy as np
import llama_cpp
src, dst, ftype, pure, imx = sys.argv[1:6]
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = int(ftype)
params.pure = pure == "1"
params.nthread = 2
keep = []
if imx != "-":
    z = np.load(imx)
    arr = (llama_cpp.llama_model_imatrix_data * (len(z.files) + 1))()
    for i, k in enumerate(z.files):
        v = np.ascontiguousarray(z[k], dtype=np.float32)
        keep.append(v)
        arr[i].name = k.encode()
        arr[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        arr[i].size = v.size
    arr[len(z.files)].name = None
    params.imatrix = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
sys.exit(llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params)))
"""


@dataclass(frozen=True)
class TinyLlama:
    """A llama-architecture F32 GGUF and the tensors in it (numpy layout: rows, columns)."""

    path: Path
    tensors: dict[str, np.ndarray]
    n_layer: int
    n_head: int
    n_head_kv: int


def build_tiny_llama(
    path: Path,
    *,
    n_layer: int,
    n_embd: int = 256,
    n_ff: int = 256,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_vocab: int = 256,
    tied: bool = False,
    seed: int = 0,
    pool: np.ndarray | None = None,
) -> TinyLlama:
    """Write an F32 GGUF llama model with the metadata ``llama_model_quantize`` reads.

    Weights are drawn from ``pool`` (e.g. real model weights, cycled) when given, otherwise from
    a heavy-tailed random distribution (t with 3 degrees of freedom, scale 0.02)."""
    rng = np.random.default_rng(seed)
    head_dim = n_embd // n_head
    shapes = {"token_embd.weight": (n_vocab, n_embd)}
    if not tied:
        shapes["output.weight"] = (n_vocab, n_embd)
    for i in range(n_layer):
        b = f"blk.{i}."
        shapes |= {
            b + "attn_q.weight": (n_embd, n_embd),
            b + "attn_k.weight": (n_head_kv * head_dim, n_embd),
            b + "attn_v.weight": (n_head_kv * head_dim, n_embd),
            b + "attn_output.weight": (n_embd, n_embd),
            b + "ffn_gate.weight": (n_ff, n_embd),
            b + "ffn_up.weight": (n_ff, n_embd),
            b + "ffn_down.weight": (n_embd, n_ff),
        }
    tensors: dict[str, np.ndarray] = {}
    offset = 0
    for name, shape in shapes.items():
        size = int(np.prod(shape))
        if pool is not None:
            idx = (np.arange(size) + offset) % pool.size
            offset += size
            tensors[name] = pool[idx].reshape(shape).astype(np.float32)
        else:
            tensors[name] = (rng.standard_t(3, shape) * 0.02).astype(np.float32)
    norms = {"output_norm.weight": np.ones(n_embd, np.float32)}
    for i in range(n_layer):
        norms[f"blk.{i}.attn_norm.weight"] = np.ones(n_embd, np.float32)
        norms[f"blk.{i}.ffn_norm.weight"] = np.ones(n_embd, np.float32)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(n_layer)
    w.add_context_length(256)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(n_vocab)
    w.add_file_type(0)
    for name, t in (tensors | norms).items():
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return TinyLlama(path, tensors, n_layer, n_head, n_head_kv)


def read_gguf_tensors(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    """name -> (GGML type name, raw data as GGUFReader exposes it)."""
    reader = gguf.GGUFReader(str(path))
    return {t.name: (t.tensor_type.name, np.array(t.data)) for t in reader.tensors}


@pytest.fixture(scope="session")
def llamacpp_python() -> Path:
    """The llama.cpp peer's interpreter (skips without it; fails under REQUIRE_PEERS=1)."""
    return require_peer("llamacpp")


@pytest.fixture(scope="session")
def llama_quantize(llamacpp_python: Path) -> Callable[..., dict[str, tuple[str, np.ndarray]]]:
    """``llama_quantize(src, dst, mix, pure=False, imatrix=None)``: run llama.cpp's
    ``llama_model_quantize`` in the peer and return the written tensors."""

    def run(
        src: Path, dst: Path, mix: str, *, pure: bool = False, imatrix: dict | None = None
    ) -> dict[str, tuple[str, np.ndarray]]:
        imx = "-"
        if imatrix is not None:
            imx = str(dst.with_suffix(".imatrix.npz"))
            np.savez(imx, **{k: np.asarray(v, np.float32) for k, v in imatrix.items()})
        cmd = [str(llamacpp_python), "-c", DRIVER, str(src), str(dst), str(FTYPES[mix])]
        proc = subprocess.run([*cmd, "1" if pure else "0", imx], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return read_gguf_tensors(dst)

    return run


@pytest.fixture(scope="session")
def llama_quantize_tool(llamacpp_python: Path) -> Path:
    """The ``llama-quantize`` binary built next to the bindings by .ci/peers.sh."""
    tool = llamacpp_python.parents[1] / "build" / "bin" / "llama-quantize"
    if not tool.exists():
        pytest.fail(
            f"{tool} missing: rebuild the peer (rm -rf {tool.parents[2]}; bash .ci/peers.sh)"
        )
    return tool


@pytest.fixture(scope="session")
def gguf_tensors() -> Callable[[Path], dict[str, tuple[str, np.ndarray]]]:
    """``gguf_tensors(path)``: :func:`read_gguf_tensors`."""
    return read_gguf_tensors


@pytest.fixture(scope="session")
def tiny_llama_gguf() -> Callable[..., TinyLlama]:
    """``tiny_llama_gguf(path, n_layer=..., ...)``: :func:`build_tiny_llama`."""
    return build_tiny_llama
