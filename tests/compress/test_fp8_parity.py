"""FP8 weights and scales bit-identical to llm-compressor 0.14's ``model_free_ptq``
(FP8_DYNAMIC, FP8_BLOCK) on tiny seeded models in bf16, fp16 and fp32; config.json's
quantization_config equal too. Needs the peer venv (bash .ci/peers.sh): skipped without it,
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
SCHEMES = {"dynamic": "FP8_DYNAMIC", "block": "FP8_BLOCK"}


@pytest.fixture(scope="module")
def peer_runs(tmp_path_factory):
    require_peer("llmcompressor")
    root = tmp_path_factory.mktemp("fp8-parity")
    jobs, models = [], {}
    for tag, dtype in DTYPES.items():
        # hidden 128 / intermediate 256: whole 128-column blocks; k/v_proj have 64 rows (a
        # padded half block)
        src = build_tiny_model(root / tag, "llama", seed=7, dtype=dtype, hidden_size=128,
                               intermediate_size=256, max_shard_size="100MB")  # fmt: skip
        models[tag] = src
        for scheme, preset in SCHEMES.items():
            jobs.append((src, root / f"lc-{tag}-{scheme}", preset))
    run_model_free_ptq(jobs)
    return root, models


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("tag", list(DTYPES))
def test_bit_identical_to_model_free_ptq(peer_runs, tag, scheme):
    root, models = peer_runs
    ours = root / f"ws-{tag}-{scheme}"
    quantize_checkpoint(models[tag], ours, QuantConfig("fp8", scheme=scheme), progress=False)
    assert_same_output(ours, root / f"lc-{tag}-{scheme}")
