"""Multimodal checkpoints (Qwen2.5-VL, Gemma 3, LLaVA), tiny and seeded, built with
transformers' own classes: quantize (RTN, GPTQ), prune (Wanda, layer drop) and merge (linear)
change only the text decoder's Linears; every vision-tower and projector tensor comes out
byte-identical; the output loads in its own class and runs a forward pass with an image, with
the logits of an in-memory oracle (the original model with the same text-Linear edits)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from weightsmith.cli.main import cli
from weightsmith.compress.rtn import RTNConfig, rtn_quantize
from weightsmith.io import open_checkpoint
from weightsmith.testing.multimodal import (
    MULTIMODAL_ARCHS,
    build_tiny_multimodal,
    image_inputs,
    model_class,
)

CALIB = ["--calib-samples", "4", "--seq-len", "32"]


@pytest.fixture(scope="module")
def mm_model(tmp_path_factory):
    """``mm_model(kind, seed, vision_seed)`` -> a tiny seeded multimodal checkpoint."""
    cache: dict[tuple, Path] = {}

    def make(kind: str, seed: int = 0, vision_seed: int | None = None) -> Path:
        key = (kind, seed, vision_seed)
        if key not in cache:
            root = tmp_path_factory.mktemp(f"{kind}-{seed}-{vision_seed}")
            cache[key] = build_tiny_multimodal(root / "m", kind, seed=seed, vision_seed=vision_seed)
        return cache[key]

    return make


def _cli(args: list[str]) -> str:
    res = CliRunner().invoke(cli, [*args, "--no-progress"])
    assert res.exit_code == 0, res.output
    return res.output


def _load(kind: str, path: Path) -> torch.nn.Module:
    model = model_class(kind).from_pretrained(path, dtype=torch.float32).eval()
    assert type(model) is model_class(kind)  # its own class, not a text-only one
    return model


def _logits(kind: str, model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**image_inputs(kind)).logits


def _is_text_linear(name: str) -> bool:
    return ".language_model.layers." in name and name.endswith("proj")


def _text_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and _is_text_linear(n)}  # fmt: skip


def _outside_text(path: Path) -> dict[str, bytes]:
    """Every stored tensor outside the text decoder, as raw bytes."""
    with open_checkpoint(path) as ckpt:
        names = [n for n in ckpt.tensors if not ckpt.arch.in_text_decoder(n)]
        return {n: ckpt.get_tensor(n).reshape(-1).view(torch.uint8).numpy().tobytes()
                for n in names}  # fmt: skip


def _check_vision_untouched(src: Path, out: Path) -> None:
    before, after = _outside_text(src), _outside_text(out)
    assert len(before) >= 20  # the vision tower and projector are really there
    assert before.keys() == after.keys()
    for name, data in before.items():
        assert after[name] == data, name


def _check_only_text_linears_changed(ref: torch.nn.Module, out: torch.nn.Module) -> None:
    """Every parameter of ``out`` equals the original's, except the text decoder's Linear
    weights, which all changed (or were replaced by quantized tensors)."""
    got = dict(out.named_parameters())
    assert len(_text_linears(ref)) == 14  # 2 layers x q/k/v/o/gate/up/down
    for name, p in ref.named_parameters():
        if _is_text_linear(name.removesuffix(".weight")) and name.endswith(".weight"):
            assert name not in got or not torch.equal(got[name], p), name
        else:
            assert torch.equal(got[name], p), name


def _dequantized(path: Path) -> dict[str, torch.Tensor]:
    """The text Linears' weights decoded by compressed-tensors' own decompressor, keyed by
    ``layers.N.<linear>`` (the checkpoint and the class name the decoder differently)."""
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    args = QuantizationArgs(**qc["config_groups"]["group_0"]["weights"])
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    out = {}
    with open_checkpoint(path) as ckpt:
        for name in ckpt.tensors:
            if not name.endswith(".weight_packed"):
                continue
            m = name.removesuffix(".weight_packed")
            sd = {
                k.split(".")[-1]: ckpt.get_tensor(k) for k in ckpt.tensors if k.startswith(m + ".")
            }
            key = m[m.index("layers.") :]
            out[key] = PackedQuantizationCompressor.decompress(sd, scheme)["weight"].float()
    return out


def _check_oracle(got: torch.Tensor, oracle: torch.Tensor, before: torch.Tensor) -> None:
    """``got`` equals the oracle's logits up to float32 round-off (1e-3 of how far the edit
    moved them), and the edit moved the logits measurably (1e-4 of their scale)."""
    moved = (oracle - before).abs().max().item()
    error = (got - oracle).abs().max().item()
    assert moved > 1e-4 * before.abs().max().item(), moved
    assert error <= 1e-3 * moved, (error, moved)


@pytest.mark.parametrize("kind", MULTIMODAL_ARCHS)
def test_described_with_nested_text_config(mm_model, kind) -> None:
    path = mm_model(kind)
    with open_checkpoint(path) as ckpt:
        arch = ckpt.arch
        assert arch.known and arch.name == kind and arch.multimodal
        assert {arch.layer_of(n) for n in ckpt.tensors} == {0, 1, None}
        text = [n for n in ckpt.tensors if arch.in_text_decoder(n)]
        # the embeddings and final norm, under one of the two layouts described
        assert sum(n in ckpt.tensors for n in arch.embed + arch.final) == 2
        # 2 layers of 9 (llama), 12 (qwen2: q/k/v biases) or 13 (gemma3: q/k norms, 4 norms)
        per_layer = {"qwen2_5_vl": 12, "gemma3": 13, "llava": 9}[kind]
        head = 0 if kind == "gemma3" else 1  # Gemma 3 ties its lm_head
        assert len(text) == 2 * per_layer + 2 + head
        assert arch.sizes(ckpt.config)["num_hidden_layers"] == 2


@pytest.mark.parametrize("kind", MULTIMODAL_ARCHS)
def test_rtn_quantizes_only_the_text_decoder(mm_model, tmp_path, kind) -> None:
    pytest.importorskip("compressed_tensors")
    src, out = mm_model(kind), tmp_path / "q"
    _cli(["compress", "quantize", str(src), "-o", str(out), "--method", "rtn", "--bits", "4",
          "--group-size", "32"])  # fmt: skip
    _check_vision_untouched(src, out)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" in config and "text_config" in config
    assert config["text_config"]["num_hidden_layers"] == 2
    ignored = config["quantization_config"]["ignore"]
    assert any("vision" in n or "visual" in n for n in ignored)
    loaded, ref = _load(kind, out), _load(kind, src)
    before = _logits(kind, ref)
    decoded = _dequantized(out)
    assert len(decoded) == 14
    for name, mod in _text_linears(ref).items():
        mod.weight.data = rtn_quantize(
            mod.weight.data, RTNConfig(bits=4, group_size=32)
        ).dequantize()
        torch.testing.assert_close(decoded[name[name.index("layers.") :]], mod.weight.data)
    _check_only_text_linears_changed(_load(kind, src), loaded)
    _check_oracle(_logits(kind, loaded), _logits(kind, ref), before)


@pytest.mark.parametrize("kind", MULTIMODAL_ARCHS)
def test_gptq_quantizes_only_the_text_decoder(mm_model, tmp_path, kind) -> None:
    """GPTQ calibrates on text through the model's own forward (text embeddings, the text
    decoder's layers); its dequantized weights are on a 4-bit grid (at most 16 levels per
    row and group of 32 columns), and the output's logits are those of the original model
    carrying exactly those weights."""
    pytest.importorskip("compressed_tensors")
    src, out = mm_model(kind), tmp_path / "q"
    _cli(["compress", "quantize", str(src), "-o", str(out), "--method", "gptq", "--bits", "4",
          "--group-size", "32", *CALIB])  # fmt: skip
    _check_vision_untouched(src, out)
    loaded, ref = _load(kind, out), _load(kind, src)
    _check_only_text_linears_changed(ref, loaded)
    before = _logits(kind, ref)
    decoded = _dequantized(out)
    assert len(decoded) == 14
    for name, mod in _text_linears(ref).items():
        w = decoded[name[name.index("layers.") :]]
        assert not torch.equal(w, mod.weight.data), name
        groups = w.reshape(w.shape[0], -1, 32)
        levels = max(len(torch.unique(groups[r, g])) for r in range(w.shape[0])
                     for g in range(groups.shape[1]))  # fmt: skip
        assert levels <= 16, (name, levels)
        mod.weight.data = w.clone()
    _check_oracle(_logits(kind, loaded), _logits(kind, ref), before)


@pytest.mark.parametrize("kind", MULTIMODAL_ARCHS)
def test_nf4_quantizes_only_the_text_decoder(mm_model, tmp_path, kind) -> None:
    """NF4 (bitsandbytes): the text Linears load as Linear4bit, every vision and projector
    Linear stays a float Linear (llm_int8_skip_modules), and the logits are those of
    transformers' own NF4 of the original (quantized on load, skipping the same modules)."""
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    src, out = mm_model(kind), tmp_path / "q"
    _cli(["compress", "quantize", str(src), "-o", str(out), "--method", "nf4"])
    _check_vision_untouched(src, out)
    loaded, ref = _load(kind, out), _load(kind, src)
    four_bit = {n for n, m in loaded.named_modules() if type(m).__name__ == "Linear4bit"}
    assert four_bit == set(_text_linears(ref))
    _check_only_text_linears_changed(ref, loaded)
    skip = json.loads((out / "config.json").read_text())["quantization_config"]
    theirs = (
        model_class(kind)
        .from_pretrained(
            src,
            dtype=torch.float32,
            quantization_config=BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_compute_dtype=torch.float32,
                llm_int8_skip_modules=skip["llm_int8_skip_modules"],
            ),
        )
        .eval()
    )
    _check_oracle(_logits(kind, loaded), _logits(kind, theirs), _logits(kind, ref))


