"""``convert``: bit-exact copies, casts, resharding, tying, and inputs left untouched."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from weightsmith.convert import convert
from weightsmith.errors import CheckpointError
from weightsmith.io import open_checkpoint


def _digest(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def _logits(path: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        return model(torch.arange(1, 17).unsqueeze(0)).logits.float()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt_neox", "gpt2"])
def test_convert_is_bit_exact_and_loads(tiny_model, tmp_path: Path, arch: str) -> None:
    src = tiny_model(arch)
    before = _digest(src)
    result = convert(src, tmp_path / "out", max_shard_size=3000, progress=False)
    assert _digest(src) == before  # input untouched
    with open_checkpoint(src) as a, open_checkpoint(tmp_path / "out") as b:
        assert set(a.tensors) == set(b.tensors)
        for name in a.tensors:
            assert torch.equal(a.get_tensor(name), b.get_tensor(name)), name
        assert len(b.shards) == len(result.shards) > len(a.shards)  # resharded smaller
    assert torch.equal(_logits(src), _logits(tmp_path / "out"))


def test_cast_to_bfloat16_updates_config(tiny_model, tmp_path: Path) -> None:
    src = tiny_model("llama")
    convert(src, tmp_path / "out", dtype="bfloat16", progress=False)
    config = json.loads((tmp_path / "out/config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    with open_checkpoint(src) as a, open_checkpoint(tmp_path / "out") as b:
        assert b.total_bytes * 2 == a.total_bytes
        for name in a.tensors:
            assert torch.equal(b.get_tensor(name), a.get_tensor(name).to(torch.bfloat16))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.dtype == torch.bfloat16


def test_tied_embeddings_stay_tied(tiny_model, tmp_path: Path) -> None:
    convert(tiny_model("qwen2"), tmp_path / "out", dtype="float16", progress=False)
    with open_checkpoint(tmp_path / "out") as ckpt:
        assert "lm_head.weight" not in ckpt.tensors and ckpt.tied_embeddings
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_integer_tensors_are_not_cast_and_fp16_overflow_refused(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    save_file(
        {"q.weight_packed": torch.arange(6, dtype=torch.int32), "big": torch.tensor([1e6])},
        src / "model.safetensors",
    )
    with pytest.raises(CheckpointError, match=r"'big'.*overflow float16"):
        convert(src, tmp_path / "out", dtype="float16", progress=False)
    assert not (tmp_path / "out").exists()
    convert(src, tmp_path / "out", dtype="bfloat16", progress=False)
    with open_checkpoint(tmp_path / "out") as ckpt:
        assert ckpt.info("q.weight_packed").dtype == "I32"
        assert ckpt.info("big").dtype == "BF16"


def test_real_model_round_trip(stories260k: Path, tmp_path: Path) -> None:
    convert(stories260k, tmp_path / "out", max_shard_size=200_000, progress=False)
    assert torch.equal(_logits(stories260k), _logits(tmp_path / "out"))
