"""Commands of the `eval` group (registered on import by weightsmith.cli.main)."""

from __future__ import annotations

import dataclasses
import json

import click

from weightsmith.cli import sensitivity_cmds  # noqa: F401  (registers eval sensitivity)
from weightsmith.cli.common import MODEL, progress_option, report_option
from weightsmith.cli.groups import eval_cli


@eval_cli.command("ppl")
@click.argument("model", type=MODEL)
@click.option("--data", required=True, type=click.Path(), help="Text file to evaluate on.")
@click.option("--seq-len", default=512, show_default=True, help="Window length in tokens.")
@click.option("--max-tokens", type=int, default=None, help="Evaluate only the first N tokens.")
@click.option(
    "--reference",
    type=MODEL,
    default=None,
    help="Also report mean KL(REF || MODEL) and top-1 agreement against this model.",
)
@click.option("--batch-size", default=1, show_default=True, help="Windows per forward pass.")
@click.option(
    "--device", default="auto", show_default=True, help="auto (CUDA when present), cpu, cuda:N."
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@progress_option
@report_option
def ppl_cmd(
    model: str,
    data: str,
    seq_len: int,
    max_tokens: int | None,
    reference: str | None,
    batch_size: int,
    device: str,
    as_json: bool,
    progress: bool,
) -> dict:
    """Perplexity of MODEL on a text file (non-overlapping windows, mean NLL). MODEL or
    --reference may be a .gguf file (dequantized to float32 with transformers' GGUF loader)."""
    import tempfile

    from weightsmith.core.device import select_device
    from weightsmith.evaluate import perplexity
    from weightsmith.ggml.reader import is_gguf, materialize_hf

    run_device = select_device(device)
    with tempfile.TemporaryDirectory(prefix="weightsmith-gguf-") as tmp:
        run_model, run_ref = model, reference
        if is_gguf(model):
            run_model = str(materialize_hf(model, f"{tmp}/model"))
        if reference is not None and is_gguf(reference):
            run_ref = str(materialize_hf(reference, f"{tmp}/reference"))
        r = perplexity(
            run_model,
            data,
            seq_len=seq_len,
            max_tokens=max_tokens,
            reference=run_ref,
            batch_size=batch_size,
            progress=progress,
            device=run_device,
        )
    r = dataclasses.replace(r, model=str(model), reference=reference)  # not the temp folder
    if as_json:
        click.echo(json.dumps(r.to_dict(), indent=2))
    else:
        line = f"ppl {r.ppl:.4f} over {r.tokens} tokens ({r.windows} windows of {r.seq_len})"
        if r.reference is not None:
            line += (
                f"; vs reference (ppl {r.reference_ppl:.4f}): KL {r.kl:.5f} nats/token, "
                f"top-1 agreement {100 * r.top1_agreement:.2f}%"
            )
        click.echo(f"{line} in {r.wall_s:.1f} s")
    return {"result": r.to_dict()}
