"""Hub ids (``org/name[@revision]``) resolved from a fake Hugging Face cache, offline."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
from pathlib import Path

import pytest

from weightsmith.errors import CheckpointError
from weightsmith.io.hub import (
    NEEDED_FILES,
    download_command,
    hub_models_in,
    hub_origin,
    parse_hub_id,
    resolve_model_reference,
)

SHA_A = "a" * 40
SHA_B = "b" * 40


def add_to_cache(cache: Path, repo: str, model: Path, sha: str, ref: str | None = "main") -> Path:
    """Lay ``model``'s files out as the hub does: ``models--org--name/blobs/<hash>``,
    ``snapshots/<sha>/<file>`` relative symlinks to the blobs, ``refs/<ref>`` holding ``sha``."""
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    blobs, snap = repo_dir / "blobs", repo_dir / "snapshots" / sha
    blobs.mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True)
    for f in sorted(model.iterdir()):
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        if not (blobs / digest).exists():
            shutil.copyfile(f, blobs / digest)
        (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / digest)
    if ref is not None:
        (repo_dir / "refs").mkdir(exist_ok=True)
        (repo_dir / "refs" / ref).write_text(sha)  # the hub writes no newline
    return snap


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache, selected through HF_HUB_CACHE, online mode left on."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    for var in ("HF_HUB_OFFLINE", "WEIGHTSMITH_DOWNLOAD"):
        monkeypatch.delenv(var, raising=False)
    return cache


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Every attempt to open a network connection is recorded and fails."""
    attempts: list[tuple] = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access attempted in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


def test_parse_hub_id() -> None:
    assert parse_hub_id("org/name") == ("org/name", None)
    assert parse_hub_id("Org-1/my.model_v2@" + SHA_A) == ("Org-1/my.model_v2", SHA_A)
    assert parse_hub_id("org/name@refs/pr/3") == ("org/name", "refs/pr/3")
    for not_an_id in ["name", "./org/name", "/abs/name", "a/b/c", "org/na--me", "org/", "o/n@"]:
        assert parse_hub_id(not_an_id) is None, not_an_id


def test_download_command_names_only_needed_files() -> None:
    cmd = download_command("org/name", SHA_A)
    assert cmd.startswith(f"hf download org/name --revision {SHA_A} --include ")
    assert '"model*.safetensors"' in cmd and "config.json" in cmd and "tokenizer.json" in cmd
    assert len(cmd.split("--include ")[1].split()) == len(NEEDED_FILES)


def test_cached_ids_resolve_to_their_snapshot(tiny_model, hf_cache, no_network) -> None:
    snap_a = add_to_cache(hf_cache, "org/name", tiny_model("llama", 0), SHA_A)
    snap_b = add_to_cache(hf_cache, "org/name", tiny_model("llama", 1), SHA_B, ref="v2")
    assert resolve_model_reference("org/name") == str(snap_a)  # refs/main
    assert resolve_model_reference(f"org/name@{SHA_A}") == str(snap_a)
    assert resolve_model_reference("org/name@v2") == str(snap_b)  # a tag, via refs/v2
    assert resolve_model_reference(f"org/name@{SHA_B}") == str(snap_b)
    assert hub_origin(snap_b / "config.json") == {"repo_id": "org/name", "revision": SHA_B}
    assert no_network == []


def test_local_path_wins(tiny_model, hf_cache, tmp_path, monkeypatch, no_network) -> None:
    add_to_cache(hf_cache, "org/name", tiny_model("llama", 0), SHA_A)
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_model("llama", 1), tmp_path / "org" / "name")
    assert resolve_model_reference("org/name") == "org/name"


def test_uncached_id_one_line_error_without_network(hf_cache, no_network) -> None:
    with pytest.raises(CheckpointError) as err:
        resolve_model_reference("org/missing")
    msg = str(err.value)
    assert "\n" not in msg
    assert "org/missing is not in the Hugging Face cache " + str(hf_cache) in msg
    assert f"`{download_command('org/missing', None)}`" in msg and "--download" in msg
    assert no_network == []


def test_uncached_revision_is_an_error(tiny_model, hf_cache, no_network) -> None:
    add_to_cache(hf_cache, "org/name", tiny_model("llama", 0), SHA_A)
    for rev in [SHA_B, "v9"]:
        with pytest.raises(CheckpointError, match=f"revision {rev} of org/name is not in the"):
            resolve_model_reference(f"org/name@{rev}")
    assert no_network == []


def test_snapshot_without_weights_is_not_cached(tiny_model, hf_cache, tmp_path) -> None:
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(tiny_model("llama", 0) / "config.json", partial)  # config only
    add_to_cache(hf_cache, "org/partial", partial, SHA_A)
    with pytest.raises(CheckpointError, match=r"no config\.json or safetensors weights"):
        resolve_model_reference("org/partial")


def test_hf_home_is_read_when_hub_cache_is_unset(tiny_model, tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    snap = add_to_cache(tmp_path / "home" / "hub", "org/name", tiny_model("llama", 0), SHA_A)
    assert resolve_model_reference("org/name") == str(snap)


def test_hub_models_in_a_provenance_record(tmp_path) -> None:
    snap = tmp_path / "models--org--name" / "snapshots" / SHA_A
    record = {"inputs": [{"path": str(snap)}, {"path": "/local/model"}],
              "recipe": {"base_model": str(snap)}}  # fmt: skip
    assert hub_models_in(record) == [{"repo_id": "org/name", "revision": SHA_A, "path": str(snap)}]
    assert os.fspath(snap).endswith(SHA_A)
