"""Native kernels, compiled on first use with the system C compiler and loaded with ctypes.

Fused loops for the hot elementwise work of task-vector merges (``merge_kernels.c``) and the
GGML block encoders of the GGUF writer (``ggml_kernels.c``, see :mod:`weightsmith.kernels.ggml`).
Each shared library is built once per source/compiler/CPU into the user cache
(``$WEIGHTSMITH_CACHE`` or ``~/.cache/weightsmith``) and reused. No compiler, a failed build or
``WEIGHTSMITH_KERNELS=0`` means :func:`merge_kernels` / :func:`load_library` return None and
callers use their eager torch / numpy code, which gives bit-identical results (the tests
compare both).
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import os
import platform
import re
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

_SOURCE = Path(__file__).with_name("merge_kernels.c")
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fPIC", "-shared", "-std=c11"]
_ABI = 6
_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | None] = {}
_pool_lock = threading.Lock()
_pools: dict[int, ThreadPoolExecutor] = {}

_i64, _f32, _i32, _u64, _u32 = (
    ctypes.c_int64,
    ctypes.c_float,
    ctypes.c_int32,
    ctypes.c_uint64,
    ctypes.c_uint32,
)
_p = ctypes.c_void_p
SIGNATURES = {
    "ws_abi_version": ([], ctypes.c_int),
    "ws_max_models": ([], ctypes.c_int),
    "ws_dare_keep": ([_u64, _u64, _i64, _i64, _p], None),
    "ws_gta_combine": (
        [_p, _p, _i64, _i64, _i64, *[_p] * 7, _i32, _i32, _i32, _i32, _f32, _f32, _p],
        None,
    ),
    "ws_absdelta_hist": ([_p, _p, _i64, _i32, _u32, _p], None),
    "ws_absdelta_count_eq": ([_p, _p, _i64, _f32], _i64),
    "ws_absdelta_nth_eq": ([_p, _p, _i64, _f32, _i64], _i64),
    "ws_to_f32": ([_p, _i32, _i64, _i32, _p], _i64),
    "ws_slerp_dots": ([_p, _p, _i32, _i64, _p, _p], None),
    "ws_lerp2": ([_p, _p, _i32, _i64, _f32, _f32, _p, _i32], _i64),
    "ws_narrow_mix": ([_p, _i32, _i32, _i64, _i32, _p, _i32, _f32, _i32, _f32, _p, _i32, _p], _i64),
    "ws_nearswap": ([_p, _p, _i32, _i64, _f32, _f32, _p, _i32, _p], _i64),
    "ws_ram": ([_p, _i32, _i32, _i64, _f32, _i32, _p, _p, _p, _i32, _p], _i64),
    "ws_stock_mix": ([_p, _i32, _i32, _i64, _i64, _p, _p, _i64, _p, _i32, _p], _i64),
    "ws_bf16_sub": ([_p, _p, _i32, _i64, _p, _p], None),
    "ws_sce_var": ([_p, _i32, _i32, _i64, _p, _p], None),
    "ws_sce_sq": ([_p, _i32, _i32, _i64, _p, _p], None),
    "ws_sce_combine": ([_p, _i32, _i32, _i64, _p, _p, _f32, _p, _i32, _p], _i64),
    "ws_della_keep": ([_p, _p, _i32, _i64, _i64, _i64, _u64, _p, _p], _i32),
    "ws_topk_mask": ([_p, _i64, _i64, _p, _p], None),
    "ws_narrow_l1": ([_p, _p, _i32, _i64, _i64, _p, _u64, _u64, _p, _p], None),
    "ws_narrow_gta": (
        [_p, _i32, _i32, _i64, _i64, *[_p] * 6, _i32, _i32, _f32, _i32, _f32, _p, _i32, _p],
        _i64,
    ),
}


def enabled() -> bool:
    return os.environ.get("WEIGHTSMITH_KERNELS", "1").lower() not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    root = os.environ.get("WEIGHTSMITH_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "weightsmith"


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: the CPU model and its feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return platform.processor() or platform.machine()
    keep = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features"))]
    return "\n".join(sorted(set(keep)))


def _compiler() -> str | None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    return cc


def local_includes(src: bytes) -> list[str]:
    """The ``#include "name"`` headers of a kernel source (next to it): part of its build key."""
    return re.findall(r'^\s*#include\s+"([^"]+)"', src.decode(), flags=re.MULTILINE)


def _build(cc: str, source: Path = _SOURCE) -> Path:
    src = source.read_bytes()
    src += b"".join((source.parent / h).read_bytes() for h in local_includes(src))
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    except OSError:
        version = ""
    key = hashlib.sha256(
        b"\0".join([src, " ".join(_FLAGS).encode(), version.encode(), _cpu_signature().encode()])
    ).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"{source.stem}-{platform.machine()}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run(
            [cc, *_FLAGS, "-o", tmp, str(source), "-lm"], capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed")
        os.replace(tmp, target)  # atomic: concurrent builders race harmlessly
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _pool(threads: int) -> ThreadPoolExecutor:
    with _pool_lock:
        if threads not in _pools:
            _pools[threads] = ThreadPoolExecutor(threads, thread_name_prefix="ws-kernels")
        return _pools[threads]


def run_rows(fn: Callable[[int, int], object], rows: int, threads: int, min_rows: int) -> None:
    """Call ``fn(start, stop)`` over ``rows`` split into about ``threads`` contiguous ranges of
    at least ``min_rows`` (on a shared pool; ctypes calls release the GIL). Callers split
    independent rows only, so results do not depend on ``threads``."""
    tasks = max(1, min(threads, rows // max(1, min_rows)))
    if tasks == 1:
        fn(0, rows)
        return
    bounds = [rows * k // tasks for k in range(tasks + 1)]
    futures = [_pool(threads).submit(fn, a, b) for a, b in itertools.pairwise(bounds)]
    for f in futures:
        f.result()


def merge_kernels() -> ctypes.CDLL | None:
    """The merge kernel library, built and loaded once per process (None: use eager torch)."""
    return load_library("merge", _SOURCE, SIGNATURES, ("ws_abi_version", _ABI))


def load_library(
    name: str, source: Path, signatures: dict, abi: tuple[str, int]
) -> ctypes.CDLL | None:
    """The library built from ``source``, loaded once per process with ``signatures`` set
    (None when kernels are disabled, no compiler is found, or the build or the ``abi`` check,
    (function name, expected value), fails)."""
    if not enabled():
        return None
    if name in _loaded:  # called per sub-chunk: no lock once loaded
        return _loaded[name]
    with _lock:
        if name in _loaded:
            return _loaded[name]
        lib = None
        cc = _compiler()
        if cc is not None:
            try:
                lib = ctypes.CDLL(str(_build(cc, source)))
                for fname, (args, res) in signatures.items():
                    fn = getattr(lib, fname)
                    fn.argtypes, fn.restype = args, res
                if getattr(lib, abi[0])() != abi[1]:
                    lib = None
            except (OSError, RuntimeError, AttributeError) as exc:
                warnings.warn(
                    f"weightsmith: native {name} kernels unavailable ({exc}); using the "
                    "portable code",
                    stacklevel=2,
                )
                lib = None
        _loaded[name] = lib
        return lib
