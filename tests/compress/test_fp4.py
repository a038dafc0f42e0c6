"""``--method nvfp4`` / ``--method mxfp4``: FP4-E2M1 weight-only formats as compressed-tensors
writes them. Bit-identity with llm-compressor is in test_fp4_parity.py; here: hand-computed
values, compressed-tensors' own unpacker, the transformers round trip, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from weightsmith.compare import packed_weights
from weightsmith.compress import QuantConfig, quantize_checkpoint
from weightsmith.compress.fp4 import (
    mxfp4_quantize_weight,
    nvfp4_quantize_weight,
    pack_e2m1,
    round_e2m1,
    unpack_e2m1,
)
from weightsmith.errors import ConfigError
from weightsmith.io import open_checkpoint
from weightsmith.testing import build_tiny_model

IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64, 128, 11, 300, 2]])


def test_e2m1_rounding_ties_to_even_and_packing():
    x = torch.tensor([0.25, 0.26, 0.75, 1.25, 1.3, 1.75, 2.5, 2.6, 3.5, 5.0, 5.1, -0.1, -6.0, 0.0])
    r = round_e2m1(x)
    assert r.tolist() == [0.0, 0.5, 1.0, 1.0, 1.5, 2.0, 2.0, 3.0, 4.0, 4.0, 6.0, -0.0, -6.0, 0.0]
    assert torch.signbit(r[11]) and not torch.signbit(r[13])  # -0.1 -> -0 keeps its sign bit
    # nibble = sign << 3 | index of |v| in (0, .5, 1, 1.5, 2, 3, 4, 6); low nibble first
    v = torch.tensor([[0.5, -6.0, 3.0, -0.0]])
    packed = pack_e2m1(v)
    assert packed.tolist() == [[0x1 | (0xF << 4), 0x5 | (0x8 << 4)]]
    torch.testing.assert_close(unpack_e2m1(packed), v.abs() * torch.sign(v))
    ct = pytest.importorskip("compressed_tensors.compressors.nvfp4.helpers")
    w = torch.randn(8, 64)
    lv = round_e2m1((w * 3).clamp(-6, 6))
    assert torch.equal(pack_e2m1(lv), ct.pack_fp4_to_uint8(lv))  # compressed-tensors' packer
    assert torch.equal(ct.unpack_fp4_from_uint8(pack_e2m1(lv), 8, 64, torch.float32), lv)


def test_nvfp4_hand_example():
    # one row of 16: max|w| = 3 -> global = 448·6/3 = 896; group scale = fp8(896 · 3/6 = 448)
    # -> w / (448/896) = 2w: [6, -1, 0.4 -> 0.5, ...]
    w = torch.zeros(1, 16)
    w[0, :3] = torch.tensor([3.0, -0.5, 0.2])
    qw = nvfp4_quantize_weight(w, w.abs().max())
    assert qw.global_scale.tolist() == [896.0] and qw.scale.float().tolist() == [[448.0]]
    assert unpack_e2m1(qw.packed)[0, :4].tolist() == [6.0, -1.0, 0.5, 0.0]
    torch.testing.assert_close(qw.dequantize()[0, :3], torch.tensor([3.0, -0.5, 0.25]))
    # a fused set's larger max|W| (6) halves the global scale: the group scale follows
    shared = nvfp4_quantize_weight(w, torch.tensor(6.0))
    assert shared.global_scale.tolist() == [448.0] and shared.scale.float().tolist() == [[224.0]]


def test_mxfp4_hand_example():
    # max|w_g| = 3 (1.5 · 2^1: mantissa .5 < .75, so p2 = 2) -> e = 127 + 1 - 2 = 126,
    # scale 2^-1 -> w / 0.5: [6, -1.2 -> -1, 0.4 -> 0.5]; a max of 3.5 (1.75·2) rounds up to 4
    w = torch.zeros(2, 32)
    w[0, :3] = torch.tensor([3.0, -0.6, 0.2])
    w[1, 0] = 3.5
    qw = mxfp4_quantize_weight(w)
    assert qw.scale.tolist() == [[126], [127]]
    assert unpack_e2m1(qw.packed)[0, :3].tolist() == [6.0, -1.0, 0.5]
    assert unpack_e2m1(qw.packed)[1, 0].item() == 4.0  # scale 1: 3.5 -> 4 (tie to even)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    # bf16, as NVFP4/MXFP4 checkpoints are: transformers runs them compressed on CPU, with
    # weights decompressed to bf16 on the fly
    root = tmp_path_factory.mktemp("fp4")
    return build_tiny_model(root / "m", "llama", seed=4, dtype=torch.bfloat16)


@pytest.mark.parametrize("method", ["nvfp4", "mxfp4"])
def test_loads_in_transformers_with_the_decoded_weights(model, tmp_path, method):
    pytest.importorskip("compressed_tensors")
    out = tmp_path / "q"
    r = quantize_checkpoint(model, out, QuantConfig(method), progress=False)
    assert r.extra["quantized_linears"] == 14 and r.extra["bits"] == 4
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == f"{method}-pack-quantized" and qc["ignore"] == ["lm_head"]
    with open_checkpoint(out) as ckpt:
        decoded = {n: p.decode(ckpt) for n, p in packed_weights(ckpt).items()}
        if method == "nvfp4":  # q/k/v share one global scale, gate/up another, o/down their own
            g = {n: ckpt.get_tensor(f"model.layers.1.{n}.weight_global_scale").item()
                 for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj")}  # fmt: skip
            assert g["self_attn.q_proj"] == g["self_attn.k_proj"] != g["self_attn.o_proj"]
    assert len(decoded) == 14
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    ref = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16).eval()
    deq = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16).eval()
    for name, mod in deq.named_modules():
        if isinstance(mod, torch.nn.Linear) and name != "lm_head":
            mod.weight.data = decoded[f"{name}.weight"].to(torch.bfloat16)
    _check_with_compressed_tensors(out, qc, decoded)
    with torch.no_grad():
        got, fp32, want = loaded(IDS).logits, ref(IDS).logits, deq(IDS).logits
    # weight-only: transformers' logits are those of our decoded weights (same bf16 ops);
    # 4-bit floats keep them within 15% of the unquantized ones on this random tiny model
    torch.testing.assert_close(got.float(), want.float(), atol=0, rtol=0)
    assert ((got - fp32).float().norm() / fp32.float().norm()).item() < 0.15


def _check_with_compressed_tensors(out, qc, decoded):
    """compressed-tensors' own decompressor (its bf16 output) gives our decoded weights."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    scheme = QuantizationScheme.model_validate(next(iter(qc["config_groups"].values())))
    comp = BaseCompressor.get_value_from_registry(qc["format"])
    with open_checkpoint(out) as ckpt:
        for name, w in decoded.items():
            m = name[: -len(".weight")]
            sd = {
                k[len(m) + 1 :]: ckpt.get_tensor(k) for k in ckpt.tensors if k.startswith(f"{m}.")
            }
            theirs = comp.decompress(sd, scheme)["weight"]
            assert torch.equal(theirs, w.to(theirs.dtype)), name


