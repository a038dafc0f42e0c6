"""Option groups of the `distill` training commands, declared once and shared by the
subcommands (``distill kd|seqkd|sft|dpo|step-by-step``) and the bare ``distill`` command."""

from __future__ import annotations

from collections.abc import Callable

import click

from weightsmith.cli.common import (
    FINITE_FLOAT,
    MODEL,
    force_option,
    max_shard_size_option,
    progress_option,
    report_option,
)

PATH = click.Path()
Decorator = Callable[[Callable], Callable]


def options(*decorators: Decorator) -> Decorator:
    """One decorator applying ``decorators`` so that ``--help`` lists them in the order given."""

    def apply(fn: Callable) -> Callable:
        for decorate in reversed(decorators):
            fn = decorate(fn)
        return fn

    return apply


def model_options(data_help: str, *, required: bool = True) -> Decorator:
    """``--student``, ``--data``, ``-o/--out``; ``data_help`` says what this method reads."""
    return options(
        click.option("--student", type=MODEL, required=required,
                     help="Student model folder to train."),
        click.option("--data", type=PATH, required=required, help=data_help),
        click.option("-o", "--out", type=PATH, required=required,
                     help="Output folder (model, or adapter with --save-adapter)."),
    )  # fmt: skip


def eval_data_option(help: str) -> Decorator:
    return click.option("--eval-data", type=PATH, default=None, help=help)


def training_loop_options(*, grad_accum: bool = True) -> Decorator:
    """Steps, schedule, optimizer and batch shape of every training method. ``grad_accum``:
    whether the method accumulates gradients over micro-batches."""
    accum = [click.option("--grad-accum", type=int, default=1, show_default=True,
                          help="Micro-batches per optimizer step.")]  # fmt: skip
    return options(
        click.option("--steps", type=int, default=None, help="Optimizer steps (default: 1 epoch)."),
        click.option("--epochs", type=FINITE_FLOAT, default=None, help="Epochs over the data."),
        click.option("--lr", type=FINITE_FLOAT, default=1e-4, show_default=True,
                     help="Peak learning rate."),
        click.option("--batch-size", type=int, default=8, show_default=True,
                     help="Sequences per micro-batch, over all processes."),
        *(accum if grad_accum else []),
        click.option("--seq-len", type=int, default=512, show_default=True,
                     help="Tokens per training sequence."),
        click.option("--warmup-steps", type=int, default=None,
                     help="Linear warm-up before the cosine decay (default: 5% of the steps)."),
        click.option("--weight-decay", type=FINITE_FLOAT, default=0.0, show_default=True),
        click.option("--max-grad-norm", type=FINITE_FLOAT, default=1.0, show_default=True,
                     help="0 = no clipping."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--optim", type=click.Choice(["adamw", "adamw8bit"]), default="adamw",
                     show_default=True, help="adamw8bit: bitsandbytes' 8-bit AdamW."),
    )  # fmt: skip


lora_options = options(
    click.option("--lora-r", type=int, default=None, help="Train a LoRA of this rank (default: full)."),
    click.option("--lora-alpha", type=FINITE_FLOAT, default=None, help="LoRA scale numerator (default 2·r)."),
    click.option("--lora-dropout", type=FINITE_FLOAT, default=0.05, show_default=True),
    click.option("--lora-targets", default="all-linear", show_default=True,
                 help="all-linear, or a comma list such as q,v or q_proj,v_proj."),
    click.option("--rslora", is_flag=True, help="Scale the LoRA by alpha/sqrt(r)."),
    click.option("--qlora", is_flag=True, help="Student base in NF4 (bitsandbytes); implies LoRA."),
    click.option("--save-adapter", is_flag=True, help="Save a PEFT adapter instead of merging."),
)  # fmt: skip
"""LoRA / QLoRA student options (full fine-tuning when ``--lora-r`` and ``--qlora`` are absent)."""

run_options = options(
    click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, ..."),
    max_shard_size_option,
    force_option,
    progress_option,
    report_option,
)  # fmt: skip
"""Where the run happens and how it reports: device, shard size, --force, progress, --report."""

fsdp_option = click.option(
    "--fsdp",
    is_flag=True,
    default=False,
    help="Shard the student, an online teacher and the optimizer state with FSDP2 over the "
    "launched processes; an FSDP accelerate config implies it (docs/distill.md).",
)
"""kd/seqkd/sft: FSDP2 instead of plain data parallelism (``weightsmith.distill.fsdp``)."""

