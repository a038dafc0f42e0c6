"""DeepSeek-V3-style mixture of experts (a tiny seeded ``DeepseekV3ForCausalLM`` from
transformers' own config class): multi-head latent attention, a dense first layer, then MoE
layers with a grouped top-k sigmoid router (``mlp.gate`` with ``e_score_correction_bias``),
routed experts and shared experts. Described as data; the layer stream runs transformers' own
router; RTN loads with the logits of an in-memory oracle; NF4 equals transformers' own
bitsandbytes quantization (which leaves the fused experts in float); merges are tensor-wise."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from weightsmith.cli.main import cli
from weightsmith.compress.rtn import RTNConfig, rtn_quantize
from weightsmith.core.experts import expert_linears, fused_expert_tensors, is_router
from weightsmith.io import open_checkpoint
from weightsmith.testing import build_tiny_model
from weightsmith.testing.tiny import TINY_ARCHS

# 3 layers: layer 0 dense (first_k_dense_replace=1), layers 1-2 MoE with 8 routed experts in 2
# groups (the router keeps topk_group=1 group, then the top-2 experts in it) and one shared
# expert. Every Linear's in_features is a multiple of 64 and out_features of 32 (the
# bitsandbytes CPU kernel needs both).
DEEPSEEK = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
                num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                n_shared_experts=1, n_routed_experts=8, n_group=2, topk_group=1,
                num_experts_per_tok=2, routed_scaling_factor=2.5, first_k_dense_replace=1,
                q_lora_rank=64, kv_lora_rank=64, qk_rope_head_dim=32, qk_nope_head_dim=8,
                v_head_dim=16, max_position_embeddings=256, bos_token_id=0, eos_token_id=0,
                pad_token_id=1, tie_word_embeddings=False)  # fmt: skip
VARIANTS = {"q_lora": {}, "q_proj": {"q_lora_rank": None}}  # MLA with / without q compression
EXPERTS, MOE_LAYERS, LAYERS = 8, (1, 2), 3
IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64, 128, 11, 300, 2, 19, 23, 31, 57]])


def make_deepseek(root: Path, seed: int = 0, **overrides: object) -> Path:
    """A tiny seeded DeepSeek-V3 model with a non-zero, seeded ``e_score_correction_bias`` (a
    buffer, which transformers initialises to zeros) so that the bias takes part in routing."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(TINY_ARCHS, "deepseek_v3", ("DeepseekV3Config", {**DEEPSEEK, **overrides}))
        build_tiny_model(root / "seed", "deepseek_v3", seed=seed)
    model = load(root / "seed")
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for i in MOE_LAYERS:
            bias = model.model.layers[i].mlp.gate.e_score_correction_bias
            bias.copy_(torch.rand(bias.shape, generator=gen) * 0.1)
    model.save_pretrained(root / "m")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (root / "m" / f).write_bytes((root / "seed" / f).read_bytes())
    return root / "m"


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    cache: dict[tuple[str, int], Path] = {}

    def make(variant: str = "q_lora", seed: int = 0) -> Path:
        if (variant, seed) not in cache:
            root = tmp_path_factory.mktemp(f"ds-{variant}-{seed}")
            cache[variant, seed] = make_deepseek(root, seed, **VARIANTS[variant])
        return cache[variant, seed]

    return make


def cli_ok(args: list[str]) -> str:
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    return res.output


