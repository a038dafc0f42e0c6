"""The training behind every `distill` spelling: :func:`run_training`, the bare command
(:data:`legacy_command`) and :func:`run_bare`, the group's own action. Imports no command group,
so the group can import it.

Each subcommand declares only the options its method reads, so an option means one thing
(``--beta`` is the JSD mixture under ``kd --loss jsd`` and β under ``dpo``). The bare
``distill --teacher T --student S --data D -o OUT`` runs ``distill kd`` and keeps the old
spelling ``--method M`` (deprecated), where ``--alpha`` and ``--beta`` still mean what they
meant per method. Every spelling ends in :func:`run_training`, so they train identically.
"""

from __future__ import annotations

import os

import click
from click.core import ParameterSource

from weightsmith.cli.distill_options import (
    dpo_options,
    eval_data_option,
    fsdp_option,
    generation_options,
    kd_mixing_options,
    lora_options,
    model_options,
    run_options,
    teacher_cache_option,
    teacher_option,
    training_loop_options,
)
from weightsmith.distill import DISTILL_METHODS, DIVERGENCES, DPO_LOSSES
from weightsmith.io.sizes import format_size, parse_size

TRAINING_METHODS = tuple(DISTILL_METHODS)  # the registry: a new method is a --method choice
KD_DATA = ".txt, or .jsonl with text or prompt/completion (loss on the completion only)."
PPL_EVAL = "Held-out text: perplexity before/after."


def run_training(method: str, given: dict) -> dict:
    """Build the configs of ``method`` from command options and train. Options a command does
    not declare take the bare command's defaults, so every spelling builds the same config."""
    from weightsmith.distill import DistillConfig, distill

    o = {**_LEGACY_DEFAULTS, **given}
    for flag in ("student", "data", "out"):
        if o[flag] is None:
            raise click.UsageError(f"missing --{flag}")
    loss, dpo = _loss_settings(method, o)
    cfg = DistillConfig(
        method=method, loss=loss, steps=o["steps"], epochs=o["epochs"], lr=o["lr"],
        batch_size=o["batch_size"], grad_accum=o["grad_accum"], seq_len=o["seq_len"],
        warmup_steps=o["warmup_steps"], weight_decay=o["weight_decay"],
        max_grad_norm=o["max_grad_norm"] or None, seed=o["seed"], optim=o["optim"],
        lora=_lora(o), qlora=bool(o["qlora"]), save_adapter=bool(o["save_adapter"]),
        gen_max_new_tokens=o["gen_max_new_tokens"], gen_temperature=o["gen_temperature"],
        dpo=dpo, sbs_alpha=o["alpha"], **_kd_extras(o),
    )  # fmt: skip
    result = distill(
        o["teacher"], o["student"], o["data"], o["out"], cfg,
        teacher_cache=o["teacher_cache"], eval_data=o["eval_data"], device=o["device"],
        force=o["force"], progress=o["progress"], max_shard_size=parse_size(o["max_shard_size"]),
        ref=o["ref"], ref_cache=o["ref_cache"], fsdp=o.get("fsdp") is True,
    )  # fmt: skip
    if os.environ.get("RANK", "0") == "0":  # one summary under a multi-process launcher
        for note in result.notes:
            click.echo(f"note: {note}", err=True)
        click.echo(f"{_summary(result)}, peak RSS {format_size(result.peak_rss)} -> {result.out}")
    return {"output": result.out, "result": result.to_dict()}


def _kd_extras(o: dict) -> dict:
    """Options only `distill kd` declares (on-policy GKD, hidden-state KD); absent under the
    other spellings."""
    from weightsmith.distill.hidden import HiddenSettings, parse_layer_pairs

    extras = {k: o[k] for k in ("lmbda", "gen_prompt_tokens") if o.get(k) is not None}
    if o.get("hidden_layers") is not None:
        extras["hidden"] = HiddenSettings(
            parse_layer_pairs(str(o["hidden_layers"])),
            weight=1.0 if o["hidden_weight"] is None else float(o["hidden_weight"]),
            loss=str(o["hidden_loss"] or "mse"),
        )
    elif o.get("hidden_weight") is not None or o.get("hidden_loss") is not None:
        raise click.UsageError("--hidden-weight and --hidden-loss need --hidden-layers")
    gold = {k: o.get(f"gold_{k}") for k in ("matched_weight", "unmatched_weight", "map")}
    if o.get("loss") == "gold":
        from weightsmith.distill.gold import GoldSettings

        extras["gold"] = GoldSettings(**{("vocab_map" if k == "map" else k): v
                                         for k, v in gold.items() if v is not None})  # fmt: skip
    elif any(v is not None for v in gold.values()):
        raise click.UsageError("--gold-matched-weight, --gold-unmatched-weight and --gold-map "
                               "need --loss gold")  # fmt: skip
    return extras


