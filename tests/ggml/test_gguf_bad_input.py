"""Bad input to ``convert --format gguf``: one line, exit 1, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from weightsmith.cli.main import cli


def _convert(src: Path, out: Path, *extra: str):
    return CliRunner().invoke(
        cli, ["convert", str(src), "-o", str(out), "--format", "gguf", "--no-progress", *extra]
    )


def _assert_refused(res, out: Path, *needles: str) -> None:
    assert res.exit_code == 1, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")] == []


def test_architecture_llama_cpp_cannot_run_is_named(tiny_model, tmp_path: Path) -> None:
    out = tmp_path / "m.gguf"
    res = _convert(tiny_model("gpt_neox"), out)
    _assert_refused(
        res, out, "GPTNeoXForCausalLM", "'gpt_neox'", "no GGUF description", "supported: llama"
    )


@pytest.mark.parametrize(
    ("pre_tokenizer", "named"),
    [
        ({"type": "Whitespace"}, "pre-tokenizer Whitespace"),
        (
            {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": "\\d+"}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ]},
            "pre-tokenizer Split+ByteLevel",
        ),
    ],
)  # fmt: skip
def test_tokenizer_gguf_cannot_represent_is_refused(
    tiny_model_copy, tmp_path: Path, pre_tokenizer: dict, named: str
) -> None:
    src = tiny_model_copy("llama")
    tok = json.loads((src / "tokenizer.json").read_text())
    tok["pre_tokenizer"] = pre_tokenizer
    (src / "tokenizer.json").write_text(json.dumps(tok))
    out = tmp_path / "m.gguf"
    _assert_refused(
        _convert(src, out), out, "tokenizer 'BPE'", named, "cannot be represented in GGUF"
    )


def test_wordpiece_tokenizer_is_refused(tiny_model_copy, tmp_path: Path) -> None:
    src = tiny_model_copy("llama")
    tok = json.loads((src / "tokenizer.json").read_text())
    tok["model"] = {"type": "WordPiece", "unk_token": "[UNK]", "vocab": {"[UNK]": 0, "a": 1}}
    (src / "tokenizer.json").write_text(json.dumps(tok))
    out = tmp_path / "m.gguf"
    _assert_refused(_convert(src, out), out, "tokenizer 'WordPiece'")


def test_missing_tokenizer_is_refused(tiny_model_copy, tmp_path: Path) -> None:
    src = tiny_model_copy("llama")
    (src / "tokenizer.json").unlink()
    out = tmp_path / "m.gguf"
    _assert_refused(_convert(src, out), out, "no tokenizer.json")


def _edit_weights(src: Path, edit) -> None:
    for f in sorted(src.glob("*.safetensors")):
        tensors = load_file(f)
        if edit(tensors):
            save_file(tensors, f, metadata={"format": "pt"})
            return
    raise AssertionError("tensor not found")


def test_tensor_without_gguf_name_is_named(tiny_model_copy, tmp_path: Path) -> None:
    src = tiny_model_copy("llama")

    def add(t):
        if "model.norm.weight" not in t:
            return False
        t["model.extra_gate.weight"] = torch.ones(4)
        return True

    _edit_weights(src, add)
    index = src / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"]["model.extra_gate.weight"] = data["weight_map"]["model.norm.weight"]
        index.write_text(json.dumps(data))
    out = tmp_path / "m.gguf"
    _assert_refused(_convert(src, out), out, "'model.extra_gate.weight'", "no GGUF name")


def test_nan_tensor_is_refused_and_nothing_is_left(tiny_model_copy, tmp_path: Path) -> None:
    src = tiny_model_copy("llama")
    name = "model.layers.1.mlp.up_proj.weight"

    def poison(t):
        if name not in t:
            return False
        t[name][3, 5] = float("nan")
        return True

    _edit_weights(src, poison)
    out = tmp_path / "m.gguf"
    _assert_refused(_convert(src, out, "--type", "Q8_0"), out, name, "NaN or Inf")


def test_gguf_options_are_checked(tiny_model, tmp_path: Path) -> None:
    out = tmp_path / "m.gguf"
    res = _convert(tiny_model("llama"), out, "--dtype", "float16")
    _assert_refused(res, out, "--dtype does not apply")


def test_f16_overflow_is_refused_by_name(tiny_model_copy, tmp_path: Path) -> None:
    src = tiny_model_copy("llama")
    name = "model.layers.0.mlp.down_proj.weight"

    def scale(t):
        if name not in t:
            return False
        t[name][0, 0] = 70000.0  # finite in float32, inf in float16
        return True

    _edit_weights(src, scale)
    out = tmp_path / "m.gguf"
    _assert_refused(_convert(src, out, "--type", "F16"), out, name, "overflow F16", "BF16")
    res = _convert(src, tmp_path / "bf16.gguf", "--type", "BF16")  # BF16 holds it
    assert res.exit_code == 0, res.output