teacher_option = click.option(
    "--teacher",
    type=MODEL,
    default=None,
    help="Teacher model folder (HF layout); kd needs it unless --teacher-cache or --alpha 1.",
)
teacher_cache_option = click.option(
    "--teacher-cache",
    type=PATH,
    default=None,
    help="Train from a `distill cache` folder instead of running the teacher.",
)
temperature_option = click.option(
    "--temperature",
    type=FINITE_FLOAT,
    default=2.0,
    show_default=True,
    help="Loss temperature τ of the divergence term (scaled by τ²); CE is at τ = 1.",
)


# kd's loss mixing, shared by `distill kd` and the bare `distill` (its --loss differs)
kd_mixing_options = options(
    click.option(
        "--beta",
        type=FINITE_FLOAT,
        default=None,
        help="With --loss jsd|gkd: teacher weight β of the mixture M = β·p_T + (1−β)·p_S; "
        "0 = forward KL, 1 = reverse KL (default 0.5).",
    ),
    temperature_option,
    click.option(
        "--alpha",
        type=FINITE_FLOAT,
        default=0.5,
        show_default=True,
        help="Weight of the hard-label CE term: α·CE + (1−α)·τ²·divergence; 1 = CE only.",
    ),
)


def generation_options(*, hidden: bool = False) -> Decorator:
    """seqkd: how the teacher writes its completions (``hidden``: the bare command's
    deprecated spelling)."""
    return options(
        click.option("--gen-max-new-tokens", type=int, default=128, show_default=True,
                     hidden=hidden, help="Length of each teacher completion."),
        click.option("--gen-temperature", type=FINITE_FLOAT, default=1.0, show_default=True,
                     hidden=hidden, help="Teacher sampling temperature (0 = greedy)."),
    )  # fmt: skip


def dpo_options(*, hidden: bool = False) -> Decorator:
    """DPO's reference model and held-out pairs (β and the loss are declared by each command)."""
    return options(
        click.option("--ref", type=MODEL, default=None, hidden=hidden,
                     help="Reference model (default: --student)."),
        click.option("--ref-cache", type=PATH, default=None, hidden=hidden,
                     help="Folder of reference log-probs; reused when it matches, built when absent."),
        click.option("--label-smoothing", type=FINITE_FLOAT, default=0.0, show_default=True,
                     hidden=hidden, help="ε of the sigmoid loss (conservative DPO)."),
        click.option("--eval-fraction", type=FINITE_FLOAT, default=0.1, show_default=True,
                     hidden=hidden, help="Share of pairs held out for reward accuracy/margins."),
    )  # fmt: skip


# on-policy GKD (`distill kd --lmbda`): how often and how the student writes its own completions
gkd_options = options(
    click.option("--lmbda", type=FINITE_FLOAT, default=0.0, show_default=True,
                 help="On-policy GKD: fraction of micro-batches whose completions the student "
                 "samples itself (then scored by --teacher); 0 = off-policy KD."),
    click.option("--gen-temperature", type=FINITE_FLOAT, default=1.0, show_default=True,
                 help="With --lmbda: the student's sampling temperature (0 = greedy)."),
    click.option("--max-new-tokens", "--gen-max-new-tokens", "gen_max_new_tokens", type=int,
                 default=128, show_default=True,
                 help="With --lmbda: at most this many generated tokens per completion."),
    click.option("--gen-prompt-tokens", type=int, default=16, show_default=True,
                 help="With --lmbda on plain text: tokens of each window used as the prompt."),
)  # fmt: skip

# hidden-state KD (`distill kd --hidden-layers`): which layers, which loss, how much
hidden_options = options(
    click.option("--hidden-layers", default=None, metavar="S:T,...",
                 help="Hidden-state KD on student:teacher layer pairs, e.g. '1:2,2:4' (0 = "
                 "embeddings, L = last layer); a learned projection when widths differ."),
    click.option("--hidden-weight", type=FINITE_FLOAT, default=None,
                 help="With --hidden-layers: weight W of the hidden-state loss (default 1)."),
    click.option("--hidden-loss", type=click.Choice(["mse", "cosine"]), default=None,
                 help="With --hidden-layers: mse (default) or cosine (1 − cos)."),
)  # fmt: skip


gold_options = options(
    click.option("--gold-matched-weight", type=FINITE_FLOAT, default=None,
                 help="With --loss gold: weight w_m of JSD_β over the tokens both vocabularies "
                 "share (renormalised over them; default 1)."),
    click.option("--gold-unmatched-weight", type=FINITE_FLOAT, default=None,
                 help="With --loss gold: weight w_u of the sorted L1 (ULD) over the other "
                 "tokens (default 1)."),
    click.option("--gold-map", type=click.Choice(["exact", "prefix"]), default=None,
                 help="With --loss gold: teacher -> student tokens by equal text (exact, GOLD's; "
                 "default) or by the student's longest token that begins it (prefix)."),
)  # fmt: skip
