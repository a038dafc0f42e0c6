"""Calibrated quantization and pruning with ``--device cuda`` against ``--device cpu``.

Both devices calibrate on the same token windows; they differ only in float32 rounding (GPU
matmul and reduction order; TF32 stays off). Where a method makes discrete choices from those
numbers (GPTQ's and AWQ's rounding of values near a level boundary, SparseGPT's masks), a
flipped choice moves the result by one quantization step or one pruned weight and GPTQ/SparseGPT
spread the difference over the later columns, so the criterion is relative: the device must move
the weights far less than the method does, ‖cuda − cpu‖ ≤ ``bound``·‖cpu − original‖ (bounds per
method below; measured on an H200: GPTQ 0.03, GPTQ act-order 0.14, AWQ 0.23 (one grid point
chosen differently moves a whole mapping's scales), SmoothQuant 0.004, Wanda and SparseGPT 0),
and the two outputs' perplexity
(computed on the CPU) within 2 %. Methods without such choices (Wanda's masks from activation
norms, SmoothQuant's scales) get the tight bound.
"""

from __future__ import annotations

import pytest

from tests.cuda.cuda_testlib import gap, on_both, run

CALIB = ["--calib-samples", "16", "--seq-len", "64"]
CASES = {
    "gptq": (["compress", "quantize", "--method", "gptq", "--group-size", "32"], 0.2),
    "gptq act-order": (["compress", "quantize", "--method", "gptq", "--group-size", "32",
                        "--act-order"], 0.3),
    "awq float32 search": (["compress", "quantize", "--method", "awq", "--group-size", "32",
                            "--awq-search-dtype", "float32"], 0.3),
    "w8a8 smoothquant": (["compress", "quantize", "--method", "w8a8", "--smoothquant"], 0.05),
    "wanda 50%": (["compress", "prune", "--method", "wanda", "--sparsity", "0.5"], 0.05),
    "wanda 2:4": (["compress", "prune", "--method", "wanda", "--pattern", "2:4"], 0.05),
    "sparsegpt 50%": (["compress", "prune", "--method", "sparsegpt", "--sparsity", "0.5"], 0.2),
    "sparsegpt 2:4": (["compress", "prune", "--method", "sparsegpt", "--pattern", "2:4"], 0.2),
}  # fmt: skip


def _ppl(model, text) -> float:
    return run("eval", "ppl", model, "--data", text, "--seq-len", "64", "--max-tokens", "4096",
               "--device", "cpu")["ppl"]  # fmt: skip


@pytest.mark.parametrize("name", sorted(CASES))
def test_calibrated_method_on_cuda_gives_the_cpu_result(name, llama, calib, tmp_path):
    cmd, bound = CASES[name]
    outs = on_both(tmp_path, cmd[0], cmd[1], llama, *cmd[2:], "--calib", calib, *CALIB)
    device, method = gap(llama, outs["cpu"], outs["other"])
    ppl = {k: _ppl(v, calib) for k, v in outs.items()}
    print(f"QUANT {name}: ‖Δdevice‖/‖Δmethod‖ = {device / method:.4f}, ppl cpu {ppl['cpu']:.4f} "
          f"other {ppl['other']:.4f}")  # fmt: skip
    assert method > 0
    assert device <= bound * method, f"{name}: the device moved the result {device / method:.3f}"
    assert ppl["other"] == pytest.approx(ppl["cpu"], rel=0.02)


def test_awq_default_search_dtype_on_cuda(llama, calib, tmp_path):
    """On CUDA, ``--awq-search-dtype auto`` searches in bfloat16 (the CPU here in float32): a
    different search, so only its quality is compared: perplexity within 3 % of the CPU's."""
    cmd = ["compress", "quantize", llama, "--method", "awq", "--group-size", "32"]
    outs = on_both(tmp_path, *cmd, "--calib", calib, *CALIB)
    ppl = {k: _ppl(v, calib) for k, v in outs.items()}
    print(f"QUANT awq auto search dtype: ppl cpu {ppl['cpu']:.4f} other {ppl['other']:.4f}")
    assert ppl["other"] == pytest.approx(ppl["cpu"], rel=0.03)


def test_eval_sensitivity_on_cuda(llama, calib):
    """The sensitivity pass on either device: the same units and schemes, each KL within 1 %
    (the RTN round trips are the same levels; the forward passes differ in float32 rounding).
    The bound is set from the float32 logit gap, not yet from a GPU run."""
    from tests.cuda.cuda_testlib import OTHER

    args = ["eval", "sensitivity", llama, "--calib", calib, "--samples", "2", "--seq-len", "32",
            "--schemes", "w4g32,w3g32"]  # fmt: skip
    cpu = run(*args, "--device", "cpu")
    other = run(*args, "--device", OTHER)
    assert cpu["device"] == "cpu" and other["device"].startswith(OTHER.split(":")[0])
    assert [u["name"] for u in other["units"]] == [u["name"] for u in cpu["units"]]
    assert sum(v["kl"] for u in cpu["units"] for v in u["schemes"].values()) > 0
    for a, b in zip(cpu["units"], other["units"], strict=True):
        for scheme, v in a["schemes"].items():
            got = b["schemes"][scheme]["kl"]
            assert got == pytest.approx(v["kl"], rel=1e-2, abs=1e-7), (a["name"], scheme)


def test_eval_ppl_on_cuda(llama, calib):
    """The same windows through the model on either device: float32 logits agree to ~1e-6,
    the perplexity to 1e-5 relative."""
    args = ["eval", "ppl", llama, "--data", calib, "--seq-len", "64", "--max-tokens", "4096"]
    from tests.cuda.cuda_testlib import OTHER

    cpu = run(*args, "--device", "cpu")
    other = run(*args, "--device", OTHER)
    assert other["tokens"] == cpu["tokens"]
    assert other["ppl"] == pytest.approx(cpu["ppl"], rel=1e-5)
