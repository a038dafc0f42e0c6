"""An imatrix file written by :func:`save_imatrix` is read by llama.cpp's own ``llama-quantize
--imatrix FILE`` (the peer build), and the tensors it writes equal ``quantize_k`` with the
importance :func:`load_imatrix` reads back, byte for byte, for every K type."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from weightsmith.ggml.imatrix import Imatrix, load_imatrix, save_imatrix
from weightsmith.ggml.kquants import K_TYPES, quantize_k

pytestmark = pytest.mark.slow


def test_llama_quantize_reads_our_imatrix_file(
    tmp_path, tiny_llama_gguf, llama_quantize_tool, gguf_tensors
):
    model = tiny_llama_gguf(tmp_path / "m.gguf", n_layer=1, seed=7)
    rng = np.random.default_rng(7)
    im = Imatrix(datasets=["calib.txt"], chunk_count=5, chunk_size=64)
    for name, t in model.tensors.items():
        if name.startswith("blk."):  # llama-imatrix records only the blk.* matmuls
            im.sums[name] = (rng.lognormal(0, 2, t.shape[1]) * 320).astype(np.float32)
            im.counts[name] = 320
    path = save_imatrix(tmp_path / "m.imatrix.gguf", im)
    importance = load_imatrix(path).importance()
    for qtype in K_TYPES:
        out = tmp_path / f"m-{qtype}.gguf"
        cmd = [
            str(llama_quantize_tool),
            "--pure",
            "--imatrix",
            str(path),
            str(model.path),
            str(out),
        ]
        proc = subprocess.run([*cmd, qtype, "2"], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert f"loaded {len(im.sums)} importance matrix entries" in proc.stdout + proc.stderr
        got = gguf_tensors(out)
        for name, src in model.tensors.items():
            ggml_type, data = got[name]
            assert ggml_type == qtype
            ours = quantize_k(src, qtype, importance.get(name))
            assert (data == ours).all(), f"{qtype} {name}"
