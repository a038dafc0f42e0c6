"""Path rules: never read outside a checkpoint directory, never write over an input."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath, PureWindowsPath

from weightsmith.errors import CheckpointError, OutputError


def safe_member(root: Path, name: str, where: str) -> Path:
    """Resolve a file name taken from a checkpoint (e.g. an index entry) inside ``root``.

    Absolute paths, drive letters and ``..`` components are refused, so a crafted index cannot
    make us read ``/etc/passwd`` or a sibling directory.
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