def test_group_not_dividing_is_refused_naming_the_layer(tmp_path):
    src = build_tiny_model(tmp_path / "m", "llama", seed=0, intermediate_size=144)
    with pytest.raises(ConfigError, match=r"layers\.0\.mlp\.down_proj: in_features 144 .* 32"):
        quantize_checkpoint(src, tmp_path / "q", QuantConfig("mxfp4"), progress=False)
    quantize_checkpoint(src, tmp_path / "q2", QuantConfig("nvfp4"), progress=False)  # 144 = 16·9


@pytest.mark.parametrize("method", ["nvfp4", "mxfp4"])
def test_eval_ppl_of_a_float32_source_runs_in_bfloat16(tmp_path, method):
    # compressed-tensors decompresses FP4-packed weights to bf16 whatever the config's dtype:
    # a float32 source's output used to fail `eval ppl` with exit 3 (float != BFloat16).
    # Reference: the NLL of the same windows from the model loaded by hand in bf16 (atol 1e-5).
    import math

    import torch.nn.functional as F
    from click.testing import CliRunner
    from transformers import AutoTokenizer

    from weightsmith.cli.main import cli

    pytest.importorskip("compressed_tensors")
    src = build_tiny_model(tmp_path / "m", "llama", seed=4)  # float32
    out = tmp_path / "q"
    quantize_checkpoint(src, out, QuantConfig(method), progress=False)
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat and the dog ran to the park " * 8)
    report = tmp_path / "r.json"
    args = ["eval", "ppl", str(out), "--data", str(text), "--seq-len", "16", "--report", str(report)]  # fmt: skip
    res = CliRunner().invoke(cli, [*args, "--no-progress"])
    assert res.exit_code == 0, res.output
    ppl = json.loads(report.read_text())["result"]["ppl"]
    ids = torch.tensor(AutoTokenizer.from_pretrained(out)(text.read_text())["input_ids"])
    windows = ids[: ids.numel() // 16 * 16].view(-1, 16)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        logits = model(windows).logits[:, :-1].float()
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    assert math.log(ppl) == pytest.approx(nll.item(), abs=1e-5)
