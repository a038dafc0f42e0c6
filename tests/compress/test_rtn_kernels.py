"""Native RTN and packing (``kernels/quant_kernels.c``) and the reused work buffers of the
streamed data-free path: exactly the torch code's bits, whatever the buffers held before."""

from __future__ import annotations

import hashlib
import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from weightsmith.compress import QuantConfig, quantize_checkpoint
from weightsmith.compress.packing import pack_int32
from weightsmith.compress.rtn import rtn_quantize
from weightsmith.io import CheckpointWriter, TensorSpec
from weightsmith.kernels import quant
from weightsmith.kernels.quant import Scratch, count_nonfinite, quant_kernels

pytestmark = pytest.mark.skipif(quant_kernels() is None, reason="no C compiler for the kernels")


@pytest.fixture
def torch_only(monkeypatch):
    """Run the block with the kernels switched off (the portable torch code)."""

    def off():
        monkeypatch.setenv("WEIGHTSMITH_KERNELS", "0")

    def on():
        monkeypatch.delenv("WEIGHTSMITH_KERNELS", raising=False)

    return off, on


def _weights(rows: int, cols: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 10.0 ** (seed % 5 - 3)
    w[0] = 0.0  # an all-zero row: scale 1
    if rows > 2:
        w[1] = w[1].abs()  # no negative value: lo clamps to 0
        w[2] = -w[2].abs()  # no positive value
    if rows > 3:  # exact ties at half a step: round half to even ([-1.5, .75, .3, 0] -> -7.5)
        w[3, :4] = torch.tensor([-1.5, 0.75, 0.3, 0.0])
        w[3, 4:] = 0.0
    return w.to(dtype)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("group_size", [-1, 16])
def test_native_rtn_gives_the_torch_bits(
    torch_only, bits, symmetric, dtype, scale_dtype, group_size
) -> None:
    off, on = torch_only
    zero_min = None if symmetric else -(1 << (bits - 1)) + 1  # gptq v1's raised zero floor
    for seed in range(4):
        w = _weights(9, 64, dtype, seed)
        cfg = QuantConfig(bits=bits, group_size=group_size, symmetric=symmetric)
        on()
        got = rtn_quantize(w, cfg, dtype=scale_dtype, zero_min=zero_min)
        assert quant.rtn_rows(w, 16, bits, symmetric, None, scale_dtype, got.q.clone()) is not None
        off()
        want = rtn_quantize(w, cfg, dtype=scale_dtype, zero_min=zero_min)
        assert quant.rtn_rows(w, 16, bits, symmetric, None, scale_dtype, got.q) is None
        for a, b in ((got.q, want.q), (got.scale, want.scale), (got.zero, want.zero)):
            assert a.dtype == b.dtype and torch.equal(a, b), (seed, a, b)


@pytest.mark.parametrize("bits", range(1, 9))
def test_native_packing_gives_the_torch_words(torch_only, bits) -> None:
    off, on = torch_only
    g = torch.Generator().manual_seed(bits)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    for cols in (1, 7, 8, 31, 64, 100):
        q = torch.randint(lo, hi + 1, (5, cols), generator=g, dtype=torch.int8)
        on()
        got = pack_int32(q, bits, dim=1)
        off()
        want = pack_int32(q, bits, dim=1)
        assert got.dtype == want.dtype == torch.int32 and torch.equal(got, want), (bits, cols)


def test_pack_4bit_hand_example_natively() -> None:
    # levels -8..7 offset by 8: 0..15; word = Σ u_j << 4j over the first 8, low bits first
    q = torch.arange(-8, 8, dtype=torch.int8).reshape(1, 16)
    words = quant.pack_rows(q, 4)
    assert words is not None
    assert [w & 0xFFFFFFFF for w in words[0].tolist()] == [0x76543210, 0xFEDCBA98]


def test_reused_buffers_give_the_fresh_bytes_across_shapes(torch_only) -> None:
    """A big tensor, a small one, a bigger one, a small one through one scratch: each result
    is what a fresh run (and the torch code) gives, and the levels live in one reused buffer."""
    off, on = torch_only
    cfg = QuantConfig(bits=4, group_size=32, symmetric=False)
    scratch = Scratch()
    shapes = [((96, 256), torch.bfloat16), ((8, 64), torch.float32),
              ((160, 320), torch.bfloat16), ((8, 64), torch.bfloat16)]  # fmt: skip
    storages = []
    for i, (shape, dtype) in enumerate(shapes):
        w = _weights(*shape, dtype, seed=i)
        on()
        reused = rtn_quantize(w, cfg, scratch=scratch)
        reused = (reused.q.clone(), reused.scale, reused.zero, reused.q.untyped_storage())
        fresh = rtn_quantize(w, cfg)
        off()
        ref = rtn_quantize(w, cfg)
        fresh_t, ref_t = (fresh.q, fresh.scale, fresh.zero), (ref.q, ref.scale, ref.zero)
        for a, b, c in zip(reused[:3], fresh_t, ref_t, strict=True):
            assert torch.equal(a, b) and torch.equal(a, c), (i, shape)
        assert scratch.owns(reused[0]) is False and scratch.owns(fresh.q) is False
        storages.append(reused[3].data_ptr())
    # grown once for the larger tensor, and otherwise the same buffer
    assert scratch.nbytes == 160 * 320
    assert storages[0] == storages[1] and storages[2] == storages[3]


def test_scratch_hands_out_views_of_one_buffer() -> None:
    s = Scratch()
    a = s.take("x", (4, 8), torch.int8)
    b = s.take("x", (2, 3), torch.float32)
    assert a.data_ptr() == b.data_ptr() and s.owns(a) and s.owns(b)
    assert b.shape == (2, 3) and b.dtype == torch.float32 and s.nbytes == 32
    assert not s.owns(torch.zeros(3))


def test_count_nonfinite() -> None:
    t = torch.tensor([1.0, float("nan"), float("inf"), -float("inf"), 0.0])
    assert count_nonfinite(t) == 3
    assert count_nonfinite(t.to(torch.bfloat16)) == 3
    assert count_nonfinite(t.to(torch.float16)) is None  # no kernel: the caller's own check
    assert count_nonfinite(torch.zeros(0)) == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_count_nonfinite_across_blocks(dtype) -> None:
    """The kernel counts in blocks of 65536 (narrow counters): NaN/Inf at block edges, in the
    last partial block, and a block full of them are all counted (torch's count as reference)."""
    n = 3 * 65536 + 7
    t = torch.zeros(n)
    t[[0, 65535, 65536, 131071, n - 1]] = float("nan")
    t[[1, 100000, n - 2]] = float("inf")
    t[131072 : 131072 + 65536] = -float("inf")  # the whole third block
    t = t.to(dtype)
    want = int((~torch.isfinite(t)).sum())
    assert want == 8 + 65536  # no marked entry falls inside the full block
    assert count_nonfinite(t) == want
    assert count_nonfinite(t[1:]) == want - 1  # an odd start


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_non_finite_encoded_scale_is_refused_by_the_native_check(
    tiny_model, tmp_path, monkeypatch, dtype
) -> None:
    """The encoded tensors are checked finite natively (bfloat16/float32 scales): an Inf
    put into one scale is refused with its name, nothing written."""
    import weightsmith.compress.quantize as quantize_mod
    from weightsmith.compress.formats import CompressedTensorsFormat
    from weightsmith.errors import ConfigError

    encode, checked = CompressedTensorsFormat.encode, []

    def poisoned(self, target, qw, cfg):
        out = encode(self, target, qw, cfg)
        if target.tensor.endswith("layers.1.mlp.up_proj.weight"):
            out[f"{target.module}.weight_scale"].view(-1)[5] = float("inf")
        return out

    def counted(t):
        checked.append((t.dtype, count_nonfinite(t)))
        return checked[-1][1]

    monkeypatch.setattr(CompressedTensorsFormat, "encode", poisoned)
    monkeypatch.setattr(quantize_mod, "count_nonfinite", counted)
    src = tiny_model("llama", dtype=dtype)
    with pytest.raises(ConfigError, match=r"layers\.1\.mlp\.up_proj\.weight_scale: quantizing"):
        quantize_checkpoint(src, tmp_path / "q", QuantConfig(bits=4, group_size=32), progress=False)
    assert (dtype, 1) in checked and not (tmp_path / "q").exists()


def _digest(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.glob("*.safetensors"))
    }