@pytest.mark.parametrize("kind", MULTIMODAL_ARCHS)
def test_wanda_prunes_only_the_text_decoder(mm_model, tmp_path, kind) -> None:
    src, out = mm_model(kind), tmp_path / "p"
    _cli(["compress", "prune", str(src), "-o", str(out), "--method", "wanda", "--sparsity", "0.5",
          *CALIB])  # fmt: skip
    _check_vision_untouched(src, out)
    loaded, ref = _load(kind, out), _load(kind, src)
    _check_only_text_linears_changed(ref, loaded)
    before = _logits(kind, ref)
    pruned = _text_linears(loaded)
    for name, mod in _text_linears(ref).items():
        w, kept = pruned[name].weight.data, pruned[name].weight.data != 0
        assert (kept.sum(dim=1) == w.shape[1] // 2).all(), name  # half of every row zeroed
        assert torch.equal(w[kept], mod.weight.data[kept]), name  # the rest unchanged
        mod.weight.data = mod.weight.data * kept
    _check_oracle(_logits(kind, loaded), _logits(kind, ref), before)


@pytest.mark.parametrize("kind", MULTIMODAL_ARCHS)
def test_linear_merge_with_a_shared_vision_tower(mm_model, tmp_path, kind) -> None:
    """Two fine-tunes of one VLM (different text decoders, the same vision tower): the text
    tensors are 0.3·a + 0.7·b; the vision tower is copied as stored (0.3·v + 0.7·v in float32
    need not give v back bit for bit), and the report lists it."""
    a, b, out = mm_model(kind, 0), mm_model(kind, 1, vision_seed=0), tmp_path / "m"
    _check_vision_untouched(a, b)  # the premise: the inputs share their vision tower
    _cli(["merge", "linear", str(a), str(b), "--weights", "0.3,0.7", "-o", str(out),
          "--report", str(tmp_path / "r.json")])  # fmt: skip
    _check_vision_untouched(a, out)
    extra = json.loads((tmp_path / "r.json").read_text())["result"]["extra"]
    assert sorted(extra["copied_shared"]) == sorted(_outside_text(a))
    loaded, ref, other = _load(kind, out), _load(kind, a), _load(kind, b)
    before = _logits(kind, ref)
    with torch.no_grad():
        for p, q in zip(ref.parameters(), other.parameters(), strict=True):
            p.copy_(0.3 * p + 0.7 * q)
    _check_oracle(_logits(kind, loaded), _logits(kind, ref), before)


@pytest.mark.parametrize(("method", "options"), [("slerp", ["--t", "0.3"]),
                                                 ("ties", ["--density", "0.5"])])  # fmt: skip
def test_slerp_and_ties_keep_a_shared_vision_tower(mm_model, tmp_path, method, options) -> None:
    """SLERP and TIES (base: a) merge the text decoders and copy the shared vision tower."""
    kind = "qwen2_5_vl"
    a, b, out = mm_model(kind, 0), mm_model(kind, 1, vision_seed=0), tmp_path / "m"
    base = ["--base", str(a)] if method == "ties" else []
    _cli(["merge", method, str(a), str(b), *base, *options, "-o", str(out)])
    _check_vision_untouched(a, out)
    loaded, ref = _load(kind, out), _load(kind, a)
    changed = {n for n, p in ref.named_parameters()
               if not torch.equal(p, dict(loaded.named_parameters())[n])}  # fmt: skip
    assert changed and all(".language_model." in n or n == "lm_head.weight" for n in changed)
    assert {n + ".weight" for n in _text_linears(ref)} <= changed
    assert torch.isfinite(_logits(kind, loaded)).all()


def test_linear_merge_of_different_vision_towers_merges_them(mm_model, tmp_path) -> None:
    """Vision towers that differ are merged tensor-wise, like every other tensor (mergekit)."""
    kind = "llava"
    a, b, out = mm_model(kind, 0), mm_model(kind, 1), tmp_path / "m"
    _cli(["merge", "linear", str(a), str(b), "--weights", "0.3,0.7", "-o", str(out)])
    with open_checkpoint(a) as ca, open_checkpoint(b) as cb, open_checkpoint(out) as co:
        outside = [n for n in ca.tensors if not ca.arch.in_text_decoder(n)]
        for n in outside:
            want = 0.3 * ca.get_tensor(n) + 0.7 * cb.get_tensor(n)
            torch.testing.assert_close(co.get_tensor(n), want, rtol=1e-6, atol=1e-7)
            assert not torch.equal(co.get_tensor(n), ca.get_tensor(n)), n


@pytest.mark.parametrize("kind", MULTIMODAL_ARCHS)
def test_layer_drop_edits_the_text_config(mm_model, tmp_path, kind) -> None:
    src, out = mm_model(kind), tmp_path / "d"
    _cli(["compress", "prune", str(src), "-o", str(out), "--method", "layers", "--layers", "1"])
    _check_vision_untouched(src, out)
    config = json.loads((out / "config.json").read_text())
    assert config["text_config"]["num_hidden_layers"] == 1
    assert "num_hidden_layers" not in config
    if "layer_types" in config["text_config"]:
        assert len(config["text_config"]["layer_types"]) == 1
    loaded = _load(kind, out)
    assert len(loaded.model.language_model.layers) == 1
    ref = _load(kind, src)
    ref.model.language_model.layers = ref.model.language_model.layers[:1]
    ref.config.text_config.num_hidden_layers = 1
    if getattr(ref.config.text_config, "layer_types", None):
        ref.config.text_config.layer_types = ref.config.text_config.layer_types[:1]
    torch.testing.assert_close(_logits(kind, loaded), _logits(kind, ref), rtol=0, atol=1e-6)


def _one_line_error(args: list[str]) -> str:
    res = CliRunner().invoke(cli, [*args, "--no-progress"])
    assert res.exit_code == 1, res.output
    lines = [x for x in res.output.strip().splitlines() if not x.startswith("note:")]
    assert len(lines) == 1, res.output
    return lines[0]


def test_slices_of_a_multimodal_model_are_refused(mm_model, tmp_path) -> None:
    src = mm_model("llava")
    recipe = tmp_path / "r.yml"
    recipe.write_text(
        f"merge_method: passthrough\nslices:\n  - sources:\n      - model: {src}\n"
        "        layer_range: [0, 1]\n"
    )
    line = _one_line_error(["merge", "run", str(recipe), "-o", str(tmp_path / "o")])
    assert "multimodal model (llava) are not supported" in line
    assert not (tmp_path / "o").exists()


def test_undescribed_multimodal_architecture_is_refused(mm_model, tmp_path) -> None:
    """A multimodal class no description covers (here a LLaVA checkpoint relabelled
    PaliGemma): every command that needs the layout refuses in one line."""
    import shutil

    src = tmp_path / "pali"
    shutil.copytree(mm_model("llava"), src)
    config = json.loads((src / "config.json").read_text())
    config.update(model_type="paligemma", architectures=["PaliGemmaForConditionalGeneration"])
    (src / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    for args in (["compress", "quantize", str(src), "-o", str(out), "--group-size", "32"],
                 ["compress", "prune", str(src), "-o", str(out), "--method", "wanda"],
                 ["merge", "linear", str(src), str(src), "-o", str(out)]):  # fmt: skip
        line = _one_line_error(args)
        assert "architecture paligemma (PaliGemmaForConditionalGeneration)" in line
        assert "is not described in weightsmith" in line and not out.exists()


def test_text_only_layout_under_a_multimodal_config_is_refused(mm_model, tmp_path) -> None:
    """A LLaVA config over tensors named like a bare Llama (model.layers.N): the described
    layout finds no decoder layer, and opening the checkpoint says so."""
    import shutil

    from weightsmith.errors import CheckpointError

    src = tmp_path / "renamed"
    shutil.copytree(mm_model("llava"), src)
    from safetensors.torch import load_file, save_file

    for f in src.glob("*.safetensors"):
        tensors = {n.replace("language_model.model.", "model."): t for n, t in load_file(f).items()}
        save_file(tensors, f, metadata={"format": "pt"})
    index = src / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"] = {
        n.replace("language_model.model.", "model."): s for n, s in data["weight_map"].items()
    }
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"text_config\.num_hidden_layers is 2 .* 0 decoder"):
        open_checkpoint(src)


