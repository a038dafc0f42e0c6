"""``described_linears``: a checkpoint's Linear modules read from its tensor names and its
architecture description give the same set as transformers' meta-device skeleton (dense, tied,
fused-projection and MoE families), and data-free quantization through it writes the same
bytes as through the skeleton without building one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from torch import nn

import weightsmith.compress.quantize as quantize_mod
from weightsmith.cli.main import cli
from weightsmith.compress.quantize import quantize_checkpoint
from weightsmith.compress.registry import QuantConfig
from weightsmith.core.calibration import build_skeleton
from weightsmith.core.targets import described_linears
from weightsmith.io import open_checkpoint
from weightsmith.testing import build_tiny_model
from weightsmith.testing.tiny import TINY_ARCHS

_BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, bos_token_id=0, eos_token_id=0,
             pad_token_id=1)  # fmt: skip

# name -> (transformers config class, its settings)
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", dict(_BASE, tie_word_embeddings=False)),
    "llama_tied": ("LlamaConfig", dict(_BASE, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(_BASE, head_dim=16, tie_word_embeddings=True)),
    "phi3": ("Phi3Config", dict(_BASE, tie_word_embeddings=False)),
    "mixtral": ("MixtralConfig", dict(_BASE, num_local_experts=4, num_experts_per_tok=2,
                                      tie_word_embeddings=False)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(_BASE, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                         moe_intermediate_size=32, mlp_only_layers=[0],
                                         tie_word_embeddings=True)),
    # MLA attention, one dense layer, then routed + shared experts
    "deepseek_v3": ("DeepseekV3Config", dict(_BASE, num_hidden_layers=3, moe_intermediate_size=32,
                    n_shared_experts=1, n_routed_experts=8, n_group=2, topk_group=1,
                    num_experts_per_tok=2, first_k_dense_replace=1, q_lora_rank=64,
                    kv_lora_rank=64, qk_rope_head_dim=32, qk_nope_head_dim=8, v_head_dim=16,
                    tie_word_embeddings=False)),
}  # fmt: skip


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    cache: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in cache:
            with pytest.MonkeyPatch.context() as mp:
                mp.setitem(TINY_ARCHS, name, FAMILIES[name])
                root = tmp_path_factory.mktemp(name)
                cache[name] = build_tiny_model(root / "m", name, with_tokenizer=False)
        return cache[name]

    return make


@pytest.mark.parametrize("name", list(FAMILIES))
def test_same_linears_as_the_skeleton(family, name) -> None:
    with open_checkpoint(family(name)) as ckpt:
        listed = described_linears(ckpt)
        skeleton = build_skeleton(ckpt)
    assert listed is not None
    want = [n for n, m in skeleton.named_modules() if isinstance(m, nn.Linear)]
    assert len(listed) == len(set(listed))
    assert set(listed) == set(want)
    assert listed[-1] == "lm_head"  # listed even when tied (not stored)
    if name == "mixtral":  # 2 layers x 4 experts x 3, routers are not Linears
        assert sum(".experts." in n for n in listed) == 24
        assert not any(n.endswith("block_sparse_moe.gate") for n in listed)


def test_undescribed_tensors_and_renamed_heads_build_the_skeleton(family, tmp_path) -> None:
    """A 2-D tensor the description does not name, GPT-2's Conv1D layout, GPT-NeoX's
    ``embed_out`` (transformers 5's ``lm_head``): None."""
    src = family("llama")
    dst = tmp_path / "m"
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    shard = sorted(dst.glob("*.safetensors"))[-1]
    tensors = load_file(shard)
    tensors["model.layers.0.self_attn.extra.weight"] = torch.zeros(4, 4)
    save_file(tensors, shard, metadata={"format": "pt"})
    index = dst / "model.safetensors.index.json"
    if index.exists():
        text = index.read_text().replace(
            '"weight_map": {',
            f'"weight_map": {{"model.layers.0.self_attn.extra.weight": "{shard.name}", ',
        )
        index.write_text(text)
    with open_checkpoint(dst) as ckpt:
        assert described_linears(ckpt) is None
    for arch in ("gpt2", "gpt_neox"):
        with open_checkpoint(build_tiny_model(tmp_path / arch, arch, with_tokenizer=False)) as c:
            assert described_linears(c) is None


def _quantize(src: Path, out: Path, **kw) -> dict[str, bytes]:
    quantize_checkpoint(src, out, QuantConfig("rtn", bits=4, group_size=32, **kw), progress=False)
    return {f.name: f.read_bytes() for f in sorted(out.iterdir()) if f.name != "weightsmith.json"}


@pytest.mark.parametrize("name", ["llama_tied", "mixtral"])
def test_rtn_without_skeleton_writes_the_same_bytes(family, tmp_path, monkeypatch, name) -> None:
    src = family(name)
    with monkeypatch.context() as mp:  # the skeleton path, as before described_linears
        mp.setattr(quantize_mod, "described_linears", lambda ckpt: None)
        want = _quantize(src, tmp_path / "skeleton")

    def no_skeleton(ckpt):
        raise AssertionError("data-free RTN built a transformers skeleton")

    monkeypatch.setattr(quantize_mod, "build_skeleton", no_skeleton)
    got = _quantize(src, tmp_path / "described")
    assert got.keys() == want.keys() and any(k.endswith(".safetensors") for k in got)
    assert got == want
    # --ignore makes the ignored list's order matter: the skeleton decides it
    with pytest.raises(AssertionError, match="built a transformers skeleton"):
        _quantize(src, tmp_path / "ignore", ignore=["lm_head"])


_CHILD = """
import sys
from weightsmith.cli.main import cli
cli(sys.argv[1:], standalone_mode=False)
print(sorted(m for m in ("transformers", "accelerate", "datasets") if m in sys.modules))
"""


def test_data_free_rtn_imports_no_transformers(family, tmp_path) -> None:
    """The whole command, ``--no-progress`` included, in a fresh process."""
    args = ["compress", "quantize", str(family("llama_tied")), "--method", "rtn", "--bits", "4",
            "--group-size", "32", "-o", str(tmp_path / "q"), "--no-progress"]  # fmt: skip
    run = subprocess.run([sys.executable, "-c", _CHILD, *args], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "q" / "config.json").exists()


def test_no_progress_restores_the_libraries_bars(family, tmp_path) -> None:
    """``--no-progress`` on a run that imports transformers (the skeleton, for --ignore)
    silences its and the hub's bars for that command only."""
    from huggingface_hub.utils import are_progress_bars_disabled

    seen = {}

    def skeleton(ckpt):
        from transformers.utils import logging

        seen["during"] = (logging.is_progress_bar_enabled(), are_progress_bars_disabled())
        return build_skeleton(ckpt)

    args = ["compress", "quantize", str(family("llama")), "--bits", "4", "--group-size", "32",
            "--ignore", "down_proj", "-o", str(tmp_path / "q"), "--no-progress"]  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(quantize_mod, "build_skeleton", skeleton)
        res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    from transformers.utils import logging

    assert seen["during"] == (False, True)
    assert logging.is_progress_bar_enabled() and not are_progress_bars_disabled()
