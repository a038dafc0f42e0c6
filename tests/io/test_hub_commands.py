"""Every kind of command takes ``org/name[@revision]`` from a fake Hugging Face cache: the
output equals the one from the same model's local folder (tensor for tensor), and the
provenance names the repository and commit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from tests.io.test_hub import SHA_A, SHA_B, add_to_cache, hf_cache, no_network  # noqa: F401
from weightsmith.cli.main import cli
from weightsmith.io import open_checkpoint
from weightsmith.testing.tiny import TOKENIZER_CORPUS


@pytest.fixture
def cached(tiny_model, hf_cache) -> dict[str, Path]:  # noqa: F811
    """org/a (seed 0, refs/main -> SHA_A) and org/b (seed 1, refs/main -> SHA_B)."""
    add_to_cache(hf_cache, "org/a", tiny_model("llama", 0), SHA_A)
    add_to_cache(hf_cache, "org/b", tiny_model("llama", 1), SHA_B)
    return {"org/a": tiny_model("llama", 0), "org/b": tiny_model("llama", 1)}


def _run(args: list[str]):
    return CliRunner().invoke(cli, [*args, "--no-progress"])


def _same_tensors(a: Path, b: Path) -> None:
    with open_checkpoint(a) as ca, open_checkpoint(b) as cb:
        assert sorted(ca.tensors) == sorted(cb.tensors)
        for name in ca.tensors:
            assert torch.equal(ca.get_tensor(name), cb.get_tensor(name)), name


def _hub_models(out: Path) -> list[tuple[str, str]]:
    record = json.loads((out / "weightsmith.json").read_text())
    return sorted((m["repo_id"], m["revision"]) for m in record.get("hub_models", []))


@pytest.mark.parametrize("ref", ["org/a", f"org/a@{SHA_A}"])
def test_quantize_takes_hub_ids(cached, tmp_path, no_network, ref) -> None:  # noqa: F811
    args = ["compress", "quantize", "--method", "rtn", "--group-size", "32"]
    res = _run([*args, ref, "-o", str(tmp_path / "hub")])
    assert res.exit_code == 0, res.output
    assert _run([*args, str(cached["org/a"]), "-o", str(tmp_path / "local")]).exit_code == 0
    _same_tensors(tmp_path / "hub", tmp_path / "local")
    assert _hub_models(tmp_path / "hub") == [("org/a", SHA_A)]
    assert _hub_models(tmp_path / "local") == []
    assert no_network == []


def test_prune_takes_hub_ids(cached, tmp_path, no_network) -> None:  # noqa: F811
    args = ["compress", "prune", "--method", "magnitude", "--sparsity", "0.5"]
    assert _run([*args, f"org/b@{SHA_B}", "-o", str(tmp_path / "hub")]).exit_code == 0
    assert _run([*args, str(cached["org/b"]), "-o", str(tmp_path / "local")]).exit_code == 0
    _same_tensors(tmp_path / "hub", tmp_path / "local")
    assert _hub_models(tmp_path / "hub") == [("org/b", SHA_B)]
    assert no_network == []


def test_eval_ppl_takes_hub_ids(cached, tmp_path, no_network) -> None:  # noqa: F811
    text = tmp_path / "text.txt"
    text.write_text(" ".join(TOKENIZER_CORPUS[:5]))
    args = ["--data", str(text), "--seq-len", "16", "--max-tokens", "64", "--json"]
    hub = _run(["eval", "ppl", "org/a", "--reference", f"org/a@{SHA_A}", *args])
    local = _run(["eval", "ppl", str(cached["org/a"]), *args])
    assert hub.exit_code == 0 and local.exit_code == 0, hub.output + local.output
    hub_out, local_out = json.loads(hub.stdout), json.loads(local.stdout)
    assert hub_out["ppl"] == pytest.approx(local_out["ppl"], rel=1e-6)
    assert hub_out["kl"] == pytest.approx(0.0, abs=1e-6)  # the reference is the same commit
    assert no_network == []


def test_merge_command_and_yaml_take_hub_ids(cached, tmp_path, no_network) -> None:  # noqa: F811
    res = _run(["merge", "linear", "org/a", f"org/b@{SHA_B}", "--weights", "0.3,0.7",
                "-o", str(tmp_path / "hub")])  # fmt: skip
    assert res.exit_code == 0, res.output
    local = [str(cached["org/a"]), str(cached["org/b"])]
    res = _run(["merge", "linear", *local, "--weights", "0.3,0.7", "-o", str(tmp_path / "local")])
    assert res.exit_code == 0, res.output
    _same_tensors(tmp_path / "hub", tmp_path / "local")
    assert _hub_models(tmp_path / "hub") == [("org/a", SHA_A), ("org/b", SHA_B)]

    def recipe(base: str, other: str) -> Path:
        path = tmp_path / f"r{len(list(tmp_path.glob('r*.yml')))}.yml"
        path.write_text(yaml.safe_dump({
            "merge_method": "task_arithmetic", "base_model": base,
            "models": [{"model": other, "parameters": {"weight": 0.5}}],
        }))  # fmt: skip
        return path

    res = _run(["merge", "run", str(recipe(f"org/a@{SHA_A}", "org/b")), "-o", str(tmp_path / "y")])
    assert res.exit_code == 0, res.output
    res = _run(["merge", "run", str(recipe(*local)), "-o", str(tmp_path / "yl")])
    assert res.exit_code == 0, res.output
    _same_tensors(tmp_path / "y", tmp_path / "yl")
    assert _hub_models(tmp_path / "y") == [("org/a", SHA_A), ("org/b", SHA_B)]
    assert no_network == []


def test_model_plus_adapter_takes_hub_ids(cached, hf_cache, tmp_path, no_network) -> None:  # noqa: F811
    """``org/a+org/ad``: the adapter comes from the cache too (its own files), and both
    repositories are on record."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(cached["org/a"]),
        LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False),
    )
    model.save_pretrained(tmp_path / "ad")
    no_network.clear()  # peft's save_pretrained looks the base up on the hub; we never do
    add_to_cache(hf_cache, "org/ad", tmp_path / "ad", SHA_B)
    outs = {}
    for key, ref in [("hub", "org/a+org/ad"), ("local", f"{cached['org/a']}+{tmp_path / 'ad'}")]:
        path = tmp_path / f"{key}.yml"
        path.write_text(yaml.safe_dump({
            "merge_method": "linear", "models": [{"model": ref, "parameters": {"weight": 1.0}}],
        }))  # fmt: skip
        res = _run(["merge", "run", str(path), "-o", str(tmp_path / key)])
        assert res.exit_code == 0, res.output
        outs[key] = tmp_path / key
    _same_tensors(outs["hub"], outs["local"])
    assert _hub_models(outs["hub"]) == [("org/a", SHA_A), ("org/ad", SHA_B)]
    path = tmp_path / "bad.yml"
    path.write_text(yaml.safe_dump({
        "merge_method": "linear", "models": [{"model": "org/a+org/b", "parameters": {"weight": 1.0}}],
    }))  # fmt: skip
    res = _run(["merge", "run", str(path), "-o", str(tmp_path / "bad")])
    assert res.exit_code == 1 and "adapter_config.json" in res.output, res.output
    assert no_network == []