@pytest.mark.parametrize(
    ("dtype", "fmt", "symmetric"),
    [
        (torch.bfloat16, "compressed-tensors", True),
        (torch.float32, "compressed-tensors", False),
        (torch.bfloat16, "gptq", False),
    ],
)
def test_streamed_quantize_writes_the_torch_path_bytes(
    tiny_model, tmp_path, torch_only, dtype, fmt, symmetric
) -> None:
    off, on = torch_only
    src = tiny_model("llama", dtype=dtype)
    cfg = QuantConfig(bits=4, group_size=32, symmetric=symmetric, format=fmt)
    on()
    quantize_checkpoint(src, tmp_path / "native", cfg, progress=False)
    off()
    quantize_checkpoint(src, tmp_path / "torch", cfg, progress=False)
    got, want = _digest(tmp_path / "native"), _digest(tmp_path / "torch")
    assert got and got == want


ROWS, COLS, LAYERS = 2048, 2048, 24  # 24 bf16 Linears of 8 MB: a ~200 MB checkpoint


def _linear_stack(root: Path, layers: int) -> Path:
    """A Llama-shaped checkpoint of ``layers`` square q_proj weights (nothing else stored)."""
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "hidden_size": COLS, "intermediate_size": 16, "num_hidden_layers": layers,
              "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 16,
              "tie_word_embeddings": True, "torch_dtype": "bfloat16"}  # fmt: skip
    g = torch.Generator().manual_seed(layers)
    with CheckpointWriter(root, max_shard_size=100 * 10**6) as w:
        names = [f"model.layers.{i}.self_attn.q_proj.weight" for i in range(layers)]
        w.plan([TensorSpec(n, torch.bfloat16, (ROWS, COLS)) for n in names])
        for n in names:
            w.write(n, torch.randn(ROWS, COLS, generator=g).to(torch.bfloat16))
        w.write_json("config.json", config)
        w.commit()
    return root


