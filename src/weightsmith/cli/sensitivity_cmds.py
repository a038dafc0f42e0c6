"""`weightsmith eval sensitivity`: KL to the original model with one unit quantized at a time
(registered on import by weightsmith.cli.eval_cmds)."""

from __future__ import annotations

import json

import click

from weightsmith.cli.common import MODEL, note_builtin_calibration, progress_option, report_option
from weightsmith.cli.groups import eval_cli

DEFAULT_SCHEMES = "w3g64,w4g128,w4g64,w8g128"


def sensitivity_options(fn):
    """``--schemes``, ``--samples``, ``--seq-len`` of the sensitivity measurement."""
    fn = click.option(
        "--schemes", default=DEFAULT_SCHEMES, show_default=True,
        help="Candidate schemes, w<bits>g<group>[a] comma-separated (a: asymmetric). A scheme "
        "whose group does not divide a unit's input width is skipped for that unit.",
    )(fn)  # fmt: skip
    fn = click.option(
        "--samples", type=click.IntRange(min=1), default=4, show_default=True,
        help="Calibration windows (one batched forward per unit and scheme).",
    )(fn)  # fmt: skip
    return click.option(
        "--seq-len", type=click.IntRange(min=2), default=128, show_default=True,
        help="Tokens per calibration window.",
    )(fn)  # fmt: skip


def format_row(name: str, kl: dict[str, float | None], width: int) -> str:
    cells = " ".join(f"{'-' if v is None else f'{v:.3e}':>10}" for v in kl.values())
    return f"{name:<{width}} {cells}"


def mean_bpw(report: dict, scheme: str) -> float:
    """Bits per weight of ``scheme`` averaged over the units it fits (weighted by params)."""
    fits = [u for u in report["units"] if scheme in u["schemes"]]
    bits = sum(u["params"] * u["schemes"][scheme]["bits_per_weight"] for u in fits)
    return bits / max(1, sum(u["params"] for u in fits))


@eval_cli.command("sensitivity")
@click.argument("model", type=MODEL)
@click.option("--calib", type=click.Path(), default=None,
              help="Calibration text (.txt or .jsonl); default: weightsmith's built-in "
              "calibration mix. Needs --samples x --seq-len tokens.")  # fmt: skip
@sensitivity_options
@click.option(
    "--by", type=click.Choice(["module", "layer", "type"]), default="module", show_default=True,
    help="Unit quantized at a time: each Linear, each decoder layer's Linears, or each module "
    "type (e.g. mlp.down_proj) across all layers.",
)  # fmt: skip
@click.option(
    "--device", default="auto", show_default=True, help="auto (CUDA when present), cpu, cuda:N."
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@progress_option
@report_option
def sensitivity_cmd(
    model: str, calib: str | None, schemes: str, samples: int, seq_len: int, by: str,
    device: str, as_json: bool, progress: bool,
) -> dict:  # fmt: skip
    """KL(original || quantized) of next-token distributions when only one unit of MODEL is
    quantized with RTN at each candidate scheme (the rest stays float32): which Linears
    tolerate fewer bits. Rows print as they are measured; --report keeps every figure."""
    from weightsmith.compress.sensitivity import checkpoint_sensitivity, parse_scheme_list

    candidates = parse_scheme_list(schemes)
    if calib is None:
        note_builtin_calibration()
    names = [str(s) for s in candidates]
    width = 40
    if progress and not as_json:
        click.echo(f"{'unit':<{width}} " + " ".join(f"{n:>10}" for n in names))

    def show(unit, kl) -> None:
        if progress and not as_json:
            click.echo(format_row(unit.name, kl, width))

    r = checkpoint_sensitivity(model, candidates, calib=calib, samples=samples,
                               seq_len=seq_len, by=by, on_unit=show, device=device)  # fmt: skip
    d = r.to_dict()
    if as_json:
        click.echo(json.dumps(d, indent=2))
    else:
        if not progress:
            click.echo(f"{'unit':<{width}} " + " ".join(f"{n:>10}" for n in names))
            for u in r.units:
                click.echo(format_row(u.name, r.kl[u.name], width))
        bpw = ", ".join(f"{n} {mean_bpw(d, n):.4g}" for n in names)
        click.echo(
            f"mean KL (nats/token) over {r.tokens} tokens ({r.windows} windows of {r.seq_len}), "
            f"{len(r.units)} units by {by}; bits/weight: {bpw}; {r.wall_s:.1f} s"
        )
    return {"result": d}
