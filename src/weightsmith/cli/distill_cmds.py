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
from weightsmith.distill.dpo import DPO_LOSSES
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
    type=click.Choice(["kd", "seqkd", "sft", "dpo", "step-by-step"]),
    default="kd",
    show_default=True,
    help="kd: match the teacher's logits; seqkd: the teacher writes completions, then CE; "
    "sft: CE on the prompt/completion pairs of --data (dSFT); dpo: preference pairs "
    "(prompt/chosen/rejected) against --ref; step-by-step: rationales (predict:/explain:).",
)
@click.option("--ref", type=_PATH, default=None, help="dpo: reference model (default: --student).")
@click.option(
    "--ref-cache",
    type=_PATH,
    default=None,
    help="dpo: folder of reference log-probs; reused when it matches, built when absent.",
)
@click.option(
    "--label-smoothing", type=float, default=0.0, show_default=True, help="dpo sigmoid: ε."
)
@click.option(
    "--eval-fraction",
    type=float,
    default=0.1,
    show_default=True,
    help="dpo: share of pairs held out for reward accuracy/margins.",
)
@click.option(
    "--teacher-cache",
    type=_PATH,
    default=None,
    help="Train from a `distill cache` folder instead of running the teacher.",
)
@click.option(
    "--loss",
    type=click.Choice(sorted(DIVERGENCES) + sorted(DPO_LOSSES)),
    default=None,
    help="kd divergence (default fkl): fkl = KL(teacher‖student), rkl = KL(student‖teacher), "
    "jsd; dpo loss (default sigmoid): sigmoid, ipo, hinge.",
)
@click.option(
    "--beta",
    type=float,
    default=None,
    help="jsd: 0 = forward KL, 1 = reverse KL (default 0.5); dpo: β (default 0.1).",
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
    help="Weight of the CE term: α·CE + (1−α)·τ²·divergence; step-by-step: "
    "α·L_label + (1−α)·L_rationale.",
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
    from weightsmith.distill.dpo import DpoSettings
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
    dpo = None
    loss_name, beta = o["loss"], o["beta"]
    if o["method"] == "dpo":
        if loss_name in DIVERGENCES:
            raise click.BadParameter(f"--loss {loss_name} is a kd divergence; dpo takes "
                                     f"{'|'.join(sorted(DPO_LOSSES))}")  # fmt: skip
        dpo = DpoSettings(
            beta=0.1 if beta is None else beta, loss=loss_name or "sigmoid",
            label_smoothing=o["label_smoothing"], eval_fraction=o["eval_fraction"],
        )  # fmt: skip
        loss_name, beta = None, None
    elif loss_name in DPO_LOSSES:
        raise click.BadParameter(f"--loss {loss_name} is a dpo loss (use it with --method dpo)")
    try:
        loss = LossConfig(
            loss=loss_name or "fkl", beta=0.5 if beta is None else beta,
            temperature=o["temperature"], alpha=1.0 if o["method"] == "dpo" else o["alpha"],
        )  # fmt: skip
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    cfg = DistillConfig(
        method=o["method"], loss=loss, steps=o["steps"], epochs=o["epochs"], lr=o["lr"],
        batch_size=o["batch_size"], grad_accum=o["grad_accum"], seq_len=o["seq_len"],
        warmup_steps=o["warmup_steps"], weight_decay=o["weight_decay"],
        max_grad_norm=o["max_grad_norm"] or None, seed=o["seed"], optim=o["optim"], lora=lora,
        qlora=bool(o["qlora"]), save_adapter=bool(o["save_adapter"]),
        gen_max_new_tokens=o["gen_max_new_tokens"], gen_temperature=o["gen_temperature"],
        dpo=dpo, sbs_alpha=o["alpha"],
    )  # fmt: skip
    result = distill(
        o["teacher"], o["student"], o["data"], o["out"], cfg,
        teacher_cache=o["teacher_cache"], eval_data=o["eval_data"], device=o["device"],
        force=o["force"], progress=o["progress"], max_shard_size=parse_size(o["max_shard_size"]),
        ref=o["ref"], ref_cache=o["ref_cache"],
    )  # fmt: skip
    line = (
        f"distilled {result.steps} steps ({result.train_tokens} tokens, "
        f"{result.tokens_per_s:.0f} tok/s), loss {result.losses[0]:.4f} -> "
        f"{result.losses[-1]:.4f}"
    )
    if result.eval_after and "reward_accuracy" in result.eval_after:
        a, b = result.eval_before, result.eval_after
        line += (
            f", held-out reward accuracy {a['reward_accuracy']:.2f} -> {b['reward_accuracy']:.2f}"
            f" (margin {b['reward_margin']:.4f}, {b['pairs']} pairs)"
        )
    elif result.eval_after and "accuracy" in result.eval_after:
        line += f", held-out answer accuracy {result.eval_after['accuracy']:.3f}"
    elif result.eval_after:
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


def _generation_options(fn):
    for opt in reversed([
        click.option("--max-new-tokens", type=int, default=128, show_default=True),
        click.option("--temperature", type=float, default=0.0, show_default=True,
                     help="0 = greedy; above 0 samples (seeded, resumable)."),
        click.option("--top-p", type=float, default=1.0, show_default=True),
        click.option("--batch-size", type=int, default=8, show_default=True),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--device", default="auto", show_default=True),
    ]):  # fmt: skip
        fn = opt(fn)
    return fn


def _gen_config(o: dict):
    from weightsmith.distill.generate import GenerateConfig

    return GenerateConfig(max_new_tokens=o["max_new_tokens"], temperature=o["temperature"],
                          top_p=o["top_p"], batch_size=o["batch_size"], seed=o["seed"])  # fmt: skip


@distill_cli.command("generate")
@click.option("--teacher", type=_PATH, required=True, help="Model that writes the completions.")
@click.option("--prompts", type=_PATH, required=True, help='.jsonl of {"prompt": ...}.')
@click.option("-o", "--out", type=_PATH, required=True, help=".jsonl of prompt/completion.")
@_generation_options
@force_option
@progress_option
@report_option
def generate_cmd(teacher: str, prompts: str, out: str, force: bool, progress: bool,
                 device: str, **o: object) -> dict:  # fmt: skip
    """TEACHER completes every prompt (batched; re-running resumes an interrupted run)."""
    from weightsmith.distill.generate import generate_file

    info = generate_file(teacher, prompts, out, _gen_config(o), device=device, force=force,
                         progress=progress)  # fmt: skip
    click.echo(
        f"generated {info['generated']} completions ({info['resumed']} resumed), "
        f"{info['rows']} rows in {info['wall_s']:.1f} s -> {info['output']}"
    )
    return {"output": info["output"], "result": info}


@distill_cli.command("feedback")
@click.option("--prompts", type=_PATH, required=True, help='.jsonl of {"prompt": ...}.')
@click.option("--candidates", required=True, help="Comma list of model folders that answer.")
@click.option(
    "--judge",
    required=True,
    help="module:function, file.py:function, or llm:MODEL (rating prompt).",
)
@click.option("-o", "--out", type=_PATH, required=True, help=".jsonl of prompt/chosen/rejected.")
@click.option("--k", type=int, default=1, show_default=True, help="Answers per candidate/prompt.")
@_generation_options
@force_option
@progress_option
@report_option
def feedback_cmd(prompts: str, candidates: str, judge: str, out: str, k: int, force: bool,
                 progress: bool, device: str, **o: object) -> dict:  # fmt: skip
    """Candidates answer PROMPTS, JUDGE scores them: best = chosen, a random lower = rejected."""
    from weightsmith.distill.feedback import FeedbackConfig, collect_feedback, load_judge

    fn = load_judge(judge)
    cfg = FeedbackConfig(k=k, generation=_gen_config(o), seed=int(o["seed"]))
    cands = [c.strip() for c in candidates.split(",") if c.strip()]
    info = collect_feedback(prompts, cands, fn, out, cfg, device=device, force=force,
                            progress=progress)  # fmt: skip
    click.echo(
        f"{info['pairs']} preference pairs from {info['prompts']} prompts "
        f"({info['ties_dropped']} ties dropped, {info['generated']} answers generated) "
        f"in {info['wall_s']:.1f} s -> {info['output']}"
    )
    return {"output": info["output"], "result": info}


@distill_cli.command("rationales")
@click.option("--teacher", type=_PATH, required=True, help="Model that writes the rationales.")
@click.option("--data", type=_PATH, required=True, help='.jsonl of {"question", "answer"?}.')
@click.option("-o", "--out", type=_PATH, required=True, help=".jsonl with rationale + answer.")
@click.option("--template", type=_PATH, default=None, help="File with a {question} prompt.")
@click.option("--few-shot", type=int, default=0, show_default=True,
              help="Use the first K rows with a gold rationale as demonstrations.")  # fmt: skip
@_generation_options
@force_option
@progress_option
@report_option
def rationales_cmd(teacher: str, data: str, out: str, template: str | None, few_shot: int,
                   force: bool, progress: bool, device: str, **o: object) -> dict:  # fmt: skip
    """TEACHER explains and answers every question; disagreeing rationales are dropped."""
    from pathlib import Path

    from weightsmith.distill.rationales import (
        DEFAULT_TEMPLATE,
        RationaleConfig,
        generate_rationales,
    )
    from weightsmith.errors import ConfigError

    text = DEFAULT_TEMPLATE
    if template is not None:
        if not Path(template).is_file():
            raise ConfigError(f"{template}: template file not found")
        text = Path(template).read_text(encoding="utf-8").rstrip("\n")
    cfg = RationaleConfig(template=text, few_shot=few_shot, generation=_gen_config(o))
    info = generate_rationales(teacher, data, out, cfg, device=device, force=force,
                               progress=progress)  # fmt: skip
    click.echo(
        f"kept {info['kept']} of {info['questions']} rationales "
        f"({info['dropped_disagreeing']} disagreeing, {info['dropped_unparsed']} unparsed "
        f"dropped; {info['resumed']} resumed) in {info['wall_s']:.1f} s -> {info['output']}"
    )
    return {"output": info["output"], "result": info}
