"""``weightsmith eval tasks MODEL --tasks t1,t2``: lm-evaluation-harness scores."""

from __future__ import annotations

import click

from weightsmith.cli.common import MODEL, report_option
from weightsmith.cli.groups import eval_cli


@eval_cli.command("tasks")
@click.argument("model", type=MODEL)
@click.option("--tasks", required=True, help="lm-eval task names, comma-separated.")
@click.option("--limit", type=int, default=None, help="Score only the first N items per task.")
@click.option(
    "--include-path",
    type=click.Path(),
    default=None,
    help="Folder of extra lm-eval task YAML files (e.g. local tasks over local JSONL).",
)
@click.option(
    "--reference",
    type=MODEL,
    default=None,
    help="Also score this model (for the max_score_drop recipe gate).",
)
@click.option("--batch-size", type=int, default=1, show_default=True)
@click.option("--device", default="auto", show_default=True)
@report_option
def tasks_cmd(model: str, tasks: str, limit: int | None, include_path: str | None,
              reference: str | None, batch_size: int, device: str) -> dict:  # fmt: skip
    """Score MODEL on lm-evaluation-harness tasks (needs `pip install 'weightsmith[eval]'`).
    MODEL is anything transformers loads (plain safetensors, compressed-tensors, ...)."""
    from weightsmith.evaluate.lm_tasks import evaluate_tasks

    r = evaluate_tasks(model, tasks, limit=limit, include_path=include_path,
                       batch_size=batch_size, device=device, reference=reference)  # fmt: skip
    parts = []
    for task in r.tasks:
        metric = r.primary.get(task)
        value = r.scores.get(task, {}).get(metric) if metric else None
        part = f"{task} {metric} {value:.4f}" if value is not None else f"{task} (no score)"
        ref = r.reference_scores.get(task, {}).get(metric) if metric else None
        parts.append(part + (f" (reference {ref:.4f})" if ref is not None else ""))
    click.echo(f"{'; '.join(parts)} in {r.wall_s:.1f} s")
    return {"result": r.to_dict()}
