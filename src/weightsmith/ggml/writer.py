"""HF checkpoint -> one GGUF file, streamed: one tensor in memory at a time.

The plan (every tensor's GGUF name, type and byte size) is made from headers alone, so an
unknown architecture, tensor or tokenizer is refused before anything is written. Then the
header, metadata and tensor table are written, and each tensor is read, permuted (Q/K for
Llama), encoded and appended. The file is written beside OUT under a temporary name and renamed
into place only when complete.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import gguf
import numpy as np
from tqdm.auto import tqdm

from weightsmith.core.parallel import default_workers
from weightsmith.core.report import peak_rss_bytes
from weightsmith.errors import CheckpointError, ConfigError, OutputError
from weightsmith.ggml import archs, types
from weightsmith.ggml.vocab import read_vocab
from weightsmith.io.paths import check_file_output
from weightsmith.io.reader import Checkpoint, open_checkpoint
from weightsmith.kernels import ggml as native_ggml

_F16_MAX = 65504.0
_BLOCK_ELEMENTS = 4 << 20  # floats read and encoded at once: bounds memory for huge embeddings


@dataclass(frozen=True)
class PlannedTensor:
    hf_name: str
    name: str
    shape: tuple[int, ...]  # numpy order (rows first), as stored in the checkpoint
    type: str
    fallback: str | None
    shift: float = 0.0  # added to the values when written (Gemma's norms: archs.norm_shift)
    data: np.ndarray | None = field(default=None, compare=False, repr=False)  # computed tensor


@dataclass
class GgufResult:
    """What a GGUF write produced and what it cost."""

    out: str
    type: str
    architecture: str
    tensors: int
    total_size: int
    wall_s: float
    peak_rss: int
    tensor_types: dict[str, int] = field(default_factory=dict)
    fallbacks: list[dict] = field(default_factory=list)
    imatrix_tensors: int = 0  # quantized tensors whose encoding used the importance matrix

    def to_dict(self) -> dict:
        return asdict(self)


def plan_tensors(
    ckpt: Checkpoint,
    arch: archs.GgufArch,
    type_name: str,
    has_imatrix: bool = False,
    dense: frozenset[str] = frozenset(),
) -> list[PlannedTensor]:
    """Every tensor's GGUF name and type, from headers only; ``dense`` HF names (Linears a
    bitnet checkpoint kept unquantized) are F16 rather than ternary."""
    named = []
    for hf in ckpt.tensors:
        if hf == "lm_head.weight" and ckpt.tied_embeddings:
            continue  # llama.cpp stores a tied head once, as token_embd
        if hf == "lm_head.weight" and arch.name in ("gemma", "gemma2"):
            raise ConfigError(f"{arch.name} with an untied lm_head: llama.cpp's graph reuses "
                              "token_embd as the output")  # fmt: skip
        name = archs.gguf_name(hf, arch.name)
        if name is not None:
            named.append((hf, name, tuple(ckpt.info(hf).shape)))
    if type_name in types.K_MIXES:
        chosen = types.mix_types(
            type_name, {n: s for _, n, s in named}, arch.name, ckpt.config or {}, has_imatrix
        )
    else:
        chosen = {n: types.choose_type(type_name, n, s) for _, n, s in named}
    for hf, n, _ in named:
        if hf in dense and chosen[n].name in types.TERNARY_TYPES:
            chosen[n] = types.TensorType("F16", "kept dense (not ternary) in the bitnet source")
    extra = [  # computed from config.json (Llama 3's rope_freqs), first as llama.cpp writes them
        PlannedTensor("", n, v.shape, "F32", None, data=v)
        for n, v in archs.extra_tensors(arch, ckpt.config or {}).items()
    ]
    return extra + [
        PlannedTensor(hf, n, s, chosen[n].name, chosen[n].fallback, archs.norm_shift(arch, n))
        for hf, n, s in named
    ]


def write_gguf(
    path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    type_name: str = "F16",
    force: bool = False,
    allow_pickle: bool = False,
    progress: bool = True,
    imatrix: dict[str, np.ndarray] | None = None,
    dense: frozenset[str] = frozenset(),
) -> GgufResult:
    """Write the checkpoint at ``path`` as a llama.cpp GGUF file ``out`` of ``type_name``.

    ``imatrix`` (GGUF tensor name -> per-column importance, as ``Imatrix.importance()`` gives
    it) makes every quantized tensor encode as ``llama-quantize --imatrix`` does: the K types and
    Q4_0/Q4_1/Q5_0/Q5_1 take llama.cpp's weighted search (``kquants.quantize_tensor``; a tensor
    the matrix has no entry for takes the unweighted one), and the mixes choose their types as
    llama.cpp does when it has an imatrix."""
    start = time.perf_counter()
    type_name = types.check_type(type_name)
    out = Path(out)
    check_file_output(out, [Path(path)], force)
    with open_checkpoint(path, allow_pickle=allow_pickle) as ckpt:
        config = ckpt.config or {}
        arch = archs.gguf_arch_for(config)
        plan = plan_tensors(ckpt, arch, type_name, imatrix is not None, dense)
        _check_imatrix(plan, imatrix)
        vocab = read_vocab(ckpt.root, config)
        w = gguf.GGUFWriter(path=None, arch=arch.name)
        _write_metadata(w, arch, config, type_name, ckpt.root.name)
        vocab.add_to(w)
        for t in plan:
            shape, dtype = types.stored_shape(t.shape, t.type)
            raw = None if t.type in ("F32", "F16") else gguf.GGMLQuantizationType[t.type]
            w.add_tensor_info(
                t.name, shape, dtype, int(np.prod(shape)) * dtype.itemsize, raw_dtype=raw
            )
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        try:
            _write_file(w, tmp, ckpt, arch, plan, progress, imatrix)
            os.replace(tmp, out)
        except BaseException:
            w.close()
            tmp.unlink(missing_ok=True)
            raise
    counts = Counter(t.type for t in plan)
    return GgufResult(
        out=str(out),
        type=type_name,
        architecture=arch.name,
        tensors=len(plan),
        total_size=out.stat().st_size,
        wall_s=time.perf_counter() - start,
        peak_rss=peak_rss_bytes(),
        tensor_types=dict(counts.most_common()),
        fallbacks=[
            {"tensor": t.name, "type": t.type, "reason": t.fallback} for t in plan if t.fallback
        ],
        imatrix_tensors=sum(_uses_imatrix(t, imatrix) for t in plan),
    )


def _uses_imatrix(t: PlannedTensor, imatrix: dict[str, np.ndarray] | None) -> bool:
    return imatrix is not None and t.name in imatrix and t.type in types.IMATRIX_TYPES


def _check_imatrix(plan: list[PlannedTensor], imatrix: dict[str, np.ndarray] | None) -> None:
    """Refuse, before writing, an importance matrix whose entries do not fit the tensors."""
    if imatrix is None:
        return
    by_name = {t.name: t for t in plan}
    if imatrix and not any(n in by_name for n in imatrix):
        raise ConfigError("the importance matrix names none of this model's tensors")
    for name, values in imatrix.items():
        t = by_name.get(name)
        if t is not None and len(t.shape) >= 2 and np.asarray(values).size != t.shape[-1]:
            raise ConfigError(
                f"importance matrix entry {name!r} has {np.asarray(values).size} values, "
                f"the tensor has {t.shape[-1]} columns"
            )


def _write_metadata(w: gguf.GGUFWriter, arch, config: dict, type_name: str, name: str) -> None:
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    archs.write_hparams(w, arch, config)
    w.add_file_type(types.file_type(type_name))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _write_file(
    w, tmp: Path, ckpt: Checkpoint, arch, plan: list[PlannedTensor], progress: bool, imatrix
) -> None:
    try:
        w.open_output_file(tmp)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
    except OSError as e:
        raise OutputError(f"{tmp.parent}: cannot write the GGUF file ({e.strerror})") from e
    config = ckpt.config or {}
    for t in tqdm(plan, disable=not progress, desc="gguf", unit="tensor", leave=False):
        n_head = archs.qk_heads(arch, t.name, config)
        shape, dtype = types.stored_shape(t.shape, t.type)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        blocks = _prefetched(_encoded_blocks(ckpt, t, n_head, imatrix))  # encode || write
        w.write_tensor_data(_Encoded(nbytes, blocks))
    w.close()


def _row_blocks(ckpt: Checkpoint, t: PlannedTensor, n_head: int | None):
    """The tensor as float32 blocks of rows (whole heads when permuted), checked and permuted:
    every GGUF type encodes rows independently, so encoded blocks concatenate to the whole."""
    rows = t.shape[0] if t.shape else 1
    per_row = int(np.prod(t.shape[1:])) if len(t.shape) > 1 else max(rows, 1)
    unit = rows // n_head if n_head else 1
    step = max(unit, _BLOCK_ELEMENTS // max(per_row, 1) // unit * unit)
    if len(t.shape) < 2 or rows <= step:
        step = rows
    for start in range(0, rows, step):
        if step == rows:
            raw = ckpt.get_tensor(t.hf_name)
        else:
            raw = ckpt.read_rows(t.hf_name, start, min(start + step, rows))
        data, finite, amax = _as_float32(raw)
        if not finite:
            raise CheckpointError(f"tensor {t.hf_name!r} holds NaN or Inf; refusing to write it")
        if t.type == "F16" and amax > _F16_MAX:
            raise CheckpointError(
                f"tensor {t.hf_name!r}: values up to {amax:.4g} overflow F16 "
                "(max 65504); use --type BF16 or F32"
            )
        if n_head is not None:
            data = archs.permute_rows(data, data.shape[0] // unit)
        if t.shift:
            data = data + np.float32(t.shift)
        yield data


def _as_float32(raw) -> tuple[np.ndarray, bool, float]:
    """(float32 array, all finite, largest |value|): one native pass, else numpy's three."""
    native = native_ggml.to_float32(raw, default_workers())
    if native is not None:
        return native
    data = raw.float().numpy()
    finite = bool(np.isfinite(data).all())
    return data, finite, float(np.abs(data).max()) if finite and data.size else 0.0


