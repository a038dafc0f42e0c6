"""The training commands of `distill`, one per method: ``distill kd|seqkd|sft|dpo|step-by-step``.

Each subcommand declares only the options its method reads, so an option means one thing
(``--beta`` is the JSD mixture under ``kd --loss jsd`` and β under ``dpo``). The bare
``distill`` and the deprecated ``--method`` live in :mod:`weightsmith.cli.distill_train`;
every spelling ends in :func:`~weightsmith.cli.distill_train.run_training`.
"""

from __future__ import annotations

import click

from weightsmith.cli import distill_data_cmds  # noqa: F401  (registers cache, generate, ...)
from weightsmith.cli.common import FINITE_FLOAT, MODEL
from weightsmith.cli.distill_options import (
    dpo_options,
    eval_data_option,
    fsdp_option,
    generation_options,
    gkd_options,
    gold_options,
    hidden_options,
    kd_mixing_options,
    lora_options,
    model_options,
    run_options,
    teacher_cache_option,
    teacher_option,
    training_loop_options,
)
from weightsmith.cli.distill_train import KD_DATA, PPL_EVAL, run_training
from weightsmith.cli.groups import distill_cli
from weightsmith.distill import DIVERGENCES, DPO_LOSSES

# -- one subcommand per method ----------------------------------------------------------------


@distill_cli.command("kd", no_args_is_help=True)
@model_options(KD_DATA)
@teacher_option
@teacher_cache_option
@click.option(
    "--loss",
    type=click.Choice(sorted(DIVERGENCES)),
    default="fkl",
    show_default=True,
    help="fkl = KL(teacher‖student), rkl = KL(student‖teacher), jsd = generalized JSD "
    "(continuous in β), gkd = TRL GKDTrainer's generalized JSD, uld = Universal Logit "
    "Distillation (sorted-probability L1; works across tokenizers, online --teacher only), "
    "gold = TRL GOLD's hybrid across tokenizers: JSD_β on the tokens both share by text, "
    "ULD on the rest (online --teacher only; jsd with one tokenizer).",
)
@kd_mixing_options
@gold_options
@gkd_options
@hidden_options
@eval_data_option("Held-out text: perplexity and KL to the teacher before/after.")
@training_loop_options()
@lora_options
@fsdp_option
@run_options
def kd_cmd(**o: object) -> dict:
    """Logit KD: match the teacher's next-token distributions (online, or from `distill cache`)."""
    if o["beta"] is not None and o["loss"] not in ("jsd", "gkd", "gold"):
        raise click.UsageError(f"--beta is the JSD mixture weight: use it with --loss jsd, gkd, gold "
                               f"(not {o['loss']})")  # fmt: skip
    return run_training("kd", o)


@distill_cli.command("seqkd", no_args_is_help=True)
@model_options(".jsonl of prompts (prompt or prompt/completion), or .txt (each window's start).")
@click.option("--teacher", type=MODEL, required=True,
              help="Teacher that writes the completions (any tokenizer).")  # fmt: skip
@generation_options()
@eval_data_option(PPL_EVAL)
@training_loop_options()
@lora_options
@fsdp_option
@run_options
def seqkd_cmd(**o: object) -> dict:
    """Sequence-level KD: the teacher completes the prompts, the student learns them by CE."""
    return run_training("seqkd", o)


@distill_cli.command("sft", no_args_is_help=True)
@model_options(".jsonl of prompt/completion (e.g. from `distill generate`; CE on the "
               "completion only), or .txt.")  # fmt: skip
@eval_data_option(PPL_EVAL)
@training_loop_options()
@lora_options
@fsdp_option
@run_options
def sft_cmd(**o: object) -> dict:
    """Distilled SFT (dSFT): cross-entropy on teacher-written completions; no teacher runs."""
    return run_training("sft", o)


@distill_cli.command("dpo", no_args_is_help=True)
@model_options(".jsonl of prompt/chosen/rejected (e.g. from `distill feedback`).")
@click.option(
    "--loss",
    type=click.Choice(sorted(DPO_LOSSES)),
    default="sigmoid",
    show_default=True,
    help="sigmoid (DPO), ipo (on per-token average log-probs), hinge (SLiC).",
)
@click.option(
    "--beta",
    type=FINITE_FLOAT,
    default=0.1,
    show_default=True,
    help="DPO's β: how far the student may move from the reference.",
)
@dpo_options()
@training_loop_options()
@lora_options
@run_options
def dpo_cmd(**o: object) -> dict:
    """DPO on preference pairs against a reference model (default: the student itself)."""
    if o["label_smoothing"] and o["loss"] != "sigmoid":
        raise click.UsageError(f"--label-smoothing is ε of the sigmoid loss: use it with "
                               f"--loss sigmoid (not {o['loss']})")  # fmt: skip
    return run_training("dpo", o)


@distill_cli.command("step-by-step", no_args_is_help=True)
@model_options(".jsonl of question/rationale/answer (e.g. from `distill rationales`).")
@click.option(
    "--label-weight",
    type=FINITE_FLOAT,
    default=0.5,
    show_default=True,
    help="α of α·L_label + (1−α)·L_rationale: weight of the predict: (answer) task.",
)
@eval_data_option(".jsonl of question/answer: accuracy of greedy predict: answers before/after.")
@training_loop_options(grad_accum=False)
@lora_options
@run_options
def step_by_step_cmd(label_weight: float, **o: object) -> dict:
    """Distilling step-by-step: train predict: → answer and explain: → rationale together."""
    return run_training("step-by-step", {**o, "alpha": label_weight})
