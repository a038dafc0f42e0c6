"""End-to-end merges of tiny models: every output tensor equals the formula, output loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from merge_testlib import assert_one_line_error, run_cli, tensors
from safetensors.torch import load_file, save_file

from weightsmith.merge import MergeRecipe, ModelInput, merge
from weightsmith.merge.methods import TensorParams, merge_tensors
from weightsmith.merge.params import evaluate_setting


def load_hf(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)


def layer_t(name: str, num_layers: int = 2) -> float:
    if ".layers." in name:
        return int(name.split(".layers.")[1].split(".")[0]) / (num_layers - 1)
    return 0.0  # embeddings, final norm and lm_head: t = 0 (mergekit 0.1.5)


def test_linear_cli_matches_formula_and_loads(trio, tmp_path):
    a, b, c = trio
    out = tmp_path / "out"
    r = run_cli("linear", a, b, c, "--weights", "1,2,1", "-o", out, "--report", tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    ta, tb, tc, to = tensors(a), tensors(b), tensors(c), tensors(out)
    assert set(to) == set(ta)
    for n, v in to.items():
        expected = (ta[n] + 2 * tb[n] + tc[n]) / 4
        torch.testing.assert_close(v, expected, rtol=0, atol=1e-7)  # float32 rounding only
    load_hf(out)
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["ok"] and report["method"] == "linear"
    assert (out / "mergekit_config.yml").is_file() and (out / "README.md").is_file()
    prov = json.loads((out / "weightsmith.json").read_text())
    assert prov["operation"] == "merge" and prov["recipe"]["version"] == 1


def test_slerp_gradient_and_filters_follow_mergekit_depth(trio, tmp_path):
    a, b, _ = trio
    out = tmp_path / "out"
    r = run_cli("slerp", a, b, "--t", "self_attn=0,1", "--t", "mlp=0.7", "--t", "0.25", "-o", out)
    assert r.exit_code == 0, r.output
    ta, tb, to = tensors(a), tensors(b), tensors(out)
    setting = [
        {"filter": "self_attn", "value": [0, 1]},
        {"filter": "mlp", "value": 0.7},
        {"value": 0.25},
    ]
    for n, v in to.items():
        t = evaluate_setting(n, setting, layer_t(n))
        expected = merge_tensors("slerp", [ta[n], tb[n]], t=t)
        torch.testing.assert_close(v, expected, rtol=0, atol=1e-6)
    # layer 0 self_attn: t = 0 -> exactly A; layer 1 self_attn: t = 1 -> B
    q0, q1 = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"
    torch.testing.assert_close(to[q0], ta[q0], rtol=0, atol=1e-7)
    torch.testing.assert_close(to[q1], tb[q1], rtol=0, atol=1e-7)
    load_hf(out)


@pytest.mark.parametrize(
    ("args", "method", "globals_", "density"),
    [
        (
            ["task-arithmetic", "--lambda", "0.5"],
            "task_arithmetic",
            {"normalize": False, "lambda": 0.5},
            None,
        ),
        (["ties", "--density", "0.4"], "ties", {"normalize": True, "lambda": 1.0}, 0.4),
        (
            ["dare", "--density", "0.5", "--seed", "3"],
            "dare_linear",
            {"normalize": False, "rescale": True, "lambda": 1.0, "seed": 3},
            0.5,
        ),
        (
            ["dare", "--ties", "--density", "0.5"],
            "dare_ties",
            {"normalize": False, "rescale": True, "lambda": 1.0, "seed": 0},
            0.5,
        ),
    ],
)
def test_task_vector_methods_match_formula(trio, tmp_path, args, method, globals_, density):
    a, b, c = trio
    out = tmp_path / "out"
    r = run_cli(*args, "--base", a, b, c, "--weights", "1,0.5", "-o", out)
    assert r.exit_code == 0, r.output
    ta, tb, tc, to = tensors(a), tensors(b), tensors(c), tensors(out)
    for n, v in to.items():
        models = [{"weight": 1.0}, {"weight": 0.5}]
        if density is not None:
            models = [{**m, "density": density} for m in models]
        params = TensorParams(n, globals_, tuple(models))
        expected = merge_tensors(method, [ta[n], tb[n], tc[n]], params)
        torch.testing.assert_close(v, expected, rtol=0, atol=1e-6)
    load_hf(out)


def test_dtype_and_sharding(trio, tmp_path):
    a, b, _ = trio
    out = tmp_path / "out"
    r = run_cli("linear", a, b, "-o", out, "--dtype", "bfloat16", "--max-shard-size", "100KB")
    assert r.exit_code == 0, r.output
    assert (out / "model.safetensors.index.json").is_file()
    to = tensors(out)
    assert all(v.dtype == torch.bfloat16 for v in to.values())
    config = json.loads((out / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    ta, tb = tensors(a), tensors(b)
    n = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(to[n], ((ta[n] + tb[n]) / 2).bfloat16())


def test_streaming_in_small_chunks_equals_whole_tensor(trio, tmp_path):
    a, b, c = trio
    recipe = MergeRecipe(
        "ties",
        models=(ModelInput(str(b), {"weight": 1.0}), ModelInput(str(c), {"weight": 0.7})),
        base_model=str(a),
        parameters={"density": 0.3},
    )
    merge(recipe, tmp_path / "big", progress=False)
    merge(recipe, tmp_path / "small", progress=False, chunk_elements=101)
    big, small = tensors(tmp_path / "big"), tensors(tmp_path / "small")
    assert all(torch.equal(big[n], small[n]) for n in big)


# ---------------------------------------------------------------------- checks and errors
def test_shape_mismatch_is_one_error_and_leaves_nothing(trio, tmp_path):
    from weightsmith.testing import build_tiny_model

    a = trio[0]
    other = build_tiny_model(tmp_path / "wide", "llama", seed=1, intermediate_size=96)
    out = tmp_path / "out"
    r = run_cli("linear", a, other, "-o", out)
    assert_one_line_error(r, "do not have the same tensors", "mlp")
    assert not out.exists()


def test_vocab_mismatch_needs_tokenizer_source_base(trio, tmp_path):
    """Both tokenizers have the same 300 tokens (ids 300+ are padding rows): rows merge by
    token, and the output's vocabulary is the tokenizer's, as mergekit's (no padding rows)."""
    from weightsmith.testing import build_tiny_model

    a = trio[0]
    big = build_tiny_model(tmp_path / "big", "llama", seed=1, vocab_size=330)
    out = tmp_path / "out"
    r = run_cli("slerp", a, big, "--t", "0.5", "-o", out)
    assert_one_line_error(r, "vocabulary sizes differ", "--tokenizer-source base")
    assert not out.exists()
    r = run_cli("linear", a, big, "-o", out, "--tokenizer-source", "base")
    assert r.exit_code == 0, r.output
    ta, tb, to = tensors(a), tensors(big), tensors(out)
    emb = "model.embed_tokens.weight"
    assert to[emb].shape == (300, 64)
    torch.testing.assert_close(to[emb], (ta[emb][:300] + tb[emb][:300]) / 2, rtol=0, atol=1e-7)
    load_hf(out)


