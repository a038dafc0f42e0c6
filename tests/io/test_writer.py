"""Writing checkpoints: sharding as transformers does, atomicity, and failures that leave nothing."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import weightsmith.io.writer as writer_mod
from weightsmith.errors import OutputError
from weightsmith.io import CheckpointWriter, TensorSpec, open_checkpoint


def _tensors(n: int = 6, rows: int = 10) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {f"model.layers.{i}.w": torch.randn(rows, 25, generator=g) for i in range(n)}


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if "weightsmith-" in p.name]


@pytest.mark.parametrize("planned", [True, False])
def test_sharding_index_and_names(tmp_path: Path, planned: bool) -> None:
    tensors = _tensors()  # 6 tensors x 1000 bytes
    out = tmp_path / "out"
    with CheckpointWriter(out, max_shard_size=2500) as w:
        if planned:
            w.plan([TensorSpec.of(k, v) for k, v in tensors.items()])
        for k, v in tensors.items():
            w.write(k, v)
        summary = w.commit({"operation": "test"})
    assert summary.shards == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 6000
    loaded = {}
    for shard in summary.shards:
        part = load_file(out / shard)
        assert len(part) == 2  # 2 x 1000 bytes fit under 2500, a third does not
        assert all(index["weight_map"][k] == shard for k in part)
        loaded.update(part)
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    prov = json.loads((out / "weightsmith.json").read_text())
    assert prov["tool"] == "weightsmith" and prov["operation"] == "test"
    assert prov["output"]["tensors"] == 6
    assert _leftovers(tmp_path) == []


def test_single_shard_has_no_index_and_oversized_tensor_gets_own_shard(tmp_path: Path) -> None:
    with CheckpointWriter(tmp_path / "one") as w:
        w.write("a", torch.zeros(3))
        w.commit()
    assert not (tmp_path / "one/model.safetensors.index.json").exists()
    assert (tmp_path / "one/model.safetensors").exists()
    with CheckpointWriter(tmp_path / "big", max_shard_size=100) as w:
        w.plan([TensorSpec("a", torch.float32, (50,)), TensorSpec("b", torch.float32, (2,))])
        w.write("a", torch.zeros(50))
        w.write("b", torch.zeros(2))
        s = w.commit()
    assert len(s.shards) == 2


def test_exception_leaves_nothing_behind(tmp_path: Path) -> None:
    out = tmp_path / "deep" / "nested" / "out"
    with pytest.raises(RuntimeError), CheckpointWriter(out) as w:
        w.write("a", torch.zeros(3))
        raise RuntimeError("boom")
    assert not (tmp_path / "deep").exists()  # parents we created are gone too


def test_keyboard_interrupt_leaves_nothing_behind(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt), CheckpointWriter(tmp_path / "out") as w:
        w.write("a", torch.zeros(3))
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_disk_full_is_one_line_error_and_cleans_up(tmp_path: Path, monkeypatch) -> None:
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer_mod, "pwrite_all", full)
    with (
        pytest.raises(OutputError, match="no space left on device") as err,
        CheckpointWriter(tmp_path / "out") as w,
    ):
        w.plan([TensorSpec("a", torch.float32, (3,))])
        w.write("a", torch.zeros(3))
    assert "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_free_space_checked_before_writing(tmp_path: Path, monkeypatch) -> None:
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(writer_mod.shutil, "disk_usage", lambda p: usage._replace(free=10))
    with (
        pytest.raises(OutputError, match="not enough free space"),
        CheckpointWriter(tmp_path / "out") as w,
    ):
        w.plan([TensorSpec("a", torch.float32, (1000,))])
    assert list(tmp_path.iterdir()) == []


def test_existing_output_refused_then_replaced_with_force(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("precious")
    with pytest.raises(OutputError, match="already exists"):
        CheckpointWriter(out)
    assert (out / "old.txt").read_text() == "precious"
    with CheckpointWriter(out, force=True) as w:
        w.write("a", torch.zeros(1))
        w.commit()
    assert not (out / "old.txt").exists() and (out / "model.safetensors").exists()
    assert _leftovers(tmp_path) == []


def test_force_keeps_old_output_when_run_fails(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("precious")
    with pytest.raises(RuntimeError), CheckpointWriter(out, force=True) as w:
        w.write("a", torch.zeros(1))
        raise RuntimeError("fail")
    assert (out / "old.txt").read_text() == "precious"


def test_output_overlapping_input_refused(tiny_model) -> None:
    src = tiny_model("llama")
    for bad, msg in [
        (src, "is the input directory"),
        (src / "sub", "inside the input"),
        (src.parent, "contains the input"),
    ]:
        with pytest.raises(OutputError, match=msg):
            CheckpointWriter(bad, inputs=[src], force=True)


def test_writes_checked_against_plan(tmp_path: Path) -> None:
    with CheckpointWriter(tmp_path / "out") as w:
        w.plan([TensorSpec("a", torch.float32, (3,))])
        with pytest.raises(OutputError, match="planned as"):
            w.write("a", torch.zeros(4))
        with pytest.raises(OutputError, match="not planned"):
            w.write("b", torch.zeros(3))
        with pytest.raises(OutputError, match="never written"):
            w.commit()


def test_support_files_copied_and_config_patched(tiny_model, tmp_path: Path) -> None:
    src = tiny_model("llama")
    with open_checkpoint(src) as ckpt, CheckpointWriter(tmp_path / "out") as w:
        for name in ckpt.tensors:  # config.json must describe the tensors written
            w.write(name, ckpt.get_tensor(name))
        copied = w.copy_support_files(src, config_patch={"rms_norm_eps": 0.125})
        w.commit()
    assert {"config.json", "tokenizer.json", "generation_config.json"} <= set(copied)
    config = json.loads((tmp_path / "out/config.json").read_text())
    assert config["rms_norm_eps"] == 0.125 and config["model_type"] == "llama"
    assert (tmp_path / "out/tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()


def test_commit_refuses_a_config_that_disagrees_with_the_tensors(tiny_model, tmp_path) -> None:
    """A transform that changed shapes but not config.json (passthrough of layers of two
    widths, a prune that forgot the config) fails at commit instead of writing a model that
    does not load."""
    src = tiny_model("llama")
    with open_checkpoint(src) as ckpt, CheckpointWriter(tmp_path / "out") as w:
        for name in ckpt.tensors:
            t = ckpt.get_tensor(name)
            w.write(name, t[:96] if name == "model.layers.1.mlp.up_proj.weight" else t)
        w.copy_support_files(src)
        with pytest.raises(
            OutputError,
            match=r"would not load: .*out/config.json: "
            r"intermediate_size is 128 but tensor 'model.layers.1.mlp.up_proj",
        ):
            w.commit()
    assert list(tmp_path.iterdir()) == []


def test_raw_bytes_path_is_bit_exact(tiny_model, tmp_path: Path) -> None:
    with open_checkpoint(tiny_model("llama")) as ckpt, CheckpointWriter(tmp_path / "out") as w:
        name = "model.embed_tokens.weight"
        info = ckpt.info(name)
        w.write_raw(TensorSpec(name, info.torch_dtype, info.shape), ckpt.raw_chunks(name, 1000))
        w.commit()
        assert torch.equal(
            load_file(tmp_path / "out/model.safetensors")[name], ckpt.get_tensor(name)
        )


def test_weights_name_for_adapter_folders(tmp_path: Path) -> None:
    with CheckpointWriter(tmp_path / "one", weights_name="adapter_model") as w:
        w.write("a", torch.zeros(3))
        s = w.commit()
    assert s.shards == ["adapter_model.safetensors"]
    with CheckpointWriter(tmp_path / "two", weights_name="adapter_model", max_shard_size=12) as w:
        w.plan([TensorSpec("a", torch.float32, (3,)), TensorSpec("b", torch.float32, (3,))])
        w.write("a", torch.zeros(3))
        w.write("b", torch.ones(3))
        w.commit()
    index = json.loads((tmp_path / "two/adapter_model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {
        "adapter_model-00001-of-00002.safetensors",
        "adapter_model-00002-of-00002.safetensors",
    }