def _lora(o: dict):
    from weightsmith.distill import LoraSettings

    if o["lora_r"] is None and not o["qlora"]:
        return None
    r = int(o["lora_r"] or 16)
    return LoraSettings(
        r=r,
        alpha=float(o["lora_alpha"] if o["lora_alpha"] is not None else 2 * r),
        dropout=float(o["lora_dropout"]),
        targets=str(o["lora_targets"]),
        rslora=bool(o["rslora"]),
    )


def _loss_settings(method: str, o: dict):
    """The ``LossConfig`` and (dpo) ``DpoSettings``; ``--loss``/``--beta`` belong to DPO
    under dpo and to the divergence otherwise."""
    from weightsmith.distill import DpoSettings, LossConfig

    dpo = None
    loss_name, beta = o["loss"], o["beta"]
    if method == "dpo":
        if loss_name in DIVERGENCES:
            raise click.BadParameter(f"--loss {loss_name} is a kd divergence; dpo takes "
                                     f"{'|'.join(sorted(DPO_LOSSES))}")  # fmt: skip
        dpo = DpoSettings(
            beta=0.1 if beta is None else beta, loss=loss_name or "sigmoid",
            label_smoothing=o["label_smoothing"], eval_fraction=o["eval_fraction"],
        )  # fmt: skip
        loss_name, beta = None, None
    elif loss_name in DPO_LOSSES:
        raise click.BadParameter(f"--loss {loss_name} is a dpo loss (use it with `distill dpo`)")
    try:
        loss = LossConfig(
            loss=loss_name or "fkl", beta=0.5 if beta is None else beta,
            temperature=o["temperature"], alpha=1.0 if method == "dpo" else o["alpha"],
        )  # fmt: skip
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    return loss, dpo


def _summary(result) -> str:
    line = (
        f"distilled {result.steps} steps ({result.train_tokens} tokens, "
        f"{result.tokens_per_s:.0f} tok/s), loss {result.losses[0]:.4f} -> "
        f"{result.losses[-1]:.4f}"
    )
    a, b = result.eval_before, result.eval_after
    if b and "reward_accuracy" in b:
        line += (
            f", held-out reward accuracy {a['reward_accuracy']:.2f} -> {b['reward_accuracy']:.2f}"
            f" (margin {b['reward_margin']:.4f}, {b['pairs']} pairs)"
        )
    elif b and "accuracy" in b:
        line += f", held-out answer accuracy {b['accuracy']:.3f}"
    elif b:
        line += f", held-out ppl {a['ppl']:.3f} -> {b['ppl']:.3f}"
    return line


# -- the bare command: `distill --teacher T ...` == `distill kd ...`, plus the old --method ------


@click.command("distill")
@model_options(KD_DATA, required=False)
@teacher_option
@teacher_cache_option
@click.option(
    "--method",
    type=click.Choice(TRAINING_METHODS),
    default="kd",
    hidden=True,
    help="Deprecated: use the subcommand `distill METHOD`.",
)
@click.option(
    "--loss",
    type=click.Choice(sorted(DIVERGENCES) + sorted(DPO_LOSSES)),
    default=None,
    metavar=f"[{'|'.join(sorted(DIVERGENCES))}]",  # the dpo losses: deprecated --method dpo
    help="Divergence (default fkl): fkl = KL(teacher‖student), rkl = KL(student‖teacher), jsd.",
)
@kd_mixing_options
@eval_data_option("Held-out text: perplexity and KL to the teacher before/after.")
@training_loop_options()
@lora_options
@generation_options(hidden=True)
@dpo_options(hidden=True)
@fsdp_option
@run_options
def legacy_command(**o: object) -> dict:
    """The bare ``distill``: ``distill kd``, or the method of the deprecated ``--method``."""
    ctx = click.get_current_context()
    explicit = ctx.get_parameter_source("method") is not ParameterSource.DEFAULT
    if explicit and os.environ.get("RANK", "0") == "0":
        renamed = " (--alpha is --label-weight there)" if o["method"] == "step-by-step" else ""
        click.echo(f"note: `distill --method {o['method']}` is deprecated; use "
                   f"`distill {o['method']}`{renamed}", err=True)  # fmt: skip
    return run_training(str(o.pop("method")), o)


_LEGACY_DEFAULTS = {p.name: p.default for p in legacy_command.params}


def run_bare(ctx: click.Context, options: dict) -> None:
    """The `distill` group's own action: train when no subcommand is given; refuse options
    written before a subcommand (``distill --steps 3 sft``), which would be ignored."""
    if ctx.invoked_subcommand is None:
        legacy_command.callback(**options)
        return
    given = [p.opts[-1] for p in ctx.command.params if ctx.get_parameter_source(p.name)
             not in (ParameterSource.DEFAULT, None)]  # fmt: skip
    if "--method" in given:
        raise click.UsageError(f"--method is the old spelling of the subcommand: write "
                               f"`distill {ctx.invoked_subcommand} ...` without it")  # fmt: skip
    if given:
        raise click.UsageError(
            f"{', '.join(given)} must come after the subcommand: "
            f"distill {ctx.invoked_subcommand} {given[0]} ..."
        )