def test_vocab_rows_only_the_base_has_are_copied(trio, tmp_path):
    from weightsmith.testing import build_tiny_model

    a = trio[0]
    small = build_tiny_model(tmp_path / "small", "llama", seed=1, vocab_size=300)
    out = tmp_path / "out"
    r = run_cli("task-arithmetic", "--base", a, small, "-o", out, "--tokenizer-source", "base")
    assert r.exit_code == 0, r.output
    ts, to = tensors(small), tensors(out)
    head = "lm_head.weight"
    assert to[head].shape == (300, 64)
    torch.testing.assert_close(to[head], ts[head], rtol=0, atol=1e-7)


def test_nan_input_is_an_error_naming_the_tensor(tiny_model_copy, trio, tmp_path):
    bad = tiny_model_copy("llama", 1)
    shard = next(
        p for p in sorted(bad.glob("*.safetensors")) if "o_proj" in str(load_file(p).keys())
    )
    state = load_file(shard)
    name = next(n for n in state if "o_proj" in n)
    state[name][0, 0] = float("nan")
    save_file(state, shard, metadata={"format": "pt"})
    out = tmp_path / "out"
    r = run_cli("linear", trio[0], bad, "-o", out)
    assert_one_line_error(r, name, "NaN or Inf")
    assert not out.exists()


