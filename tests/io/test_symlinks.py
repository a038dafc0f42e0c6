"""Symlinks are followed only inside the checkpoint, or into its Hugging Face cache blobs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from weightsmith.cli.main import cli
from weightsmith.errors import CheckpointError
from weightsmith.io import open_checkpoint


def _convert(src: Path, out: Path):
    return CliRunner().invoke(cli, ["convert", str(src), "-o", str(out), "--no-progress"])


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    f = tmp_path / "secret.txt"
    f.write_text("not for you\n")
    return f


def test_shard_symlinked_outside_is_refused(tiny_model_copy, tmp_path: Path) -> None:
    path = tiny_model_copy("llama")
    shard = sorted(path.glob("model-*.safetensors"))[0]
    moved = tmp_path / "elsewhere.safetensors"
    shutil.move(shard, moved)
    shard.symlink_to(moved)
    with pytest.raises(CheckpointError, match=f"{shard.name} is a symlink to {moved}, outside"):
        open_checkpoint(path)
    result = _convert(path, tmp_path / "out")
    assert result.exit_code == 1 and "outside the checkpoint directory" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["tokenizer_config.json", "config.json", "generation_config.json"])
def test_support_file_symlinked_outside_is_refused(tiny_model_copy, tmp_path, secret, name) -> None:
    path = tiny_model_copy("llama")
    if name == "config.json":
        shutil.copy(path / name, secret)
    (path / name).unlink(missing_ok=True)
    (path / name).symlink_to(secret)
    result = _convert(path, tmp_path / "out")
    assert result.exit_code == 1, result.output
    assert f"{name} is a symlink to {secret}" in result.output
    assert not (tmp_path / "out").exists()


def test_index_symlinked_outside_is_refused(tiny_model_copy, tmp_path: Path) -> None:
    path = tiny_model_copy("llama")
    index = path / "model.safetensors.index.json"
    moved = tmp_path / "index.json"
    shutil.move(index, moved)
    index.symlink_to(moved)
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json is a symlink"):
        open_checkpoint(path)


def test_symlinked_folder_on_the_way_is_refused(tiny_model_copy, tmp_path: Path) -> None:
    path = tiny_model_copy("llama")
    outside = tmp_path / "outside"
    outside.mkdir()
    shard = sorted(path.glob("model-*.safetensors"))[0]
    shutil.move(shard, outside / shard.name)
    (path / "sub").symlink_to(outside)
    index = path / "model.safetensors.index.json"
    index.write_text(index.read_text().replace(f'"{shard.name}"', f'"sub/{shard.name}"'))
    with pytest.raises(CheckpointError, match=f"sub/{shard.name} is a symlink"):
        open_checkpoint(path)


def test_symlinks_inside_the_checkpoint_are_followed(tiny_model_copy, tmp_path: Path) -> None:
    path = tiny_model_copy("llama")
    (path / "real").mkdir()
    for f in list(path.iterdir()):
        if f.is_file():
            shutil.move(f, path / "real" / f.name)
            f.symlink_to(Path("real") / f.name)
    result = _convert(path, tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "out" / "tokenizer_config.json").is_symlink()


def test_hugging_face_cache_layout_is_followed(tiny_model, tmp_path: Path, secret) -> None:
    """snapshots/<rev>/file -> ../../blobs/<sha>: the cache's own layout is accepted; a link out
    of the repository's blobs/ is not."""
    repo = tmp_path / "hub" / "models--org--tiny"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for k, f in enumerate(sorted(tiny_model("llama").iterdir())):
        blob = blobs / f"sha{k}"
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    result = _convert(snap, tmp_path / "out")
    assert result.exit_code == 0, result.output
    (snap / "tokenizer_config.json").unlink()
    (snap / "tokenizer_config.json").symlink_to(secret)
    result = _convert(snap, tmp_path / "out2")
    assert result.exit_code == 1 and "tokenizer_config.json is a symlink" in result.output
    other_repo_blob = tmp_path / "hub" / "models--evil--x" / "blobs" / "s"
    other_repo_blob.parent.mkdir(parents=True)
    shutil.copy(secret, other_repo_blob)
    (snap / "tokenizer_config.json").unlink()
    (snap / "tokenizer_config.json").symlink_to(other_repo_blob)
    assert _convert(snap, tmp_path / "out3").exit_code == 1