def load(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def logits(model: torch.nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def check_oracle(got: torch.Tensor, oracle: torch.Tensor, before: torch.Tensor) -> None:
    """float32 round-off between ``got`` and the oracle (1e-3 of how far the edit moved the
    logits), and the edit moved them (the check would fail on an unedited copy)."""
    moved = (oracle - before).abs().max().item()
    error = (got - oracle).abs().max().item()
    assert moved > 1e-3 * before.abs().max().item(), moved
    assert error <= 1e-3 * moved, (error, moved)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_deepseek_is_described(deepseek, tmp_path, variant) -> None:
    """transformers 5.24 saves one Linear per routed expert (fused to 3-D on load, through the
    qwen2_moe conversion mapping): the description names every expert Linear, both router
    tensors (weight and e_score_correction_bias) of each MoE layer, and no expert in the dense
    layer 0; shared experts are ordinary Linears. convert round-trips bit-exact."""
    src = deepseek(variant)
    with open_checkpoint(src) as ckpt:
        assert ckpt.arch.known and ckpt.arch.name == "deepseek_v3"
        assert ckpt.arch.experts.num_experts(ckpt.config) == EXPERTS
        found = {(e.layer, e.expert, e.linear) for e in expert_linears(ckpt)}
        assert found == {(i, e, n) for i in MOE_LAYERS for e in range(EXPERTS)
                         for n in ("gate_proj", "up_proj", "down_proj")}  # fmt: skip
        routers = sorted(n for n in ckpt.tensors if is_router(ckpt.arch, n))
        assert routers == sorted(f"model.layers.{i}.mlp.gate.{t}" for i in MOE_LAYERS
                                 for t in ("weight", "e_score_correction_bias"))  # fmt: skip
        shared = [n for n in ckpt.tensors if ".shared_experts." in n]
        assert len(shared) == 3 * len(MOE_LAYERS) and not any(
            is_router(ckpt.arch, n) for n in shared
        )
        assert fused_expert_tensors(ckpt) == []
        original = {n: ckpt.get_tensor(n) for n in ckpt.tensors}
    assert original["model.layers.1.mlp.gate.e_score_correction_bias"].abs().min() > 0
    shown = cli_ok(["inspect", str(src)])
    assert "family: deepseek_v3" in shown
    assert "experts          8 per layer, top-2 (one Linear per expert)" in shown
    cli_ok(["convert", str(src), "-o", str(tmp_path / "c"), "--no-progress"])
    with open_checkpoint(tmp_path / "c") as out:
        assert set(out.tensors) == set(original)
        assert all(torch.equal(out.get_tensor(n), t) for n, t in original.items())
    assert torch.equal(logits(load(src)), logits(load(tmp_path / "c")))


def test_config_that_disagrees_is_refused(deepseek, tmp_path) -> None:
    """The description's config_shapes check the MLA sizes: a wrong kv_lora_rank is named."""
    src = deepseek()
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in src.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    text = (src / "config.json").read_text().replace('"kv_lora_rank": 64', '"kv_lora_rank": 32')
    (bad / "config.json").write_text(text)
    res = CliRunner().invoke(cli, ["inspect", str(bad)])
    assert res.exit_code == 1 and "kv_lora_rank" in res.output, res.output


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_layer_stream_matches_transformers(deepseek, variant) -> None:
    """One decoder layer at a time, routed experts as one Linear per expert (ExpertLinears,
    fed by transformers' own grouped sigmoid router) and shared experts as they are: the final
    hidden states of transformers' own forward (atol 1e-6)."""
    from weightsmith.core.calibration import LayerStreamer

    src = deepseek(variant)
    ids = torch.randint(2, 300, (3, 16), generator=torch.Generator().manual_seed(0))
    with open_checkpoint(src) as ckpt:
        streamer = LayerStreamer(ckpt, ids)
        for layer in streamer.layers():
            streamer.run_layer(layer, lambda cl: None)
        hidden = streamer.hidden_states()
    model = load(src)
    with torch.no_grad():
        want = model(ids, output_hidden_states=True).hidden_states[-1]
        got = model.model.norm(hidden)
    assert want.abs().max() > 0.1
    assert torch.allclose(got, want, rtol=0, atol=1e-6)


def fake_quant(model: torch.nn.Module, cfg: RTNConfig) -> None:
    """The oracle: every decoder Linear (MLA projections, dense MLP, shared experts) and every
    routed expert's gate/up/down fake-quantized in transformers' fused 3-D parameters
    (gate_up_proj = [gate; up] per expert); routers (not Linears) kept."""
    q = lambda w: rtn_quantize(w, cfg).dequantize()  # noqa: E731
    with torch.no_grad():
        for n, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and ".layers." in n:
                mod.weight.copy_(q(mod.weight))
            if hasattr(mod, "gate_up_proj") and mod.gate_up_proj.dim() == 3:
                half = mod.gate_up_proj.shape[1] // 2
                for e in range(mod.gate_up_proj.shape[0]):
                    gu = mod.gate_up_proj[e]
                    mod.gate_up_proj[e] = torch.cat([q(gu[:half]), q(gu[half:])])
                    mod.down_proj[e] = q(mod.down_proj[e])


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_rtn_loads_with_oracle_logits(deepseek, tmp_path, variant) -> None:
    pytest.importorskip("compressed_tensors")
    src = deepseek(variant)
    report = tmp_path / "r.json"
    cli_ok(["compress", "quantize", str(src), "-o", str(tmp_path / "q"), "--method", "rtn",
            "--bits", "4", "--group-size", "32", "--no-progress", "--report", str(report)])  # fmt: skip
    import json

    extra = json.loads(report.read_text())["result"]["extra"]
    attn = 5 if variant == "q_lora" else 4  # q_a, q_b (or q), kv_a, kv_b, o
    assert extra["quantized_linears"] == LAYERS * attn + 3 + len(MOE_LAYERS) * 3 * (1 + EXPERTS)
    with open_checkpoint(tmp_path / "q") as out:  # routers stay float32, as stored
        routers = [n for n in out.tensors if is_router(out.arch, n)]
        assert len(routers) == 2 * len(MOE_LAYERS)
        assert all(out.info(n).torch_dtype == torch.float32 for n in routers)
        with open_checkpoint(src) as ckpt:
            assert all(torch.equal(out.get_tensor(n), ckpt.get_tensor(n)) for n in routers)
    loaded, ref = load(tmp_path / "q"), load(src)
    assert type(loaded) is type(ref)
    before = logits(ref)
    fake_quant(ref, RTNConfig(bits=4, group_size=32))
    check_oracle(logits(loaded), logits(ref), before)


def test_nf4_with_routed_experts_ignored_equals_transformers_bnb(deepseek, tmp_path) -> None:
    """bitsandbytes replaces nn.Linear modules only; transformers' routed experts are fused 3-D
    parameters (NF4 keeps them as stored by itself: tests/test_moe_keep_experts.py). With the
    routed experts ignored explicitly, the output
    (MLA projections, dense MLP and shared experts in NF4) is byte-identical to what
    transformers + bitsandbytes save for the same model (they leave the fused experts in
    float), and it loads and gives the same logits."""
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    src = deepseek()
    cli_ok(["compress", "quantize", str(src), "-o", str(tmp_path / "n"), "--method", "nf4",
            "--ignore", r"re:.*mlp\.experts\..*", "--no-progress"])  # fmt: skip
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    ref = AutoModelForCausalLM.from_pretrained(src, quantization_config=bnb, device_map="cpu")
    ref.save_pretrained(tmp_path / "ref")
    with open_checkpoint(tmp_path / "n") as mine, open_checkpoint(tmp_path / "ref") as theirs:
        assert set(mine.tensors) == set(theirs.tensors)
        assert any(n.endswith("shared_experts.up_proj.weight.absmax") for n in mine.tensors)
        for n in theirs.tensors:
            assert torch.equal(mine.get_tensor(n), theirs.get_tensor(n)), n
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "n", device_map="cpu")
    assert type(model.model.layers[1].mlp.shared_experts.up_proj).__name__ == "Linear4bit"
    assert torch.equal(logits(model), logits(ref))


def test_linear_merge_merges_experts_routers_and_bias(deepseek, tmp_path) -> None:
    """Routed and shared experts, routers and e_score_correction_bias merge tensor-wise: the
    output loads with the logits of the oracle (every parameter and the bias buffer
    0.25·a + 0.75·b)."""
    a, b = deepseek("q_lora", 0), deepseek("q_lora", 1)
    cli_ok(["merge", "linear", str(a), str(b), "--weights", "0.25,0.75", "-o", str(tmp_path / "m"),
            "--no-progress"])  # fmt: skip
    loaded, ref, other = load(tmp_path / "m"), load(a), load(b)
    before = logits(ref)
    with torch.no_grad():
        theirs = dict(other.state_dict())
        for n, t in ref.state_dict().items():
            if t.is_floating_point() and "rotary" not in n:
                t.copy_(0.25 * t + 0.75 * theirs[n])
    check_oracle(logits(loaded), logits(ref), before)
    bias = loaded.model.layers[1].mlp.gate.e_score_correction_bias  # merged, float32 round-off
    assert torch.allclose(bias, ref.model.layers[1].mlp.gate.e_score_correction_bias, atol=1e-8)
    assert (bias - other.model.layers[1].mlp.gate.e_score_correction_bias).abs().max() > 1e-3


def test_dropping_layers_keeps_dense_layers_dense(deepseek, tmp_path) -> None:
    """Layer 0 is dense (first_k_dense_replace 1): dropping it makes first_k_dense_replace 0,
    so transformers builds MoE blocks for both kept layers and loads every tensor (before, the
    MoE layer renumbered 0 loaded as a randomly initialised dense MLP). Logits equal the
    original's layers 1-2 run on their own (atol 1e-6)."""
    src = deepseek()
    cli_ok(["compress", "prune", str(src), "-o", str(tmp_path / "d"), "--method", "layers",
            "--layers", "0", "--no-progress"])  # fmt: skip
    import json

    config = json.loads((tmp_path / "d" / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config["first_k_dense_replace"] == 0
    loaded, info = AutoModelForCausalLM.from_pretrained(
        tmp_path / "d", dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ref = load(src)
    oracle = type(ref)(loaded.config).eval()
    state = ref.state_dict()
    with torch.no_grad():
        for k, v in oracle.state_dict().items():  # new layer i is the original layer i + 1
            parts = k.split(".")
            if k.startswith("model.layers."):
                parts[2] = str(int(parts[2]) + 1)
            v.copy_(state[".".join(parts)])
    assert torch.allclose(logits(loaded.eval()), logits(oracle), rtol=0, atol=1e-6)


def test_drop_dense_layers_renumbers_the_dense_record() -> None:
    """Hand-computed: first_k_dense_replace 3 with layers {1, 4} dropped keeps layers 0 and 2
    below it (-> 2); Qwen3-MoE's mlp_only_layers [0, 4, 5] -> [0, 3] (4 dropped, 5 -> 3)."""
    from weightsmith.compress.moe import drop_dense_layers
    from weightsmith.io.architectures import registry

    config = {"num_hidden_layers": 6, "first_k_dense_replace": 3}
    assert drop_dense_layers(config, registry()["deepseek_v3"], {1, 4}) == ["first_k_dense_replace"]
    assert config["first_k_dense_replace"] == 2
    config = {"num_hidden_layers": 6, "mlp_only_layers": [0, 4, 5]}
    assert drop_dense_layers(config, registry()["qwen3_moe"], {1, 4}) == ["mlp_only_layers"]
    assert config["mlp_only_layers"] == [0, 3]