@pytest.mark.parametrize(
    "args",
    [["nearswap", "org/a", "org/b", "--t", "0.5"],
     ["sce", "--base", "org/a", "org/b", "org/a", "--select-topk", "0.5"],
     ["nuslerp", "org/a", "org/b", "--weights", "1,3"],
     ["arcee-fusion", "org/a", "org/b"]],
    ids=lambda a: a[0],
)  # fmt: skip
def test_every_merge_command_takes_hub_ids(cached, tmp_path, no_network, args) -> None:  # noqa: F811
    """The method commands added beside linear resolve hub ids the same way."""
    res = _run(["merge", *args, "-o", str(tmp_path / "hub")])
    assert res.exit_code == 0, res.output
    local = [str(cached[a]) if a in cached else a for a in args]
    res = _run(["merge", *local, "-o", str(tmp_path / "local")])
    assert res.exit_code == 0, res.output
    _same_tensors(tmp_path / "hub", tmp_path / "local")
    assert "--download" in _run(["merge", args[0], "--help"]).output  # as every model command
    assert no_network == []


def test_recipe_takes_hub_ids(cached, tmp_path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"steps": [
        {"id": "m", "merge": {"method": "linear", "args": ["org/a", f"org/b@{SHA_B}"],
                              "weights": [0.5, 0.5]}},
        {"id": "q", "quantize": {"method": "rtn", "group_size": 32}, "input": "org/a"},
    ]}))  # fmt: skip
    res = _run(["run", str(path), "-o", str(tmp_path / "work")])
    assert res.exit_code == 0, res.output
    assert _hub_models(tmp_path / "work" / "m") == [("org/a", SHA_A), ("org/b", SHA_B)]
    assert _hub_models(tmp_path / "work" / "q") == [("org/a", SHA_A)]
    args = ["compress", "quantize", "--method", "rtn", "--group-size", "32"]
    assert _run([*args, str(cached["org/a"]), "-o", str(tmp_path / "local")]).exit_code == 0
    _same_tensors(tmp_path / "work" / "q", tmp_path / "local")


def test_uncached_ids_fail_in_one_line_offline(cached, tmp_path, no_network) -> None:  # noqa: F811
    out = tmp_path / "out"
    cases = [
        ["compress", "quantize", "org/missing", "-o", str(out)],
        ["compress", "prune", f"org/a@{SHA_B}", "-o", str(out), "--method", "magnitude"],
        ["merge", "linear", "org/a", "org/missing", "-o", str(out)],
        ["eval", "ppl", "org/missing", "--data", str(tmp_path)],
        ["eval", "ppl", "org/a", "--data", str(tmp_path), "--reference", "org/missing"],
        ["distill", "kd", "--student", "org/a", "--teacher", "org/missing", "--data",
         str(tmp_path), "-o", str(out)],
        ["convert", "org/missing@v1", "-o", str(out)],
    ]  # fmt: skip
    for args in cases:
        res = _run(args)
        assert res.exit_code == 1, (args, res.output)
        lines = res.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: org/"), res.output
        assert "is not in the Hugging Face cache" in lines[0] and "hf download org/" in lines[0]
        assert "--download" in lines[0] and not out.exists()
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"steps": [{"quantize": {}, "input": "org/missing"}]}))
    res = _run(["run", str(recipe), "-o", str(tmp_path / "work")])
    assert res.exit_code == 1 and "org/missing is not in the Hugging Face cache" in res.output
    assert not (tmp_path / "work").exists()
    assert no_network == []


def test_download_is_the_only_way_to_the_network(cached, tmp_path, no_network) -> None:  # noqa: F811
    res = _run(["compress", "quantize", "org/missing", "--download", "-o", str(tmp_path / "o")])
    assert res.exit_code == 1 and "error: org/missing: download failed" in res.output, res.output
    assert no_network, "--download should have tried the hub"
    assert not (tmp_path / "o").exists()
