"""gpt-oss (tiny seeded models from transformers 5.24's own GptOssConfig): fused 3-D experts
described as data, MXFP4 experts in gpt-oss's native format (loaded by transformers' Mxfp4
quantizer, dequantized on CPU), routing counts on a hand-set router, dropping experts by slicing
the 3-D tensors, and tensor-wise merges checked against hand-computed formulas."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, GptOssConfig, GptOssForCausalLM

from weightsmith.cli.main import cli
from weightsmith.compress.fp4 import mxfp4_quantize_weight
from weightsmith.core.calibration import load_calibration_text, load_tokenizer
from weightsmith.core.calibration_data import tokenize_windows
from weightsmith.core.experts import is_router
from weightsmith.core.experts_fused import fused_experts
from weightsmith.io import open_checkpoint
from weightsmith.testing import build_tiny_model
from weightsmith.testing.tiny import TINY_ARCHS

GPT_OSS = dict(hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
               max_position_embeddings=256, sliding_window=8, tie_word_embeddings=False,
               bos_token_id=0, eos_token_id=0, pad_token_id=1,
               rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0,
                                "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                                "original_max_position_embeddings": 8})  # fmt: skip
EXPERTS, LAYERS, H, INTER = 4, 2, 64, 32
IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64, 128, 11, 300, 2, 19, 23, 31, 57]])
SAMPLES, SEQ = 4, 32
CALIB = ["--calib-samples", str(SAMPLES), "--seq-len", str(SEQ)]
D = 7  # the hidden dimension the hand-set routers read


@pytest.fixture(scope="module")
def gptoss(tmp_path_factory):
    cache: dict[tuple[int, torch.dtype], Path] = {}

    def make(seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
        if (seed, dtype) not in cache:
            with pytest.MonkeyPatch.context() as mp:
                mp.setitem(TINY_ARCHS, "gpt_oss", ("GptOssConfig", GPT_OSS))
                root = tmp_path_factory.mktemp(f"gptoss-{seed}")
                cache[seed, dtype] = build_tiny_model(root / "m", "gpt_oss", seed=seed, dtype=dtype)
        return cache[seed, dtype]

    return make


def _cli(args: list[str], progress_flag: bool = True) -> str:
    res = CliRunner().invoke(cli, [*args, *(["--no-progress"] if progress_flag else [])])
    assert res.exit_code == 0, res.output
    return res.output


def _refused(args: list[str], fragment: str) -> None:
    res = CliRunner().invoke(cli, [*args, "--no-progress"])
    assert res.exit_code == 1, res.output
    last = res.output.strip().splitlines()[-1]
    assert last.startswith("error: ") and fragment in last, res.output


def _load(path: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(path) as ckpt:
        return {n: ckpt.get_tensor(n) for n in ckpt.tensors}


def test_gptoss_stored_layout_is_described(gptoss, tmp_path) -> None:
    """transformers 5.24 saves gpt-oss's experts fused: gate_up_proj (experts, hidden, 2·I),
    down_proj (experts, I, hidden), each with an (experts, out) bias; the forward is
    ``x @ W[e] + b[e]`` with gate = even columns, up = odd ones (checked here on one expert)."""
    src = gptoss()
    with open_checkpoint(src) as ckpt:
        assert ckpt.arch.known and ckpt.arch.name == "gpt_oss"
        assert ckpt.arch.experts.storage == "fused"
        found = {
            (f.layer, f.tensor.rsplit(".", 1)[1], f.bias, f.layout) for f in fused_experts(ckpt)
        }
        assert found == {(i, p, f"model.layers.{i}.mlp.experts.{p}_bias", "in_out")
                         for i in range(LAYERS) for p in ("gate_up_proj", "down_proj")}  # fmt: skip
        assert ckpt.info("model.layers.0.mlp.experts.gate_up_proj").shape == (EXPERTS, H, 2 * INTER)
        assert ckpt.info("model.layers.0.mlp.experts.down_proj").shape == (EXPERTS, INTER, H)
        routers = sorted(n for n in ckpt.tensors if is_router(ckpt.arch, n))
        assert routers == sorted(f"model.layers.{i}.mlp.router.{s}"
                                 for i in range(LAYERS) for s in ("weight", "bias"))  # fmt: skip
    model = _load(src)
    experts = model.model.layers[0].mlp.experts
    x = torch.randn(3, H, generator=torch.Generator().manual_seed(1))
    gu = x @ experts.gate_up_proj[2] + experts.gate_up_proj_bias[2]
    gate, up = gu[:, 0::2].clamp(max=7.0), gu[:, 1::2].clamp(-7.0, 7.0)
    want = ((up + 1) * gate * torch.sigmoid(1.702 * gate)) @ experts.down_proj[2]
    want = want + experts.down_proj_bias[2]
    idx = torch.full((3, 1), 2)
    with torch.no_grad():
        got = experts(x, idx, torch.ones(3, 1))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    shown = _cli(["inspect", str(src)], progress_flag=False)
    assert "family: gpt_oss" in shown and "4 per layer, top-2 (fused 3-D)" in shown
    _cli(["convert", str(src), "-o", str(tmp_path / "c"), "--max-shard-size", "100KB"])
    original, back = _tensors(src), _tensors(tmp_path / "c")
    assert set(back) == set(original)
    assert all(torch.equal(back[n], t) for n, t in original.items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mxfp4_experts_native_format_loads_with_oracle_logits(gptoss, tmp_path, dtype) -> None:
    """``--method mxfp4`` writes gpt-oss's own MXFP4 experts (fp32 and bf16 weights); transformers dequantizes them on
    load (CPU) and gives the logits of the original model whose every expert slice was
    replaced by its MXFP4 round trip as a Linear (slice e transposed), within 1e-3 of how far
    quantization moved them (measured: equal)."""
    src = gptoss(0, dtype)
    report = tmp_path / "r.json"
    _cli(["compress", "quantize", str(src), "-o", str(tmp_path / "q"), "--method", "mxfp4",
          "--report", str(report)])  # fmt: skip
    extra = json.loads(report.read_text())["result"]["extra"]
    assert extra["format"] == "gpt-oss-mxfp4" and extra["quantized_linears"] == 2 * LAYERS * EXPERTS
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "mxfp4"
    stored = _tensors(tmp_path / "q")
    assert stored["model.layers.0.mlp.experts.gate_up_proj_blocks"].shape == (
        EXPERTS,
        2 * INTER,
        2,
        16,
    )
    assert stored["model.layers.0.mlp.experts.down_proj_scales"].shape == (EXPERTS, H, 1)
    assert "model.layers.0.mlp.experts.gate_up_proj" not in stored
    original = _tensors(src)
    for n in ("model.layers.0.mlp.router.weight", "model.layers.1.self_attn.sinks",
              "model.layers.1.mlp.experts.down_proj_bias"):  # fmt: skip
        assert torch.equal(stored[n], original[n]), n
    ref = _load(src, dtype)
    before = _logits(ref).float()
    with torch.no_grad():
        for layer in ref.model.layers:
            for p in (layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj):
                for e in range(EXPERTS):
                    q = mxfp4_quantize_weight(p[e].t().contiguous()).dequantize()
                    p[e] = q.t().to(dtype)
    oracle, got = _logits(ref).float(), _logits(_load(tmp_path / "q", dtype)).float()
    moved = (oracle - before).abs().max().item()
    assert moved > 1e-3 * before.abs().max().item(), moved  # fails on an unquantized copy
    assert (got - oracle).abs().max().item() <= 1e-3 * moved


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["compress", "quantize", "--method", "mxfp4", "--ignore", "lm_head"], "drop --ignore"),
        (["compress", "prune", "--method", "sparsegpt", *CALIB], "use --method wanda"),
        (["compress", "prune", "--method", "layers", "--drop", "1", *CALIB], "magnitude or wanda"),
    ],
)
def test_fused_experts_refused_in_one_line(gptoss, tmp_path, args, fragment) -> None:
    """What does not handle the fused experts is refused before any output exists (RTN/GPTQ
    keep them as stored: tests/test_moe_keep_experts.py)."""
    out = tmp_path / "o"
    _refused([*args[:2], str(gptoss()), "-o", str(out), *args[2:]], fragment)
    assert not out.exists()


def _routed(src: Path, out: Path) -> Path:
    """``src`` with hand-set routers: embedding column D is +10 for even token ids, -10 for odd
    ones (attention and experts add ~1e-2, so its sign survives the residual stream), and
    router row e reads only dimension D with weight (3, -3, 1, -1)[e], bias 0: even tokens go
    to experts {0, 2}, odd ones to {1, 3}, in every layer."""
    model = _load(src)
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[:, D] = torch.where(torch.arange(emb.shape[0]) % 2 == 0, 10.0, -10.0)
        for layer in model.model.layers:
            layer.post_attention_layernorm.weight[D] = 1.0
            layer.mlp.router.weight.zero_()
            layer.mlp.router.bias.zero_()
            layer.mlp.router.weight[:, D] = torch.tensor([3.0, -3.0, 1.0, -1.0])
    model.save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / f, out / f)
    return out


def test_prune_experts_hand_checked_counts_and_slices(gptoss, tmp_path) -> None:
    """Routing counts are the router's top-k (each token once per chosen expert): even-token
    count for experts 0 and 2, odd for 1 and 3. ``--keep 2`` keeps the commoner parity's pair
    and writes a model that loads with 2 experts and the logits of the original whose 3-D
    tensors, biases and router rows were sliced by hand (atol 1e-6)."""
    src = _routed(gptoss(), tmp_path / "routed")
    text = load_calibration_text(None).text
    ids = tokenize_windows(load_tokenizer(src), text, samples=SAMPLES, seq_len=SEQ)
    even = int((ids % 2 == 0).sum())
    odd = ids.numel() - even
    assert 0 < even != odd > 0
    report = tmp_path / "r.json"
    _cli(["compress", "prune", str(src), "-o", str(tmp_path / "p"), "--method", "experts",
          "--keep", "2", *CALIB, "--report", str(report)])  # fmt: skip
    extra = json.loads(report.read_text())["result"]["extra"]
    assert extra["expert_tokens"] == {str(i): [even, odd, even, odd] for i in range(LAYERS)}
    keep = [0, 2] if even > odd else [1, 3]
    assert extra["kept_experts"] == {str(i): keep for i in range(LAYERS)}
    original = _tensors(src)
    config = GptOssConfig.from_pretrained(src)
    config.num_local_experts = 2
    oracle = GptOssForCausalLM(config).eval()
    sliced = {n: (t[keep] if ".mlp." in n else t) for n, t in original.items()}
    oracle.load_state_dict(sliced, strict=True)
    pruned = _load(tmp_path / "p")
    assert pruned.config.num_local_experts == 2
    assert pruned.model.layers[1].mlp.experts.down_proj.shape == (2, INTER, H)
    torch.testing.assert_close(_logits(pruned), _logits(oracle), atol=1e-6, rtol=0)


def test_merges_are_tensor_wise_on_gptoss(gptoss, tmp_path) -> None:
    """linear, TIES (density 1: no trimming) and SLERP of tiny gpt-oss models, every tensor
    (3-D experts, biases, sinks, routers) against the formulas computed here (atol 1e-6), and
    each output loads in transformers."""
    base, a, b = gptoss(0), gptoss(1), gptoss(2)
    tb, ta, tc = _tensors(base), _tensors(a), _tensors(b)
    _cli(["merge", "linear", str(a), str(b), "--weights", "0.25,0.75", "-o", str(tmp_path / "l"),
          "--compute-dtype", "float32"])  # fmt: skip
    _cli(["merge", "ties", str(a), str(b), "--base", str(base), "--density", "1",
          "-o", str(tmp_path / "t"), "--compute-dtype", "float32"])  # fmt: skip
    _cli(["merge", "slerp", str(a), str(b), "--t", "0.3", "-o", str(tmp_path / "s"),
          "--compute-dtype", "float32"])  # fmt: skip
    lin, ties, slerp = (_tensors(tmp_path / x) for x in "lts")
    for n in tb:
        torch.testing.assert_close(lin[n], 0.25 * ta[n] + 0.75 * tc[n], atol=1e-6, rtol=0)
        d = torch.stack([ta[n] - tb[n], tc[n] - tb[n]])
        sign = torch.sign(d.sum(0))
        agree = (torch.sign(d) == sign) & (d != 0)
        mixed = (d * agree).sum(0) / agree.sum(0).clamp(min=1)
        torch.testing.assert_close(ties[n], tb[n] + mixed, atol=1e-6, rtol=0)
        u, v = ta[n].flatten().double(), tc[n].flatten().double()
        theta = torch.arccos((u / u.norm()) @ (v / v.norm()))
        want = (torch.sin(0.7 * theta) * u + torch.sin(0.3 * theta) * v) / torch.sin(theta)
        torch.testing.assert_close(slerp[n].flatten(), want.float(), atol=1e-6, rtol=0)
    for x in "lts":
        model = _load(tmp_path / x)
        assert torch.isfinite(_logits(model)).all()


def test_quantized_gptoss_refused_as_input(gptoss, tmp_path) -> None:
    """gpt-oss's release (and weightsmith's output) is MXFP4: quantizing, pruning or merging
    its packed ``*_blocks`` as numbers would be wrong, so each is refused in one line."""
    q = tmp_path / "q"
    _cli(["compress", "quantize", str(gptoss()), "-o", str(q), "--method", "mxfp4"])
    _refused(["compress", "quantize", str(q), "-o", str(tmp_path / "a"), "--method", "mxfp4"],
             "already quantized")  # fmt: skip
    _refused(["compress", "prune", str(q), "-o", str(tmp_path / "b"), "--method", "experts",
              "--keep", "2"], "is quantized")  # fmt: skip
    _refused(["merge", "linear", str(q), str(q), "-o", str(tmp_path / "c")], "is quantized (mxfp4)")
    assert not any((tmp_path / x).exists() for x in "abc")


def test_magnitude_prunes_every_expert_slice_as_a_linear(gptoss, tmp_path) -> None:
    """Data-free magnitude on fused experts: every expert's Linear weight (slice e transposed
    for gpt-oss's (experts, in, out) storage) has its own threshold, as a Linear has: exactly
    half of its entries, the smallest |w| (computed here with topk), are zeroed; everything
    else is bit-identical."""
    src, out, report = gptoss(), tmp_path / "p", tmp_path / "r.json"
    _cli(["compress", "prune", str(src), "-o", str(out), "--method", "magnitude",
          "--report", str(report)])  # fmt: skip
    extra = json.loads(report.read_text())["result"]["extra"]
    assert extra["pruned_linears"] == LAYERS * (4 + 2 * EXPERTS)  # q/k/v/o + 2 per expert
    assert extra["sparsity"] == 0.5

    def half(w: torch.Tensor) -> torch.Tensor:
        flat = w.flatten().clone()
        flat[flat.abs().topk(flat.numel() // 2, largest=False).indices] = 0.0
        return flat.view(w.shape)

    original, pruned = _tensors(src), _tensors(out)
    for n, t in original.items():
        if n.endswith(("experts.gate_up_proj", "experts.down_proj")):
            want = torch.stack([half(t[e].t()).t() for e in range(EXPERTS)])
        elif n.endswith("_proj.weight"):
            want = half(t)
        else:
            want = t
        assert torch.equal(pruned[n], want), n