def _prefetched(blocks):
    """``blocks`` produced one ahead on a helper thread (pread, conversions and the native
    encoders release the GIL): reading the next block overlaps encoding this one, and encoding
    the next overlaps writing this one; a few row blocks (<= 16 MB of float32 each) in memory."""
    it = iter(blocks)
    with ThreadPoolExecutor(1, thread_name_prefix="ws-gguf-ahead") as pool:
        nxt = pool.submit(next, it, None)
        while (data := nxt.result()) is not None:
            nxt = pool.submit(next, it, None)
            yield data


def _encoded_blocks(ckpt: Checkpoint, t: PlannedTensor, n_head: int | None, imatrix=None):
    """The tensor's encoded bytes, a block of rows at a time (computed tensors whole)."""
    if t.data is not None:
        yield types.encode(t.data, t.type)
        return
    for data in _prefetched(_row_blocks(ckpt, t, n_head)):
        native = None
        if t.type == "F16":
            native = native_ggml.to_float16(data, default_workers())
        elif t.type == "Q8_0" and data.ndim == 2 and data.shape[-1] % 32 == 0:
            native = native_ggml.quantize_q8_0(data, default_workers())  # imatrix-free type
        if native is not None:
            yield native
            continue
        if imatrix is None:
            yield types.encode(data, t.type)
        else:
            yield types.encode_imatrix(data, t.type, imatrix.get(t.name))


class _Encoded:
    """What GGUFWriter.write_tensor_data needs of an array (``nbytes``, ``tofile``), filled
    from encoded row blocks so a huge embedding is never held whole."""

    def __init__(self, nbytes: int, blocks) -> None:
        self.nbytes = nbytes
        self._blocks = blocks

    def tofile(self, fout) -> None:
        written = 0
        for block in self._blocks:
            block.tofile(fout)
            written += block.nbytes
        if written != self.nbytes:
            raise AssertionError(f"wrote {written} bytes of a {self.nbytes}-byte tensor")
