"""``compress qat`` / ``compress bitnet``: swap Linears, train, save, convert with quantize.

Both run the same pipeline and differ only in the swap factory and the per-step hook:

1. select the target Linears exactly as ``compress quantize`` does (lm_head kept);
2. load the model in float32 (and the frozen original as teacher when a KL term is asked);
3. swap the targets for training modules (fake-quant RTN, or BitLinear with its λ schedule);
4. train with the engine (:func:`weightsmith.compress.qat.task.train_model`);
5. write the trained full-precision weights to a temporary checkpoint through the I/O layer and
   convert it with :func:`weightsmith.compress.quantize_checkpoint` into ``out``, so the output
   is the same real format ``compress quantize`` writes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from weightsmith.compress.moe import refuse_moe
from weightsmith.compress.qat.config import BitnetConfig, QatConfig, TrainConfig
from weightsmith.compress.qat.fake_quant import WeightSpec
from weightsmith.compress.qat.modules import (
    as_bitlinear,
    as_fake_quant,
    lambda_schedule,
    set_lambda,
    swap_linears,
)
from weightsmith.compress.qat.task import train_model
from weightsmith.compress.quantize import QuantizeResult, quantize_checkpoint, select_linears
from weightsmith.compress.registry import FORMATS, QuantConfig
from weightsmith.compress.rtn import zero_min_for
from weightsmith.core.device import select_device
from weightsmith.core.models import load_model, load_tokenizer
from weightsmith.core.report import peak_rss_bytes
from weightsmith.core.skeleton import build_skeleton
from weightsmith.core.training import TrainResult
from weightsmith.core.training.data import read_records, tokenize_records
from weightsmith.core.training.save import full_weights, write_student
from weightsmith.errors import CheckpointError, OutputError
from weightsmith.io.architectures import require_described
from weightsmith.io.paths import check_output_location
from weightsmith.io.reader import open_checkpoint
from weightsmith.io.writer import DEFAULT_MAX_SHARD_SIZE

# (model, swapped modules) -> per-step hook (or None)
Prepare = Callable[[nn.Module, list[nn.Module]], Callable[[int, int], None] | None]
Factory = Callable[[nn.Linear], nn.Module]


@dataclass
class QatResult:
    """What a QAT/BitNet run did and cost; ``quantize`` is the conversion's result."""

    out: str
    steps: int
    train_tokens: int
    tokens_per_s: float
    first_loss: float
    final_loss: float
    losses: list[float]
    wall_s: float
    train_wall_s: float
    peak_rss: int
    output_size: int
    quantized_linears: int
    config: dict
    quantize: dict

    def to_dict(self) -> dict:
        return asdict(self)


def qat_checkpoint(
    model: str | os.PathLike[str],
    out: str | os.PathLike[str],
    data: str | os.PathLike[str],
    cfg: QatConfig,
    **kwargs,
) -> QatResult:
    """Quantization-aware training of ``model``'s Linears, written as ``compress quantize`` does."""
    qcfg = cfg.quant
    qcfg.validate()

    def factory(ckpt_dtype: torch.dtype) -> Factory:
        scale_dtype = getattr(FORMATS[qcfg.format], "scale_dtype", None) or ckpt_dtype
        spec = WeightSpec(qcfg.bits, qcfg.group_size, qcfg.symmetric, scale_dtype, ckpt_dtype,
                          zero_min_for(qcfg))  # fmt: skip
        return as_fake_quant(spec, cfg.act_bits)

    return _train_and_convert(model, out, data, qcfg, cfg.train, factory, None, asdict(cfg),
                              "qat", **kwargs)  # fmt: skip


def bitnet_quant_config(cfg: BitnetConfig) -> QuantConfig:
    """The conversion config: ternary weights in transformers' ``bitnet`` format."""
    return QuantConfig(method="ternary", format="bitnet", ignore=cfg.ignore,
                       use_rms_norm=cfg.use_rms_norm, linear_class=cfg.linear_class)  # fmt: skip


def bitnet_checkpoint(
    model: str | os.PathLike[str],
    out: str | os.PathLike[str],
    data: str | os.PathLike[str],
    cfg: BitnetConfig,
    **kwargs,
) -> QatResult:
    """BitNet b1.58 continued training (λ warm-up), written in the ``bitnet`` format."""
    qcfg = bitnet_quant_config(cfg)
    qcfg.validate()
    make = as_bitlinear(cfg.use_rms_norm, qcfg.rms_norm_eps, cfg.linear_class)

    def prepare(_model: nn.Module, swapped: list[nn.Module]):
        def hook(step: int, total: int) -> None:
            set_lambda(swapped, lambda_schedule(step, cfg.lambda_warmup))

        return hook

    return _train_and_convert(model, out, data, qcfg, cfg.train, lambda _dtype: make, prepare,
                              asdict(cfg), "bitnet", **kwargs)  # fmt: skip


