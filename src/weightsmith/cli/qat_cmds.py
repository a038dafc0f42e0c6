"""Commands of the `compress` group for qat (registered on import by weightsmith.cli.main).

``compress qat`` trains a model against fake-quantized RTN weights and writes the same format as
``compress quantize``; ``compress bitnet`` trains ternary BitLinears and writes ``bitnet``.
"""

from __future__ import annotations

import click

from weightsmith.cli.common import (
    FINITE_FLOAT,
    MODEL,
    force_option,
    max_shard_size_option,
    progress_option,
    report_option,
)
from weightsmith.cli.groups import compress_cli
from weightsmith.io.sizes import format_size, parse_size

_PATH = click.Path()


def _training_options(fn):
    """Options shared by qat and bitnet (one pass over the data unless --steps/--epochs)."""
    for opt in reversed([
        click.option("-o", "--out", required=True, type=_PATH, help="Output directory."),
        click.option("--data", required=True, type=_PATH, help="Training text (.txt or .jsonl)."),
        click.option("--steps", type=int, default=None, help="Optimizer steps (default: one pass)."),
        click.option("--epochs", type=FINITE_FLOAT, default=None, help="Passes over the data."),
        click.option("--lr", type=FINITE_FLOAT, default=None, help="Peak learning rate (see defaults)."),
        click.option("--batch-size", type=int, default=8, show_default=True),
        click.option("--grad-accum", type=int, default=1, show_default=True),
        click.option("--seq-len", type=int, default=256, show_default=True),
        click.option("--warmup", type=int, default=None, help="LR warm-up steps (default 5%)."),
        click.option("--weight-decay", type=FINITE_FLOAT, default=0.0, show_default=True),
        click.option("--distill-from-original", is_flag=True,
                     help="Add KL(original ‖ model) on the same batch (original frozen, eval)."),
        click.option("--kl-weight", type=FINITE_FLOAT, default=0.5, show_default=True,
                     help="With --distill-from-original: loss = (1−w)·CE + w·KL."),
        click.option("--ignore", multiple=True,
                     help="Keep this Linear unquantized (as compress quantize); repeatable."),
        click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N, or auto (CUDA when present)."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--keep-trained", type=_PATH, default=None,
                     help="Also keep the trained full-precision checkpoint in this folder."),
    ]):  # fmt: skip
        fn = opt(fn)
    return fn


def _train_config(o: dict, default_lr: float):
    from weightsmith.compress.qat import TrainConfig

    return TrainConfig(
        steps=o["steps"], epochs=o["epochs"], lr=o["lr"] or default_lr,
        batch_size=o["batch_size"], grad_accum=o["grad_accum"], seq_len=o["seq_len"],
        warmup_steps=o["warmup"], weight_decay=o["weight_decay"], seed=o["seed"],
        kl_weight=o["kl_weight"] if o["distill_from_original"] else 0.0,
    )  # fmt: skip


def _summary(what: str, r) -> dict:
    click.echo(
        f"{what}: {r.steps} steps ({r.train_tokens} tokens, {r.tokens_per_s:.0f} tok/s), "
        f"loss {r.first_loss:.4f} -> {r.final_loss:.4f}, {r.quantized_linears} Linears, "
        f"{format_size(r.output_size)} in {r.wall_s:.1f} s, peak RSS {format_size(r.peak_rss)} "
        f"-> {r.out}"
    )
    return {"output": r.out, "result": r.to_dict()}


@compress_cli.command("qat")
@click.argument("model", type=MODEL)
@_training_options
@click.option("--bits", type=click.IntRange(2, 8), default=4, show_default=True)
@click.option("--group-size", type=int, default=128, show_default=True,
              help="Input columns per scale; -1 = per output channel.")  # fmt: skip
@click.option("--sym/--asym", default=True, show_default=True)
@click.option("--act-bits", type=click.IntRange(2, 8), default=None,
              help="Also fake-quantize Linear inputs per token during training (the written "
                   "checkpoint stays weight-only).")  # fmt: skip
@click.option("--format", "fmt", type=click.Choice(["compressed-tensors", "gptq"]),
              default="compressed-tensors", show_default=True)  # fmt: skip
@max_shard_size_option
@force_option
@progress_option
@report_option
def qat_cmd(model: str, bits: int, group_size: int, sym: bool, act_bits: int | None, fmt: str,
            max_shard_size: str, force: bool, progress: bool, **o) -> dict:  # fmt: skip
    """Quantization-aware training of MODEL's Linears (RTN fake-quant + STE), written like
    `compress quantize --method rtn` into OUT. Default --lr 1e-4 (4-bit; 2-3 bits want more)."""
    from weightsmith.compress.qat import QatConfig, qat_checkpoint
    from weightsmith.compress.registry import QuantConfig

    quant = QuantConfig(method="rtn", bits=bits, group_size=group_size, symmetric=sym,
                        format=fmt, ignore=tuple(o["ignore"]))  # fmt: skip
    cfg = QatConfig(quant=quant, train=_train_config(o, 1e-4), act_bits=act_bits)
    if act_bits is not None:
        click.echo(f"note: --act-bits {act_bits} applies during training only; OUT is "
                   "weight-only (its config quantizes no activations)", err=True)  # fmt: skip
    r = qat_checkpoint(model, o["out"], o["data"], cfg, device=o["device"], force=force,
                       progress=progress, max_shard_size=parse_size(max_shard_size),
                       keep_trained=o["keep_trained"])  # fmt: skip
    grouping = "per-channel" if group_size == -1 else f"g{group_size}"
    return _summary(f"qat w{bits} ({grouping})", r)


@compress_cli.command("bitnet")
@click.argument("model", type=MODEL)
@_training_options
@click.option("--lambda-warmup", type=int, default=1000, show_default=True,
              help="Steps over which λ (quantization strength) rises to 1; 0 = from the start.")  # fmt: skip
@click.option("--use-rms-norm/--no-rms-norm", default=False, show_default=True,
              help="RMS-normalize each BitLinear's input before int8 quantization (changes the "
                   "pretrained function; off trained better in short runs, see BENCHMARKS.md).")  # fmt: skip
@click.option("--linear-class", type=click.Choice(["bitlinear", "autobitlinear"]),
              default="bitlinear", show_default=True)  # fmt: skip
@max_shard_size_option
@force_option
@progress_option
@report_option
def bitnet_cmd(model: str, lambda_warmup: int, use_rms_norm: bool, linear_class: str,
               max_shard_size: str, force: bool, progress: bool, **o) -> dict:  # fmt: skip
    """Continued training of MODEL into a BitNet b1.58 ternary model (BitLinear, λ warm-up),
    written in transformers' `bitnet` format into OUT. Default --lr 1e-3."""
    from weightsmith.compress.qat import BitnetConfig, bitnet_checkpoint

    cfg = BitnetConfig(train=_train_config(o, 1e-3), lambda_warmup=lambda_warmup,
                       use_rms_norm=use_rms_norm, linear_class=linear_class,
                       ignore=tuple(o["ignore"]))  # fmt: skip
    r = bitnet_checkpoint(model, o["out"], o["data"], cfg, device=o["device"], force=force,
                          progress=progress, max_shard_size=parse_size(max_shard_size),
                          keep_trained=o["keep_trained"])  # fmt: skip
    return _summary("bitnet", r)
