"""``weightsmith convert``: re-shard and/or cast a checkpoint through the streaming layer."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch

from weightsmith.core.streaming import RawTensor, StreamResult
from weightsmith.core.transform import WriteOptions, dtype_patch, rewrite_checkpoint
from weightsmith.errors import CheckpointError, ConfigError
from weightsmith.io.dtypes import config_dtype_name, parse_user_dtype
from weightsmith.io.reader import TensorGroup, open_checkpoint
from weightsmith.io.writer import DEFAULT_MAX_SHARD_SIZE, TensorSpec

CASTABLE = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass(frozen=True)
class ConvertConfig:
    """Options of a conversion, recorded in the output's ``weightsmith.json``."""

    dtype: str | None = None  # None keeps every tensor's stored dtype (bit-exact copy)
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE
    version: int = 1


def convert(
    path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    dtype: str | None = None,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    force: bool = False,
    allow_pickle: bool = False,
    progress: bool = True,
) -> StreamResult:
    """Copy ``path`` to ``out`` one tensor at a time, optionally casting floating tensors.

    Without ``dtype`` the stored bytes are copied unchanged; with it, float tensors are cast
    (integer, boolean and float8 tensors are kept: casting them would corrupt quantized data)
    and config.json's dtype is updated. Casting to float16 refuses values it cannot represent.
    """
    target = parse_user_dtype(dtype) if dtype else None
    cfg = ConvertConfig(
        dtype=config_dtype_name(target) if target else None, max_shard_size=max_shard_size
    )
    with open_checkpoint(path, allow_pickle=allow_pickle) as ckpt:

        def out_dtype(name: str) -> torch.dtype:
            stored = ckpt.info(name).torch_dtype
            return target if target is not None and stored in CASTABLE else stored

        def plan(group: TensorGroup) -> list[TensorSpec]:
            return [TensorSpec(n, out_dtype(n), ckpt.info(n).shape) for n in group.names]

        def apply(group: TensorGroup):
            for name in group.names:
                info = ckpt.info(name)
                want = out_dtype(name)
                if want == info.torch_dtype:
                    yield name, RawTensor.of(ckpt, name)
                else:
                    yield name, _cast(ckpt.get_tensor(name), want, name)

        patch = None
        if target is not None:
            patch = dtype_patch(config_dtype_name(target))
        return rewrite_checkpoint(
            ckpt,
            ckpt.groups("layer"),  # embeddings, layer 0, 1, ... : each layer stays together
            out,
            plan=plan,
            apply=apply,
            options=WriteOptions(max_shard_size, force, progress),
            description="convert",
            provenance={"operation": "convert", "config": asdict(cfg)},
            config_patch=patch,
        )


@dataclass(frozen=True)
class ImatrixOptions:
    """Where a GGUF write's importance matrix comes from: ``imatrix`` (a llama.cpp imatrix
    file) or ``calib`` (text run through the layer-streamed calibration engine), optionally
    saved to ``save`` in llama.cpp's format."""

    imatrix: str | None = None
    calib: str | None = None
    samples: int = 128
    seq_len: int = 512
    batch_size: int = 8
    device: str = "cpu"
    save: str | None = None