@contextlib.contextmanager
def _hf_progress(enabled: bool):
    """Silence transformers' own loading bars under ``--no-progress`` (restored after)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was and not enabled:
            hf_logging.enable_progress_bar()


def _check_trainable(ckpt, kind: str) -> None:
    """What the conversion after training needs, checked before training (not after it)."""
    if ckpt.config is None:
        raise CheckpointError(f"{ckpt.root}: no config.json; {kind} needs it")
    require_described(ckpt.arch, f"{ckpt.root}: {kind}")


def _train_and_convert(
    model_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    data: str | os.PathLike[str],
    qcfg: QuantConfig,
    tcfg: TrainConfig,
    factory: Callable[[torch.dtype], Factory],
    prepare: Prepare | None,
    config_record: dict,
    kind: str,
    *,
    device: str = "cpu",
    force: bool = False,
    progress: bool = True,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    keep_trained: str | os.PathLike[str] | None = None,
) -> QatResult:
    start = time.perf_counter()
    dev = select_device(device)  # an unknown or absent --device fails before any work
    model_dir = Path(model_dir)
    check_output_location(Path(out).absolute(), [model_dir], force)  # fail before training
    if keep_trained is not None:  # the same rules for the second output
        keep = Path(keep_trained).absolute()
        if keep == Path(out).absolute():
            raise OutputError(f"--keep-trained {keep_trained} is OUT: choose another folder")
        check_output_location(keep, [model_dir], force)
    with open_checkpoint(model_dir) as ckpt:
        _check_trainable(ckpt, kind)
        targets, _ignored = select_linears(ckpt, build_skeleton(refuse_moe(ckpt, kind)), qcfg)
        ckpt_dtype = ckpt.info(targets[0].tensor).torch_dtype
        names = set(ckpt.tensors)
    tok = load_tokenizer(model_dir)
    examples = tokenize_records(read_records(data), tok, tcfg.seq_len)

    torch.manual_seed(tcfg.seed)
    with _hf_progress(progress):
        net = load_model(model_dir, dev, trainable=True)
        teacher = load_model(model_dir, dev) if tcfg.kl_weight > 0 else None
    swapped = swap_linears(net, [t.model_module for t in targets], factory(ckpt_dtype))
    hook = prepare(net, swapped) if prepare is not None else None
    stats: TrainResult = train_model(net, examples, tok.pad_token_id, tcfg, dev,
                                     teacher=teacher, on_step=hook, progress=progress,
                                     desc=kind)  # fmt: skip
    if hook is not None:
        hook(stats.steps, stats.steps)  # the saved model is the fully quantized one (λ = 1)
    del teacher

    losses = [round(x, 6) for x in stats.losses]
    work = Path(keep_trained) if keep_trained else Path(tempfile.mkdtemp(prefix=f"ws-{kind}-"))
    try:
        provenance = {"operation": kind, "config": config_record,
                      "training": {"steps": stats.steps, "tokens": stats.tokens,
                                   "final_loss": losses[-1]}}  # fmt: skip
        write_student(model_dir, work, new_weights=full_weights(net, names),
                      provenance=provenance, max_shard_size=max_shard_size,
                      force=force or not keep_trained, progress=False)  # fmt: skip
        q: QuantizeResult = quantize_checkpoint(
            work, out, qcfg, force=force, max_shard_size=max_shard_size, progress=progress,
            provenance={"trained": {**provenance, "source": str(model_dir)}},
        )  # fmt: skip
    finally:
        if not keep_trained:
            shutil.rmtree(work, ignore_errors=True)
    return QatResult(
        out=q.out if isinstance(q.out, str) else str(q.out),
        steps=stats.steps,
        train_tokens=stats.tokens,
        tokens_per_s=round(stats.tokens_per_s, 1),
        first_loss=losses[0],
        final_loss=losses[-1],
        losses=losses,
        wall_s=round(time.perf_counter() - start, 3),
        train_wall_s=round(stats.wall_s, 3),
        peak_rss=peak_rss_bytes(),
        output_size=int(q.extra["output_size"]),
        quantized_linears=int(q.extra["quantized_linears"]),
        config=config_record,
        quantize=q.to_dict(),
    )
