"""Model references: a local path, or ``org/name[@revision]`` from the Hugging Face cache.

A local path always wins when it exists. Otherwise a reference shaped like a hub id is looked
up in the Hugging Face cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``, read when the reference
is resolved) with ``huggingface_hub``'s own ``snapshot_download(local_files_only=True)``, so
nothing touches the network. Only when the user asks (``--download`` or
``WEIGHTSMITH_DOWNLOAD=1``) is the snapshot downloaded, restricted to the files weightsmith
reads (:data:`NEEDED_FILES`), with the hub's progress bars. A model that is not cached is a
one-line error naming the exact download command.

The resolved path is the cache snapshot folder (``models--org--name/snapshots/<commit>``), so
:func:`hub_origin` can tell, from any input path recorded in provenance, which repository and
commit it came from.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from weightsmith.errors import CheckpointError
from weightsmith.io.support_files import SUPPORT_FILES

DOWNLOAD_ENV = "WEIGHTSMITH_DOWNLOAD"

# What weightsmith reads from a model repository: weights, index, config, generation config,
# tokenizer files and chat template (never pickles, ONNX exports or consolidated duplicates).
NEEDED_FILES = ("model*.safetensors", "model.safetensors.index.json", *SUPPORT_FILES)
# What it reads from a PEFT adapter repository (a recipe's ``model+adapter`` reference).
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")

_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?"
_HUB_ID = re.compile(rf"^(?P<repo>{_PART}/{_PART})(?:@(?P<rev>[^\s@]+))?$")


def parse_hub_id(ref: str) -> tuple[str, str | None] | None:
    """``"org/name@rev"`` -> ``("org/name", "rev")``; None when ``ref`` is not shaped like one."""
    m = _HUB_ID.match(ref)
    if m is None or "--" in m.group("repo") or ".." in m.group("repo"):
        return None
    return m.group("repo"), m.group("rev")


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, from the environment as it is now (``HF_HUB_CACHE``,
    ``HF_HOME/hub``, ``XDG_CACHE_HOME/huggingface/hub``, ``~/.cache/huggingface/hub``)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(xdg).expanduser() / "huggingface" / "hub"


def download_requested() -> bool:
    """Whether the user allowed downloads (``WEIGHTSMITH_DOWNLOAD=1``, set by ``--download``)."""
    return os.environ.get(DOWNLOAD_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def download_command(repo: str, revision: str | None, files: tuple[str, ...] = NEEDED_FILES) -> str:
    """The shell command that puts ``files`` of ``repo`` (at ``revision``) in the cache."""
    rev = f" --revision {revision}" if revision else ""
    include = " ".join(f'"{p}"' if "*" in p else p for p in files)
    return f"hf download {repo}{rev} --include {include}"


def resolve_model_reference(
    ref: str, *, download: bool | None = None, adapter: bool = False
) -> str:
    """A local path (returned unchanged when it exists), or the cache snapshot folder of the
    hub id ``org/name[@revision]``. Anything else is returned unchanged, for the caller's own
    "no such file" error. ``download`` (default: :func:`download_requested`) fetches a model
    missing from the cache; without it nothing touches the network. ``adapter``: the
    reference names a PEFT adapter (:data:`ADAPTER_FILES`), not a model."""
    if Path(ref).expanduser().exists():
        return ref
    parsed = parse_hub_id(ref)
    if parsed is None:
        return ref
    repo, revision = parsed
    files = ADAPTER_FILES if adapter else NEEDED_FILES
    if download is None:
        download = download_requested()
    if download:
        return _download(repo, revision, files)
    return _from_cache(ref, repo, revision, files)


def _complete(folder: str, files: tuple[str, ...]) -> bool:
    """Whether a snapshot holds what weightsmith reads: config and safetensors weights (a
    model), or ``adapter_config.json`` and its weights (an adapter)."""
    names = {p.name for p in Path(folder).iterdir()}
    if files == ADAPTER_FILES:
        return set(ADAPTER_FILES) <= names
    return "config.json" in names and any(f.endswith(".safetensors") for f in names)


def _from_cache(ref: str, repo: str, revision: str | None, files: tuple[str, ...]) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    cache = hub_cache_dir()
    missing = None
    try:
        folder = snapshot_download(
            repo, revision=revision, cache_dir=cache, local_files_only=True,
            allow_patterns=list(files),
        )  # fmt: skip
    except HFValidationError as e:
        raise CheckpointError(f"{ref}: not a local path nor a valid hub id ({e})") from None
    except (LocalEntryNotFoundError, OSError) as e:  # not cached, or an incomplete snapshot
        folder = None
        missing = "incomplete snapshot" if "Incomplete" in type(e).__name__ else "no snapshot"
    if folder is not None and not _complete(folder, files):
        want = (
            ", ".join(ADAPTER_FILES)
            if files == ADAPTER_FILES
            else "config.json or safetensors weights"
        )
        folder, missing = None, f"no {want} in the snapshot"
    if folder is None:
        what = f"revision {revision} of {repo}" if revision else repo
        raise CheckpointError(
            f"{ref}: no such local path, and {what} is not in the Hugging Face cache {cache} "
            f"({missing}); download it with `{download_command(repo, revision, files)}` "
            "or rerun with --download (WEIGHTSMITH_DOWNLOAD=1)"
        )
    return str(folder)


def _download(repo: str, revision: str | None, files: tuple[str, ...]) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    try:
        folder = snapshot_download(
            repo, revision=revision, cache_dir=hub_cache_dir(), allow_patterns=list(files)
        )
        return str(folder)
    except (HfHubHTTPError, HFValidationError, LocalEntryNotFoundError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{repo}: download failed ({first})") from None


def hub_origin(path: str | os.PathLike[str]) -> dict | None:
    """``{"repo_id", "revision"}`` when ``path`` lies in a Hugging Face cache snapshot
    (``.../models--org--name/snapshots/<commit>/...``), else None."""
    parts = Path(path).parts
    for i in range(len(parts) - 2, 0, -1):
        if parts[i] == "snapshots" and parts[i - 1].startswith("models--"):
            repo = parts[i - 1][len("models--") :].replace("--", "/")
            return {"repo_id": repo, "revision": parts[i + 1]}
    return None


def hub_models_in(record: object) -> list[dict]:
    """Every distinct hub snapshot named by a string anywhere in ``record`` (a provenance
    dict), as ``{"repo_id", "revision", "path"}``."""
    found: dict[str, dict] = {}

    def walk(value: object) -> None:
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)
        elif isinstance(value, str) and "snapshots" in value:
            origin = hub_origin(value)
            if origin is not None:
                key = f"{origin['repo_id']}@{origin['revision']}"
                found.setdefault(key, {**origin, "path": value})

    walk(record)
    return list(found.values())