def convert_gguf(
    path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    type_name: str = "F16",
    force: bool = False,
    allow_pickle: bool = False,
    progress: bool = True,
    importance: ImatrixOptions | None = None,
):
    """Write ``path`` as one llama.cpp GGUF file (see :mod:`weightsmith.ggml.writer`), with an
    importance matrix from ``importance`` when it names a file or calibration text."""
    from weightsmith.ggml.types import check_type
    from weightsmith.ggml.writer import write_gguf

    check_type(type_name)
    imatrix = None
    if importance is not None and (importance.imatrix or importance.calib):
        if _bitnet_config(path, allow_pickle) is not None:
            raise ConfigError("--calib/--imatrix do not apply to a bitnet (ternary) checkpoint")
        imatrix = _importance(path, out, importance, force, progress)
    elif importance is not None and importance.save:
        raise ConfigError("--save-imatrix needs --calib (the text to collect it from)")
    qc = _bitnet_config(path, allow_pickle)
    if qc is None:
        return write_gguf(
            path, out, type_name=type_name, force=force, allow_pickle=allow_pickle,
            progress=progress, imatrix=imatrix,
        )  # fmt: skip
    import shutil
    import tempfile
    from pathlib import Path

    from weightsmith.io.paths import check_file_output

    check_file_output(Path(out), [Path(path)], force)
    tmp = Path(tempfile.mkdtemp(prefix=".bitnet-dense-", dir=Path(out).resolve().parent))
    dense = tmp / Path(path).resolve().name  # general.name is the folder's: the source's
    kept = frozenset(f"{m}.weight" for m in qc.get("modules_to_not_convert") or ())
    try:
        _dense_bitnet(path, dense, progress)
        return write_gguf(
            dense, out, type_name=type_name, force=force, progress=progress, dense=kept
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ternary_gguf(
    path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    type_name: str,
    ignore: tuple[str, ...] = (),
    force: bool = False,
    progress: bool = True,
    **options,
):
    """``compress quantize --method ternary --format gguf --type TQ1_0|TQ2_0``: the ternary
    method's levels and per-tensor scales (a bitnet checkpoint in a temporary folder beside
    OUT), stored exactly by the TQ blocks through :func:`convert_gguf`'s bitnet path."""
    import shutil
    import tempfile
    from pathlib import Path

    from weightsmith.compress import QuantConfig, quantize_checkpoint
    from weightsmith.io.paths import check_file_output

    if type_name not in ("TQ1_0", "TQ2_0"):
        raise ConfigError(f"--method ternary --format gguf writes TQ1_0 or TQ2_0, not {type_name}")
    if options.get("use_rms_norm"):
        raise ConfigError("--use-rms-norm cannot be written as a llama.cpp GGUF (no such norm)")
    cfg = QuantConfig("ternary", format="bitnet", ignore=ignore, **options)
    cfg.validate()
    check_file_output(Path(out), [Path(path)], force)
    tmp = Path(tempfile.mkdtemp(prefix=".ternary-", dir=Path(out).resolve().parent))
    packed = tmp / Path(path).resolve().name
    try:
        quantize_checkpoint(path, packed, cfg, progress=progress)
        return convert_gguf(packed, out, type_name=type_name, force=force, progress=progress)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _bitnet_config(path, allow_pickle: bool) -> dict | None:
    """config.json's ``quantization_config`` when it is transformers' ``bitnet``, else None."""
    with open_checkpoint(path, allow_pickle=allow_pickle) as ckpt:
        qc = (ckpt.config or {}).get("quantization_config") or {}
    return qc if qc.get("quant_method") == "bitnet" else None


def _dense_bitnet(path, out, progress: bool) -> StreamResult:
    """The float32 model a ``bitnet`` checkpoint computes with (``q · γ`` per Linear), which
    ``TQ1_0``/``TQ2_0`` store exactly (levels, and ``γ`` rounded to fp16 as block scale).

    llama.cpp's llama graph has no place for BitLinear's RMSNorm before each Linear
    (``use_rms_norm``): such a checkpoint is refused."""
    from weightsmith.compress import quantize as _registers  # noqa: F401
    from weightsmith.compress.registry import format_reading

    with open_checkpoint(path) as ckpt:
        qc = ckpt.config["quantization_config"]
        if qc.get("quantization_mode", "offline") != "offline":
            raise ConfigError("an online-mode bitnet checkpoint stores no ternary weights")
        if qc.get("use_rms_norm"):
            raise ConfigError(
                "bitnet with use_rms_norm (an RMSNorm before every BitLinear) cannot be written "
                "as a llama.cpp GGUF: its llama graph has no such norm; train with --no-rms-norm"
            )
        fmt = format_reading("bitnet")
        packed = fmt.stored_linears(ckpt.tensors, qc)  # weight name -> (weight, weight_scale)
        parts = {p for ps in packed.values() for p in ps}
        auto = qc.get("linear_class") == "autobitlinear"

        def dense(name: str) -> torch.Tensor:
            return fmt.decode(
                qc, name[: -len(".weight")], {p: ckpt.get_tensor(p) for p in packed[name]}
            )

        def plan(group: TensorGroup) -> list[TensorSpec]:
            specs = []
            for n in group.names:
                if n in packed:
                    shape = (ckpt.info(n).shape[0] * 4, ckpt.info(n).shape[1])
                    specs.append(TensorSpec(n, torch.float32, shape))
                elif n not in parts:
                    specs.append(TensorSpec(n, ckpt.info(n).torch_dtype, ckpt.info(n).shape))
            return specs

        def apply(group: TensorGroup):
            for n in group.names:
                if n in packed:
                    yield n, dense(n).float()
                elif n.endswith(".bias") and auto and n[:-5] + ".weight" in packed:
                    scale = ckpt.get_tensor(n[:-5] + ".weight_scale").float()
                    b = ckpt.get_tensor(n).float() * scale  # stored as b / γ
                    yield n, b.to(ckpt.info(n).torch_dtype)
                elif n not in parts:
                    yield n, RawTensor.of(ckpt, n)

        def patch(config: dict) -> dict:
            config.pop("quantization_config", None)
            return config

        return rewrite_checkpoint(
            ckpt, ckpt.groups("layer"), out, plan=plan, apply=apply,
            options=WriteOptions(DEFAULT_MAX_SHARD_SIZE, False, progress),
            description="bitnet -> dense", provenance={"operation": "bitnet-dense"},
            config_patch=patch,
        )  # fmt: skip


def _importance(path, out, opts: ImatrixOptions, force: bool, progress: bool) -> dict:
    """The per-column importance the GGUF writer weights by (``Imatrix.importance()``)."""
    from pathlib import Path

    from weightsmith.ggml.imatrix import collect_imatrix, load_imatrix, save_imatrix
    from weightsmith.io.paths import check_file_output

    if opts.imatrix and opts.calib:
        raise ConfigError("--imatrix and --calib both give the importance matrix: choose one")
    if opts.imatrix and opts.save:
        raise ConfigError(
            "--save-imatrix saves a collected matrix: it needs --calib, not --imatrix"
        )
    check_file_output(Path(out), [Path(path)], force)  # refuse before a long calibration
    if opts.save:
        check_file_output(Path(opts.save), [Path(path)], force)
    if opts.imatrix:
        return load_imatrix(opts.imatrix).importance()
    im = collect_imatrix(
        path, opts.calib, samples=opts.samples, seq_len=opts.seq_len,
        batch_size=opts.batch_size, device=opts.device, progress=progress,
    )  # fmt: skip
    if opts.save:
        save_imatrix(opts.save, im, force=force)
    return im.importance()


def _cast(t: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    if dtype == torch.float16 and t.is_floating_point() and t.numel():
        low, high = torch.aminmax(t)  # one pass; NaN stays NaN and is not an overflow
        limit = torch.finfo(torch.float16).max
        if high.item() > limit or low.item() < -limit:
            finite = t[torch.isfinite(t)].abs()
            peak = finite.max().item() if finite.numel() else 0.0
            if peak > limit:
                raise CheckpointError(
                    f"tensor {name!r}: values up to {peak:.4g} overflow float16 "
                    f"(max 65504); use --dtype bfloat16"
                )
    return t.to(dtype)
