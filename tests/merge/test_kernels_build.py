"""Every native kernel source builds and loads wherever a C compiler is present.

A kernel that fails to build makes its callers fall back to torch with a warning and its own
tests skip as if there were no compiler, so a broken source would otherwise pass CI unseen."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from weightsmith import kernels
from weightsmith.kernels import dot, ggml, gptq, narrow, quant, reduce, sphere

COMPILER = (
    os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
)
pytestmark = pytest.mark.skipif(
    COMPILER is None or not kernels.enabled(),
    reason="no C compiler here (or WEIGHTSMITH_KERNELS=0)",
)

LOADERS = {
    "merge": kernels.merge_kernels,
    "dot": dot.library,
    "ggml": ggml.ggml_kernels,
    "gptq": gptq.gptq_kernels,
    "narrow": narrow.library,
    "quant": quant.quant_kernels,
    "reduce": reduce.library,
    "sphere": sphere.library,
}


@pytest.mark.parametrize("name", sorted(LOADERS))
def test_kernel_builds_and_loads(name, recwarn):
    assert LOADERS[name]() is not None, [str(w.message) for w in recwarn]


def test_every_kernel_source_is_covered():
    folder = Path(kernels.__file__).parent
    sources = {p.stem.removesuffix("_kernels") for p in folder.glob("*_kernels.c")}
    assert sources == set(LOADERS)