def test_different_families_are_an_error(trio, tiny_model, tmp_path):
    r = run_cli("linear", trio[0], tiny_model("gpt2", 0), "-o", tmp_path / "out")
    assert_one_line_error(r, "different architecture families")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["slerp", "{a}", "{b}", "--t", "x"], "not a number"),
        (["ties", "--base", "{a}", "{b}", "--density", "1.5"], "density must be in (0, 1]"),
        (["linear", "{a}", "{b}", "--weights", "1,2,3"], "3 values for 2 models"),
        (["linear", "{a}", "{missing}"], "not found"),
        (["linear", "{a}", "{b}", "--device", "cuda:7"], "CUDA"),
    ],
)
def test_bad_options_are_one_line_errors(trio, tmp_path, args, fragment):
    if fragment == "CUDA" and torch.cuda.is_available():
        pytest.skip("CUDA present")
    a, b, _ = trio
    fill = {"a": a, "b": b, "missing": tmp_path / "nope"}
    out = tmp_path / "out"
    r = run_cli(*[x.format(**fill) for x in args], "-o", out)
    assert_one_line_error(r, fragment)
    assert not out.exists()


def test_existing_output_needs_force(trio, tmp_path):
    a, b, _ = trio
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    r = run_cli("linear", a, b, "-o", out)
    assert r.exit_code == 1 and (out / "keep.txt").exists()
    r = run_cli("linear", a, b, "-o", out, "--force")
    assert r.exit_code == 0 and not (out / "keep.txt").exists()


def test_failure_report_is_written(trio, tmp_path):
    r = run_cli(
        "linear", trio[0], tmp_path / "nope", "-o", tmp_path / "o", "--report", tmp_path / "r.json"
    )
    assert r.exit_code == 1
    assert json.loads((tmp_path / "r.json").read_text())["ok"] is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_device_gives_the_cpu_result(trio, tmp_path):
    a, b, c = trio
    for device, out in (("cpu", tmp_path / "cpu"), ("cuda", tmp_path / "gpu")):
        r = run_cli("ties", "--base", a, b, c, "--density", "0.5", "-o", out, "--device", device)
        assert r.exit_code == 0, r.output
    cpu, gpu = tensors(tmp_path / "cpu"), tensors(tmp_path / "gpu")
    for n in cpu:
        torch.testing.assert_close(gpu[n], cpu[n], rtol=0, atol=1e-6)


def test_chunk_cache_serves_later_passes_and_matches_reads(trio):
    from weightsmith.io import open_checkpoint
    from weightsmith.merge.engine import CheckpointChunks

    a, b, _ = trio
    name = "model.layers.0.mlp.up_proj.weight"
    with open_checkpoint(a) as ca, open_checkpoint(b) as cb:
        shape = ca.info(name).shape
        n = shape[0] * shape[1]
        cached = CheckpointChunks([(ca, name), (cb, name)], name, shape, n, chunk_elements=1000)
        uncached = CheckpointChunks(
            [(ca, name), (cb, name)], name, shape, n, chunk_elements=1000, cache_bytes=0
        )
        first = [torch.cat(p) for p in zip(*cached.chunks(), strict=True)]
        assert set(cached._cache) == {0, 1}  # every input cached after one full pass
        second = [torch.cat(p) for p in zip(*cached.chunks(), strict=True)]
        plain = [torch.cat(p) for p in zip(*uncached.chunks(), strict=True)]
        assert uncached._cache is None
    for x, y, z in zip(first, second, plain, strict=True):
        assert torch.equal(x, y) and torch.equal(x, z)
    assert torch.equal(first[0].reshape(shape), tensors(a)[name])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_slerp_native_path_equals_the_torch_path_bit_for_bit(
    tiny_model, dtype, tmp_path, monkeypatch
):
    """With float32 arithmetic (--compute-dtype float32), bf16/fp32 inputs take the kernels
    that read storage directly (memory-mapped); fp16 and WEIGHTSMITH_KERNELS=0 take the float32
    torch path: same bytes out, both near mergekit's formula (merge_tensors)."""
    a, b = tiny_model("llama", 0, dtype), tiny_model("llama", 1, dtype)
    fast, slow = tmp_path / "fast", tmp_path / "slow"
    from weightsmith.kernels import merge as native

    calls = []
    lerp2 = native.lerp2
    monkeypatch.setattr(native, "lerp2", lambda *a, **k: calls.append(1) or lerp2(*a, **k))
    wide = ("--compute-dtype", "float32")
    r = run_cli("slerp", a, b, "--t", "0.3", "-o", fast, *wide)
    assert r.exit_code == 0, r.output
    assert bool(calls) == (dtype != torch.float16)  # which path ran
    monkeypatch.setenv("WEIGHTSMITH_KERNELS", "0")
    r = run_cli("slerp", a, b, "--t", "0.3", "-o", slow, *wide)
    assert r.exit_code == 0, r.output
    ta, tb, tf, ts = tensors(a), tensors(b), tensors(fast), tensors(slow)
    for n, v in tf.items():
        assert v.dtype == dtype
        assert torch.equal(v.view(torch.uint8), ts[n].view(torch.uint8)), n
        expected = merge_tensors("slerp", [ta[n], tb[n]], t=0.3).to(dtype)
        assert torch.equal(v, expected), n


