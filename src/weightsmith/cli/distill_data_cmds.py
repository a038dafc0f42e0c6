"""The data commands of `distill`: ``cache`` (offline teacher top-k log-probs), ``generate``
(teacher completions), ``feedback`` (AI-feedback preference pairs) and ``rationales``."""

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
from weightsmith.cli.groups import distill_cli
from weightsmith.io.sizes import format_size, parse_size

_PATH = click.Path()


@distill_cli.command("cache")
@click.option("--teacher", type=MODEL, required=True, help="Teacher model folder.")
@click.option("--data", type=_PATH, required=True, help="The training data the cache is for.")
@click.option("-o", "--out", type=_PATH, required=True, help="Cache folder to write.")
@click.option("--top-k", type=int, default=32, show_default=True)
@click.option(
    "--temperature",
    type=FINITE_FLOAT,
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
        click.option("--temperature", type=FINITE_FLOAT, default=0.0, show_default=True,
                     help="0 = greedy; above 0 samples (seeded, resumable)."),
        click.option("--top-p", type=FINITE_FLOAT, default=1.0, show_default=True),
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
@click.option("--teacher", type=MODEL, required=True, help="Model that writes the completions.")
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
    from weightsmith.distill.feedback import (
        FeedbackConfig,
        check_feedback_output,
        collect_feedback,
        load_judge,
    )

    check_feedback_output(prompts, out, force)  # before the judge (user code) is imported
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
@click.option("--teacher", type=MODEL, required=True, help="Model that writes the rationales.")
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
