"""Data-free W8A8 weights and scales bit-identical to llm-compressor 0.14's
``model_free_ptq(scheme="W8A8")`` on tiny seeded models in bf16, fp16 and fp32 (config.json's
quantization_config equal too). Needs the peer venv (bash .ci/peers.sh): skipped without it,
a failure under WEIGHTSMITH_REQUIRE_PEERS=1."""

from __future__ import annotations

import pytest
import torch

from tests.compress.llmcompressor_peer import assert_same_output, run_model_free_ptq
from weightsmith.compress import QuantConfig, quantize_checkpoint
from weightsmith.testing import build_tiny_model
from weightsmith.testing.peers import require_peer

pytestmark = pytest.mark.slow

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@pytest.fixture(scope="module")
def peer_runs(tmp_path_factory):
    require_peer("llmcompressor")
    root = tmp_path_factory.mktemp("w8a8-parity")
    jobs = []
    for tag, dtype in DTYPES.items():
        src = build_tiny_model(root / tag, "llama", seed=11, dtype=dtype)  # sharded: 100 KB
        jobs.append((src, root / f"lc-{tag}", "W8A8"))
    run_model_free_ptq(jobs)
    return root


@pytest.mark.parametrize("tag", list(DTYPES))
def test_bit_identical_to_model_free_ptq(peer_runs, tag):
    ours = peer_runs / f"ws-{tag}"
    quantize_checkpoint(peer_runs / tag, ours, QuantConfig("w8a8"), progress=False)
    assert_same_output(ours, peer_runs / f"lc-{tag}")
