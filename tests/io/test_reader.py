"""Reading checkpoints: equality with transformers, layer grouping, and refusing bad input."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from weightsmith.errors import CheckpointError
from weightsmith.io import detect_architecture, open_checkpoint
from weightsmith.io.reader import drop_mapped_pages

ARCHS = ["llama", "qwen2", "gpt_neox", "gpt2"]
# tensors per decoder layer in the tiny models (weights + biases + norms)
LAYER_TENSORS = {"llama": 9, "qwen2": 12, "gpt_neox": 12, "gpt2": 12}
FAMILY = {"llama": "llama", "qwen2": "llama", "gpt_neox": "gpt_neox", "gpt2": "gpt2"}
# transformers 5 renames some tensors in memory but saves the original names on disk
IN_MEMORY_NAME = {"embed_out.weight": "lm_head.weight"}


@pytest.mark.parametrize("arch", ARCHS)
def test_tensors_match_transformers(tiny_model, arch: str) -> None:
    path = tiny_model(arch)
    model = AutoModelForCausalLM.from_pretrained(path)
    state = model.state_dict()
    with open_checkpoint(path) as ckpt:
        assert len(ckpt.shards) > 1  # the fixture is sharded
        assert ckpt.arch.name == FAMILY[arch]
        for name, info in ckpt.tensors.items():
            t = ckpt.get_tensor(name)
            assert t.shape == info.shape and t.dtype == info.torch_dtype
            assert torch.equal(t, state[IN_MEMORY_NAME.get(name, name)]), name
        assert ckpt.num_params == sum(i.numel for i in ckpt.tensors.values())
        assert ckpt.total_bytes == 4 * ckpt.num_params


@pytest.mark.parametrize("arch", ARCHS)
def test_layer_grouping(tiny_model, arch: str) -> None:
    with open_checkpoint(tiny_model(arch)) as ckpt:
        layers = ckpt.layers()
        assert list(layers) == [0, 1] and ckpt.num_layers == 2
        assert all(len(names) == LAYER_TENSORS[arch] for names in layers.values())
        groups = ckpt.groups("layer")
        assert groups[0].key == "embed" and groups[-1].key == "final"
        assert [g.layer for g in groups[1:-1]] == [0, 1]
        flat = [n for g in groups for n in g.names]
        assert sorted(flat) == sorted(ckpt.tensors)  # every tensor exactly once


def test_tied_embeddings(tiny_model) -> None:
    with open_checkpoint(tiny_model("qwen2")) as ckpt:
        assert ckpt.tied_embeddings and "lm_head.weight" not in ckpt.tensors
    with open_checkpoint(tiny_model("llama")) as ckpt:
        assert not ckpt.tied_embeddings and "lm_head.weight" in ckpt.tensors


def test_single_file_and_direct_path(tmp_path: Path) -> None:
    t = {"model.layers.0.mlp.up_proj.weight": torch.randn(4, 2), "model.norm.weight": torch.ones(2)}
    save_file(t, tmp_path / "model.safetensors", metadata={"format": "pt"})
    for path in (tmp_path, tmp_path / "model.safetensors"):
        with open_checkpoint(path) as ckpt:
            assert set(ckpt.tensors) == set(t)
            assert ckpt.config is None and ckpt.arch.name == "llama"  # detected from names
            assert torch.equal(
                ckpt.get_slice("model.layers.0.mlp.up_proj.weight")[1:3],
                t["model.layers.0.mlp.up_proj.weight"][1:3],
            )


def test_unknown_architecture_falls_back_to_name_patterns(tmp_path: Path) -> None:
    names = ["backbone.blocks.0.w", "backbone.blocks.1.w", "head.w"]
    arch = detect_architecture({"model_type": "mystery"}, names)
    assert not arch.known
    assert [arch.layer_of(n) for n in names] == [0, 1, None]


def _index(path: Path) -> dict:
    return json.loads((path / "model.safetensors.index.json").read_text())


def _set_index(path: Path, index: dict | str) -> None:
    text = index if isinstance(index, str) else json.dumps(index)
    (path / "model.safetensors.index.json").write_text(text)


def test_missing_shard(tiny_model_copy) -> None:
    path = tiny_model_copy("llama")
    victim = sorted(path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"shard {victim.name} is missing"):
        open_checkpoint(path)


@pytest.mark.parametrize("evil", ["/etc/passwd", "../outside.safetensors", "sub/../../x"])
def test_index_paths_outside_checkpoint_refused(tiny_model_copy, evil: str) -> None:
    path = tiny_model_copy("llama")
    index = _index(path)
    index["weight_map"]["model.norm.weight"] = evil
    _set_index(path, index)
    with pytest.raises(CheckpointError, match="refuses"):
        open_checkpoint(path)


def test_tensor_listed_twice_in_index(tiny_model_copy) -> None:
    path = tiny_model_copy("llama")
    text = (path / "model.safetensors.index.json").read_text()
    first = '"model.norm.weight": '
    dup = text.replace(
        first, '"model.norm.weight": "model-00001-of-00005.safetensors",\n' + first, 1
    )
    _set_index(path, dup)
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' is listed twice"):
        open_checkpoint(path)


def test_tensor_stored_in_two_shards(tiny_model_copy) -> None:
    path = tiny_model_copy("llama")
    shards = sorted(path.glob("model-*.safetensors"))
    extra = {"model.norm.weight": torch.ones(64)}
    # rewrite the first shard with one more tensor that also lives elsewhere
    with open_checkpoint(path) as ckpt:
        names = [n for n, i in ckpt.tensors.items() if i.shard == shards[0].name]
        state = {n: ckpt.get_tensor(n) for n in names}
    save_file({**state, **extra}, shards[0], metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="stored twice"):
        open_checkpoint(path)


def test_index_points_to_wrong_shard(tiny_model_copy) -> None:
    path = tiny_model_copy("llama")
    index = _index(path)
    index["weight_map"]["model.norm.weight"] = "model-00001-of-00005.safetensors"
    _set_index(path, index)
    with pytest.raises(CheckpointError, match="does not hold it"):
        open_checkpoint(path)


def test_corrupt_shard_names_the_file(tiny_model_copy) -> None:
    path = tiny_model_copy("llama")
    shard = sorted(path.glob("model-*.safetensors"))[2]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])  # truncated download
    with pytest.raises(CheckpointError, match=shard.name):
        open_checkpoint(path)


def test_no_weights_and_ambiguous_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no weights found"):
        open_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="no such file"):
        open_checkpoint(tmp_path / "missing")
    for name in ("a.safetensors", "b.safetensors"):
        save_file({"x": torch.zeros(1)}, tmp_path / name)
    with pytest.raises(CheckpointError, match=r"2 \.safetensors files but no"):
        open_checkpoint(tmp_path)


def test_pickle_refused_by_default_and_loaded_safely_when_allowed(tmp_path: Path) -> None:
    state = {"model.norm.weight": torch.arange(4.0)}
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="allow_pickle=True"):
        open_checkpoint(tmp_path)
    with open_checkpoint(tmp_path, allow_pickle=True) as ckpt:
        assert ckpt.format == "pickle"
        assert torch.equal(ckpt.get_tensor("model.norm.weight"), state["model.norm.weight"])


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_malicious_pickle_is_not_executed(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with open(tmp_path / "pytorch_model.bin", "wb") as f:
        pickle.dump({"w": _Exploit()}, f)
    with pytest.raises(CheckpointError, match="weights_only"):
        open_checkpoint(tmp_path, allow_pickle=True)
    assert not (tmp_path / "pwned").exists()


def test_fingerprint_stable_and_sensitive(tiny_model_copy, tmp_path: Path) -> None:
    path = tiny_model_copy("llama")
    fp = open_checkpoint(path).fingerprint()
    assert open_checkpoint(path).fingerprint() == fp
    other = tmp_path / "moved"
    shutil.copytree(path, other)
    assert open_checkpoint(other).fingerprint() == fp  # identity is content, not location
    shard = sorted(other.glob("model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert open_checkpoint(other).fingerprint() != fp


def test_read_rows_reads_a_block(tiny_model) -> None:
    with open_checkpoint(tiny_model("llama")) as ckpt:
        name = "model.embed_tokens.weight"
        full = ckpt.get_tensor(name)
        assert torch.equal(ckpt.read_rows(name, 5, 9), full[5:9])
        assert torch.equal(ckpt.read_rows(name, 300, 10_000), full[300:])
        assert ckpt.read_rows(name, 9, 9).shape == (0, full.shape[1])


def test_mapped_flat_gives_the_stored_elements_and_unmaps_with_the_last_view(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "w": torch.randn(37, 53, generator=g).to(torch.bfloat16),
        "v": torch.randn(1001, generator=g),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    shard = str(tmp_path / "model.safetensors")
    with open_checkpoint(tmp_path) as ck:
        flat = tensors["w"].reshape(-1)

        def mapped() -> int:
            return sum(shard in line for line in Path("/proc/self/maps").read_text().splitlines())

        before = mapped()
        with ck.mapped_flat("v") as v:
            assert torch.equal(v, tensors["v"]) and v.dtype == torch.float32
            assert mapped() > before
        del v
        assert mapped() == before  # unmapped with the last view: resident pages do not pile up
        with ck.mapped_flat("w") as w:
            kept = w[:10]  # a view kept past the block keeps the mapping alive
        del w
        assert mapped() > before and torch.equal(kept, flat[:10])
        del kept
        assert mapped() == before


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_drop_mapped_pages_leaves_values_and_lowers_resident_memory(tmp_path):
    """Dropping read pages of a mapped tensor takes them out of the resident set (measured in
    /proc/self/status) while the values read afterwards are unchanged; any tensor that is not
    a mapping is left alone (DONTNEED on anonymous memory would zero it)."""
    g = torch.Generator().manual_seed(1)
    big = torch.randn(16 << 20, generator=g)  # 64 MiB
    save_file({"big": big}, tmp_path / "model.safetensors")
    with open_checkpoint(tmp_path) as ck, ck.mapped_flat("big") as m:
        assert float(m.sum()) == float(big.sum())  # every page touched
        before = _rss_kib()
        drop_mapped_pages(m, 0, m.numel())
        assert before - _rss_kib() > 48 << 10  # most of the 64 MiB left the resident set
        assert torch.equal(m, big)  # read back from the page cache
        drop_mapped_pages(m, 1000, 5000)  # partial pages at both ends are kept: no error
        assert torch.equal(m[990:5010], big[990:5010])
    anon = big.clone()
    drop_mapped_pages(anon, 0, anon.numel())
    assert torch.equal(anon, big)