_CHILD = """
import json, resource, sys
from weightsmith.compress import QuantConfig, quantize_checkpoint
from weightsmith.core.report import peak_rss_bytes
cfg = QuantConfig(bits=4, group_size=128)
quantize_checkpoint(sys.argv[1], sys.argv[2], cfg, progress=False)  # imports, kernels
warm, before = peak_rss_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
quantize_checkpoint(sys.argv[3], sys.argv[4], cfg, progress=False)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"faults": faults, "warm": warm, "peak": peak_rss_bytes()}))
"""


@pytest.mark.slow
def test_streamed_rtn_allocates_no_fresh_memory_per_tensor(tmp_path: Path) -> None:
    """Quantizing 200 MB of Linears after a one-Linear warm-up: peak RSS grows by less than two
    tensors, and the run takes far fewer page faults than pages of weights it reads (the torch
    code took ~19 per page: fresh float32 copies and int64 packing temporaries per tensor)."""
    one, stack = _linear_stack(tmp_path / "one", 1), _linear_stack(tmp_path / "stack", LAYERS)
    args = [str(one), str(tmp_path / "q1"), str(stack), str(tmp_path / "q")]
    got = json.loads(subprocess.check_output([sys.executable, "-c", _CHILD, *args]))
    pages = LAYERS * ROWS * COLS * 2 // resource.getpagesize()
    # input mapped (fault-around), packed output 1/4 of it, levels in one reused buffer
    assert got["faults"] < pages / 4, f"{got['faults']} page faults for {pages} pages of weights"
    growth_mb, tensor_mb = (got["peak"] - got["warm"]) / 1e6, ROWS * COLS * 2 / 1e6
    assert growth_mb < 2 * tensor_mb, f"peak RSS grew {growth_mb:.0f} MB over the warm-up"
