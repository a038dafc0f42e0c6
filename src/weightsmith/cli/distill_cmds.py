"""Commands of the `distill` group (registered on import by weightsmith.cli.main).

``distill --teacher T --student S --data D -o OUT`` trains (the group itself runs when no
subcommand is given: its options are the ones of :data:`train_command`, attached below);
``distill cache --teacher T --data D -o CACHE`` builds an offline teacher cache.
"""

from __future__ import annotations

import os

import click

from weightsmith.cli.common import (
    force_option,
    max_shard_size_option,
    progress_option,
    report_option,
)
from weightsmith.cli.groups import distill_cli
from weightsmith.distill.losses import DIVERGENCES
from weightsmith.io.sizes import format_size, parse_size

_PATH = click.Path()


@click.command("train")
@click.option("--teacher", type=_PATH, default=None, help="Teacher model folder (HF layout).")
@click.option("--student", type=_PATH, default=None, help="Student model folder to train.")
@click.option(
    "--data", type=_PATH, default=None, help=".txt, or .jsonl with text or prompt/completion."
)
@click.option("-o", "--out", type=_PATH, default=None, help="Output folder (model or adapter).")
@click.option(
    "--method",
    type=click.Choice(["kd", "seqkd"]),
    default="kd",
    show_default=True,
    help="kd: match the teacher's logits; seqkd: train on teacher-written completions.",
)
@click.option(
    "--teacher-cache",
    type=_PATH,
    default=None,
    help="Train from a `distill cache` folder instead of running the teacher.",
)
@click.option(
    "--loss",
    type=click.Choice(sorted(DIVERGENCES)),
    default="fkl",
    show_default=True,
    help="Divergence: fkl = KL(teacher‖student), rkl = KL(student‖teacher), jsd.",
)
@click.option(
    "--beta",
    type=float,
    default=0.5,
    show_default=True,
    help="jsd: 0 = forward KL, 1 = reverse KL.",
)
@click.option(
    "--temperature",
    type=float,
    default=2.0,
    show_default=True,
    help="Loss temperature τ (the divergence term is scaled by τ²).",
)
@click.option(
    "--alpha",
    type=float,
    default=0.5,
    show_default=True,
    help="Weight of the CE term: α·CE + (1−α)·τ²·divergence.",
)
@click.option("--steps", type=int, default=None, help="Optimizer steps (default: 1 epoch).")
@click.option("--epochs", type=float, default=None, help="Epochs over the data.")
@click.option("--lr", type=float, default=1e-4, show_default=True)
@click.option(
    "--batch-size",
    type=int,
    default=8,
    show_default=True,
    help="Sequences per micro-batch, over all processes.",
)
@click.option("--grad-accum", type=int, default=1, show_default=True)
@click.option("--seq-len", type=int, default=512, show_default=True)
@click.option("--warmup-steps", type=int, default=None, help="Default: 5% of the steps.")
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option(
    "--max-grad-norm", type=float, default=1.0, show_default=True, help="0 = no clipping."
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--optim", type=click.Choice(["adamw", "adamw8bit"]), default="adamw", show_default=True
)
@click.option("--lora-r", type=int, default=None, help="Train a LoRA of this rank (default: full).")
@click.option("--lora-alpha", type=float, default=None, help="LoRA scale numerator (default 2·r).")
@click.option("--lora-dropout", type=float, default=0.05, show_default=True)
@click.option(
    "--lora-targets",
    default="all-linear",
    show_default=True,
    help="all-linear, or a comma list such as q,v or q_proj,v_proj.",
)
@click.option("--rslora", is_flag=True, help="Scale the LoRA by alpha/sqrt(r).")
@click.option("--qlora", is_flag=True, help="Student base in NF4 (bitsandbytes); implies LoRA.")
@click.option("--save-adapter", is_flag=True, help="Save a PEFT adapter instead of merging.")
@click.option(
    "--gen-max-new-tokens",
    type=int,
    default=128,
    show_default=True,
    help="seqkd: length of each teacher completion.",
)
@click.option(
    "--gen-temperature",
    type=float,
    default=1.0,
    show_default=True,
    help="seqkd: sampling temperature (0 = greedy); unrelated to --temperature.",
)
@click.option(
    "--eval-data", type=_PATH, default=None, help="Held-out text: ppl and KL before/after."
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, ...")
@max_shard_size_option
@force_option
@progress_option
@report_option
def train_command(**o: object) -> dict:
    """Train STUDENT from TEACHER on DATA and write it to OUT."""
    from weightsmith.distill.config import DistillConfig, LoraSettings
    from weightsmith.distill.losses import LossConfig
    from weightsmith.distill.trainer import distill

    for flag in ("student", "data", "out"):
        if o[flag] is None:
            raise click.UsageError(f"missing --{flag}")
    lora = None
    if o["lora_r"] is not None or o["qlora"]:
        r = int(o["lora_r"] or 16)
        lora = LoraSettings(
            r=r,
            alpha=float(o["lora_alpha"] if o["lora_alpha"] is not None else 2 * r),
            dropout=float(o["lora_dropout"]),
            targets=str(o["lora_targets"]),
            rslora=bool(o["rslora"]),
        )
    try:
        loss = LossConfig(
            loss=o["loss"], beta=o["beta"], temperature=o["temperature"], alpha=o["alpha"]
        )
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    cfg = DistillConfig(
        method=o["method"], loss=loss, steps=o["steps"], epochs=o["epochs"], lr=o["lr"],
        batch_size=o["batch_size"], grad_accum=o["grad_accum"], seq_len=o["seq_len"],
        warmup_steps=o["warmup_steps"], weight_decay=o["weight_decay"],
        max_grad_norm=o["max_grad_norm"] or None, seed=o["seed"], optim=o["optim"], lora=lora,
        qlora=bool(o["qlora"]), save_adapter=bool(o["save_adapter"]),
        gen_max_new_tokens=o["gen_max_new_tokens"], gen_temperature=o["gen_temperature"],
    )  # fmt: skip
    result = distill(
        o["teacher"], o["student"], o["data"], o["out"], cfg,
        teacher_cache=o["teacher_cache"], eval_data=o["eval_data"], device=o["device"],
        force=o["force"], progress=o["progress"], max_shard_size=parse_size(o["max_shard_size"]),
    )  # fmt: skip
    line = (
        f"distilled {result.steps} steps ({result.train_tokens} tokens, "
        f"{result.tokens_per_s:.0f} tok/s), loss {result.losses[0]:.4f} -> "
        f"{result.losses[-1]:.4f}"
    )
    if result.eval_after:
        line += f", held-out ppl {result.eval_before['ppl']:.3f} -> {result.eval_after['ppl']:.3f}"
    if os.environ.get("RANK", "0") == "0":  # one summary under a multi-process launcher
        for note in result.notes:
            click.echo(f"note: {note}", err=True)
        click.echo(f"{line}, peak RSS {format_size(result.peak_rss)} -> {result.out}")
    return {"output": result.out, "result": result.to_dict()}


# The group runs training itself when no subcommand is given.
distill_cli.params.extend(train_command.params)


@distill_cli.command("cache")
@click.option("--teacher", type=_PATH, required=True, help="Teacher model folder.")
@click.option("--data", type=_PATH, required=True, help="The training data the cache is for.")
@click.option("-o", "--out", type=_PATH, required=True, help="Cache folder to write.")
@click.option("--top-k", type=int, default=32, show_default=True)
@click.option(
    "--temperature",
    type=float,
    default=2.0,
    show_default=True,
    help="τ of the cached log-probs; training must use the same --temperature.",
)
@click.option("--seq-len", type=int, default=512, show_default=True)
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--device", default="auto", show_default=True)
@max_shard_size_option
@force_option
@progress_option
@report_option
def cache_cmd(teacher: str, data: str, out: str, top_k: int, temperature: float, seq_len: int,
              batch_size: int, device: str, max_shard_size: str, force: bool,
              progress: bool) -> dict:  # fmt: skip
    """Run TEACHER once over DATA and store its top-k log-probs (+ tail mass) in OUT."""
    from weightsmith.distill.cache import CacheConfig, build_cache

    cfg = CacheConfig(top_k=top_k, temperature=temperature, seq_len=seq_len, batch_size=batch_size)
    info = build_cache(
        teacher, data, out, cfg, device=device, force=force, progress=progress,
        max_shard_size=parse_size(max_shard_size),
    )  # fmt: skip
    click.echo(
        f"cached top-{top_k} of {info['examples']} examples ({info['positions']} positions, "
        f"{format_size(info['bytes'])}, {info['bytes_per_position']} B/position) in "
        f"{info['wall_s']:.1f} s -> {info['output']}"
    )
    return {"output": info["output"], "result": info}