def test_slerp_stored_path_reads_the_whole_tensor_across_pieces(tmp_path):
    """A tensor bigger than one native piece (1M elements): sums and the mix span pieces."""
    from weightsmith.merge.methods.base import NATIVE_PIECE, OUT_PIECES

    n = OUT_PIECES * NATIVE_PIECE + 3 * NATIVE_PIECE // 2 + 5
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=g).to(torch.bfloat16)
    y = (x.float() + 0.3 * torch.randn(n, generator=g)).to(torch.bfloat16)
    for name, t in (("a", x), ("b", y)):
        (tmp_path / name).mkdir()
        save_file({"w": t}, tmp_path / name / "model.safetensors")
    out = tmp_path / "out"
    r = run_cli(
        "slerp",
        tmp_path / "a",
        tmp_path / "b",
        "--t",
        "0.5",
        "-o",
        out,
        "--compute-dtype",
        "float32",
    )
    assert r.exit_code == 0, r.output
    got = load_file(out / "model.safetensors")["w"]
    expected = merge_tensors("slerp", [x, y], t=0.5).to(torch.bfloat16)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_slerp_nan_in_either_input_is_an_error_naming_file_and_tensor(
    tiny_model, tiny_model_copy, dtype, tmp_path
):
    good = tiny_model("llama", 0, dtype)
    bad = tiny_model_copy("llama", 1, dtype)
    shard = next(
        p for p in sorted(bad.glob("*.safetensors")) if "up_proj" in str(load_file(p).keys())
    )
    state = load_file(shard)
    name = next(n for n in state if "up_proj" in n)
    state[name].view(-1)[-1] = float("inf")
    save_file(state, shard, metadata={"format": "pt"})
    for first, second in ((good, bad), (bad, good)):
        out = tmp_path / "out"
        r = run_cli("slerp", first, second, "--t", "0.5", "-o", out)
        assert_one_line_error(r, str(bad), name, "NaN or Inf")
        assert not out.exists()


@pytest.mark.parametrize("index", [0, 1000, 4095])
def test_copied_tensor_nan_found_in_any_block(tiny_model_copy, tmp_path, monkeypatch, index):
    """Tensors copied as stored are checked block by block in their mapping: a NaN in a later
    block (small blocks here) fails the run and nothing is written; a clean copy is bit-exact."""
    from merge_testlib import poke

    from weightsmith.merge import engine

    monkeypatch.setattr(engine, "COPY_PIECE", 256)
    clean = tiny_model_copy("llama", 0)
    out = tmp_path / "clean"
    r = run_cli("passthrough", "--slice", f"{clean}:0:2", "-o", out)
    assert r.exit_code == 0, r.output
    copied = tensors(out)
    for n, v in tensors(clean).items():
        assert torch.equal(copied[n].view(torch.uint8), v.view(torch.uint8)), n
    bad = tiny_model_copy("llama", 1)
    name = poke(bad, "embed_tokens", float("inf"), index)
    out = tmp_path / "bad"
    r = run_cli("passthrough", "--slice", f"{bad}:0:2", "-o", out)
    assert_one_line_error(r, repr(name), "NaN or Inf")
    assert not out.exists()
