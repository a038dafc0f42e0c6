"""config.json must agree with the tensors: checked once, when any command opens a checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from weightsmith.cli.main import cli
from weightsmith.errors import CheckpointError
from weightsmith.io import open_checkpoint
from weightsmith.io.architectures import detect_architecture
from weightsmith.io.consistency import check_config_shapes


def _patch_config(path: Path, **changes: object) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"hidden_size": 128}, r"hidden_size is 128 but tensor 'model.embed_tokens.weight' has "
         r"shape \[\d+, 64\] \(dim 1 is 64\)"),
        ({"num_hidden_layers": 1}, "num_hidden_layers is 1 but the tensors hold 2 decoder layers"),
        ({"num_hidden_layers": 8}, "num_hidden_layers is 8 but the tensors hold 2 decoder layers"),
        ({"vocab_size": 1000}, r"vocab_size is 1000 but tensor 'model.embed_tokens.weight'"),
        ({"intermediate_size": 100}, r"intermediate_size is 100 but tensor 'model.layers.0.mlp"),
        ({"num_attention_heads": 8, "head_dim": 16},
         r"num_attention_heads\*head_dim is 8\*16 = 128 but tensor 'model.layers.0.self_attn"
         r".q_proj.weight' has shape \[64, 64\]"),
        ({"num_key_value_heads": 4}, r"num_key_value_heads\*head_dim is 4\*16 = 64 but tensor "
         r"'model.layers.0.self_attn.k_proj.weight' has shape \[32, 64\]"),
    ],
)  # fmt: skip
def test_config_disagreeing_with_tensors_is_refused(tiny_model_copy, changes, message) -> None:
    path = tiny_model_copy("llama")
    _patch_config(path, **changes)
    with pytest.raises(CheckpointError, match=message) as err:
        open_checkpoint(path)
    assert str(err.value).startswith(str(path / "config.json"))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "gpt_neox"])
def test_consistent_configs_of_every_family_pass(tiny_model, arch: str) -> None:
    with open_checkpoint(tiny_model(arch)) as ckpt:
        assert ckpt.arch.config_shapes  # the description says what to check
        assert ckpt.num_layers == 2


@pytest.mark.parametrize(
    ("arch", "key", "value", "tensor"),
    [
        ("gpt2", "n_embd", 32, "transformer.wte.weight"),
        ("gpt2", "n_inner", 96, "transformer.h.0.mlp.c_fc.weight"),
        ("gpt2", "n_layer", 3, None),
        ("gpt_neox", "intermediate_size", 96, "gpt_neox.layers.0.mlp.dense_h_to_4h.weight"),
        ("qwen2", "vocab_size", 300, "model.embed_tokens.weight"),
    ],
)
def test_other_families_are_checked_too(tiny_model_copy, arch, key, value, tensor) -> None:
    path = tiny_model_copy(arch)
    _patch_config(path, **{key: value})
    with pytest.raises(CheckpointError, match=f"{key} is {value} but ") as err:
        open_checkpoint(path)
    if tensor:
        assert repr(tensor) in str(err.value)


def test_per_layer_intermediate_sizes(tiny_model) -> None:
    """A list-valued size is compared layer by layer (one layer pruned narrower)."""
    with open_checkpoint(tiny_model("llama")) as ckpt:
        shapes = {n: (i.shape, i.dtype) for n, i in ckpt.tensors.items()}
        config = dict(ckpt.config)
    shapes["model.layers.1.mlp.gate_proj.weight"] = ((96, 64), "F32")
    arch = detect_architecture(config, list(shapes))
    config["intermediate_size"] = [128, 96]
    with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight'"):
        check_config_shapes(config, arch, shapes, "cfg")  # up_proj of layer 1 is still 128
    shapes["model.layers.1.mlp.up_proj.weight"] = ((96, 64), "F32")
    shapes["model.layers.1.mlp.down_proj.weight"] = ((64, 96), "F32")
    check_config_shapes(config, arch, shapes, "cfg")


def test_absent_keys_packed_tensors_and_unknown_architectures_are_skipped(tiny_model) -> None:
    with open_checkpoint(tiny_model("llama")) as ckpt:
        shapes = {n: (i.shape, i.dtype) for n, i in ckpt.tensors.items()}
        config = dict(ckpt.config)
    arch = detect_architecture(config, list(shapes))
    del config["intermediate_size"]
    shapes["model.layers.0.self_attn.q_proj.weight"] = ((64, 8), "I32")  # packed 4-bit codes
    check_config_shapes(config, arch, shapes, "cfg")
    unknown = detect_architecture({"model_type": "mystery"}, ["blocks.0.w", "blocks.1.w"])
    check_config_shapes({"hidden_size": 3}, unknown, {"blocks.0.w": ((4, 4), "F32")}, "cfg")


def test_checkpoint_without_tensors_is_refused(tmp_path: Path) -> None:
    save_file({}, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="no tensors"):
        open_checkpoint(tmp_path)
    result = CliRunner().invoke(cli, ["convert", str(tmp_path), "-o", str(tmp_path / "out")])
    assert result.exit_code == 1 and "no tensors" in result.output
    assert not (tmp_path / "out").exists()


def test_tensor_missing_from_index_is_kept_as_transformers_does(tiny_model_copy, tmp_path) -> None:
    """transformers loads every tensor of every shard the index names, listed or not: so do we
    (dropping it would change the model's logits)."""
    path = tiny_model_copy("llama")
    index_file = path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shard = index["weight_map"].pop("model.norm.weight")
    index_file.write_text(json.dumps(index))
    assert shard in index["weight_map"].values()  # the shard itself is still named
    with open_checkpoint(path) as ckpt:
        assert ckpt.info("model.norm.weight").shard == shard
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["convert", str(path), "-o", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    stored = {}
    for f in out.glob("*.safetensors"):
        stored.update(load_file(f))
    assert torch.equal(stored["model.norm.weight"], load_file(path / shard)["model.norm.weight"])


@pytest.mark.parametrize(
    "command",
    [
        ["inspect"],
        ["convert", "-o", "{out}"],
        ["compress", "quantize", "--method", "rtn", "--bits", "4", "--group-size", "32",
         "-o", "{out}"],
        ["merge", "linear", "{model}", "-o", "{out}"],
    ],
)  # fmt: skip
def test_every_command_refuses_a_disagreeing_config(tiny_model_copy, tmp_path, command) -> None:
    path = tiny_model_copy("llama")
    _patch_config(path, hidden_size=128)
    out = tmp_path / "out"
    args = [c.format(out=out, model=path) for c in command]
    args = [*args[:2], str(path), *args[2:]] if args[0] in ("compress", "merge") else args
    if args[0] in ("inspect", "convert"):
        args.insert(1, str(path))
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines()[-1].startswith("error: ")
    assert "hidden_size is 128" in result.output
    assert not out.exists()


@pytest.mark.parametrize(
    "changes",
    [
        {"hidden_size": 128},
        {"num_hidden_layers": 3},
        {"num_hidden_layers": 8},
        {"vocab_size": 1000},
    ],
)
def test_issue_cases_on_stories260k(stories260k: Path, tmp_path: Path, changes) -> None:
    """The issue's reproductions: quantize and merge used to exit 0 on each of these."""
    path = tmp_path / "base"
    shutil.copytree(stories260k, path)
    _patch_config(path, **changes)
    key, value = next(iter(changes.items()))
    for args in (
        ["compress", "quantize", str(path), "--method", "rtn", "-o", str(tmp_path / "q")],
        ["merge", "linear", str(path), str(path), "-o", str(tmp_path / "m")],
    ):
        result = CliRunner().invoke(cli, [*args, "--no-progress"])
        assert result.exit_code == 1, result.output
        assert f"{key} is {value} but" in result.output.strip().splitlines()[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]


def test_passthrough_of_layers_of_two_widths_is_refused(tiny_model, tmp_path: Path) -> None:
    """Layers 0-1 of a model and layer 1 of a copy with a narrower MLP: each input agrees with
    its config, but the stacked output would not load, so the commit refuses it."""
    narrow = tmp_path / "narrow"
    shutil.copytree(tiny_model("llama"), narrow)
    for shard in narrow.glob("*.safetensors"):
        state = load_file(shard)
        for name, t in state.items():
            if name.endswith(("gate_proj.weight", "up_proj.weight")):
                state[name] = t[:96].contiguous()
            elif name.endswith("down_proj.weight"):
                state[name] = t[:, :96].contiguous()
        save_file(state, shard, metadata={"format": "pt"})
    _patch_config(narrow, intermediate_size=96)
    open_checkpoint(narrow).close()  # consistent on its own
    out = tmp_path / "out"
    result = CliRunner().invoke(
        cli,
        ["merge", "passthrough", "--slice", f"{tiny_model('llama')}:0:2", "--slice",
         f"{narrow}:1:2", "-o", str(out), "--no-progress"],
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    line = result.output.strip().splitlines()[-1]
    assert (
        "would not load" in line and "intermediate_size is 128 but tensor 'model.layers.2" in line
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["narrow"]