# transformers 4.52..4.57 saved the class's own module names (model.language_model.layers.N)
_CLASS_LAYOUT = {
    "qwen2_5_vl": {"model.": "model.language_model.", "visual.": "model.visual."},
    "llava": {"language_model.model.": "model.language_model.", "language_model.lm_head.": "lm_head.",
              "vision_tower.": "model.vision_tower.",
              "multi_modal_projector.": "model.multi_modal_projector."},
}  # fmt: skip


def _renamed(name: str, renames: dict[str, str]) -> str:
    for old, new in renames.items():
        if name.startswith(old):
            return new + name[len(old) :]
    return name


@pytest.mark.parametrize("kind", sorted(_CLASS_LAYOUT))
def test_class_layout_checkpoints_are_described_too(mm_model, tmp_path, kind) -> None:
    """The same model stored under the class's module names: detected with its layers, RTN
    quantizes the same 14 Linears, the vision tower is copied, the output loads and runs."""
    pytest.importorskip("compressed_tensors")
    import shutil

    from safetensors.torch import load_file, save_file

    src = tmp_path / "class-layout"
    shutil.copytree(mm_model(kind), src)
    renames = _CLASS_LAYOUT[kind]
    for f in src.glob("*.safetensors"):
        tensors = {_renamed(n, renames): t for n, t in load_file(f).items()}
        save_file(tensors, f, metadata={"format": "pt"})
    index = src / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"] = {_renamed(n, renames): s for n, s in data["weight_map"].items()}
    index.write_text(json.dumps(data))
    with open_checkpoint(src) as ckpt:
        assert ckpt.num_layers == 2 and len(_outside_text(src)) == len(
            _outside_text(mm_model(kind))
        )
    out = tmp_path / "q"
    _cli(["compress", "quantize", str(src), "-o", str(out), "--method", "rtn", "--bits", "4",
          "--group-size", "32"])  # fmt: skip
    _check_vision_untouched(src, out)
    assert len(_dequantized(out)) == 14
    loaded, ref = _load(kind, out), _load(kind, mm_model(kind))
    _check_only_text_linears_changed(ref, loaded)
    before = _logits(kind, ref)
    for mod in _text_linears(ref).values():
        mod.weight.data = rtn_quantize(
            mod.weight.data, RTNConfig(bits=4, group_size=32)
        ).dequantize()
    _check_oracle(_logits(kind, loaded), _logits(kind, ref), before)
