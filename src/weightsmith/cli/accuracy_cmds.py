"""``weightsmith eval accuracy MODEL --data tasks.jsonl``: answer accuracy on a task file."""

from __future__ import annotations

import click

from weightsmith.cli.common import MODEL, report_option
from weightsmith.cli.groups import eval_cli


@eval_cli.command("accuracy")
@click.argument("model", type=MODEL)
@click.option("--data", type=click.Path(), required=True, help='.jsonl of {"question", "answer"}.')
@click.option(
    "--template",
    default="predict: {question}\n",
    show_default=True,
    help="Prompt around each question (step-by-step students answer `predict:`).",
)
@click.option("--max-new-tokens", type=int, default=16, show_default=True)
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--device", default="auto", show_default=True)
@report_option
def accuracy_cmd(model: str, data: str, template: str, max_new_tokens: int, batch_size: int,
                 device: str) -> dict:  # fmt: skip
    """Greedy answers of MODEL to the questions in DATA, scored against their answers."""
    from weightsmith.evaluate.accuracy import evaluate_accuracy

    res = evaluate_accuracy(model, data, template=template.replace("\\n", "\n"),
                            max_new_tokens=max_new_tokens, batch_size=batch_size,
                            device=device)  # fmt: skip
    click.echo(f"accuracy {res['accuracy']:.4f} ({res['correct']}/{res['total']}) "
               f"in {res['wall_s']:.1f} s")  # fmt: skip
    return {"result": res}
