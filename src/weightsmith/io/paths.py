"""Path rules: never read outside a checkpoint directory (symlinks included, with one
exception for the Hugging Face cache), never write over an input."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath, PureWindowsPath

from weightsmith.errors import CheckpointError, OutputError


def safe_member(root: Path, name: str, where: str) -> Path:
    """Resolve a file name taken from a checkpoint (e.g. an index entry) inside ``root``.

    Absolute paths, drive letters and ``..`` components are refused, so a crafted index cannot
    make us read ``/etc/passwd`` or a sibling directory. Symlinks are not looked at here; use
    :func:`checked_member` for a file that will be read.
    """
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{where}: empty or non-string file name {name!r}")
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or "\\" in name:
        raise CheckpointError(f"{where}: refuses absolute or non-portable path {name!r}")
    if ".." in posix.parts:
        raise CheckpointError(f"{where}: refuses path {name!r} that leaves the checkpoint dir")
    full = Path(os.path.normpath(root / name))
    if not _is_within(full, Path(os.path.normpath(root))):
        raise CheckpointError(f"{where}: refuses path {name!r} that leaves the checkpoint dir")
    return full


def checked_member(root: Path, name: str, where: str) -> Path:
    """:func:`safe_member`, plus the symlink rule for a file that will be read or copied.

    A symlink (the file or a folder on the way to it) is followed only when its target stays
    inside the checkpoint directory, or when the checkpoint is a Hugging Face cache snapshot
    (``models--org--name/snapshots/<rev>/``) and the target lies in that repository's
    ``blobs/`` folder. Anything else is refused, naming the file.
    """
    full = safe_member(root, name, where)
    if not (full.is_symlink() or _has_symlink_between(root, full)):
        return full
    target = full.resolve()
    real_root = root.resolve()
    blobs = hf_cache_blobs(real_root)
    if _is_within(target, real_root) or (blobs is not None and _is_within(target, blobs)):
        return full
    raise CheckpointError(
        f"{where}: {name} is a symlink to {target}, outside the checkpoint directory; "
        "refusing to read it (copy the file into the checkpoint instead)"
    )


def hf_cache_blobs(snapshot: Path) -> Path | None:
    """The ``blobs/`` folder of the Hugging Face cache repository that ``snapshot`` (a
    resolved path) lies in, or None when it is not inside ``models--*/snapshots/<rev>/``."""
    parts = snapshot.parts
    for i in range(len(parts) - 2, 0, -1):
        if parts[i] == "snapshots" and parts[i - 1].startswith("models--"):
            return Path(*parts[:i]) / "blobs"
    return None


def _has_symlink_between(root: Path, full: Path) -> bool:
    """True when a folder between ``root`` and ``full`` (exclusive) is a symlink."""
    try:
        rel = full.relative_to(os.path.normpath(root))
    except ValueError:
        return False
    here = Path(os.path.normpath(root))
    for part in rel.parts[:-1]:
        here = here / part
        if here.is_symlink():
            return True
    return False


def _is_within(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


def check_output_location(out: Path, inputs: list[Path], force: bool) -> None:
    """Refuse an OUT that exists (without ``force``), equals, contains or lies inside an input."""
    out_r = out.resolve()
    for inp in inputs:
        in_dir = inp.resolve() if inp.is_dir() else inp.resolve().parent
        if out_r == in_dir:
            raise OutputError(f"output {out} is the input directory {inp}: choose another -o")
        if _is_within(out_r, in_dir):
            raise OutputError(f"output {out} lies inside the input directory {inp}")
        if _is_within(in_dir, out_r):
            raise OutputError(f"output {out} contains the input {inp}: it would be overwritten")
    if out.exists() or out.is_symlink():
        if not force:
            raise OutputError(f"output {out} already exists (use --force to replace it)")
        if not out.is_dir() or out.is_symlink():
            raise OutputError(f"output {out} exists and is not a directory; refusing to replace")
