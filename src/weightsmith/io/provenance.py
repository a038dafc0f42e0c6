"""``weightsmith.json``: what made an output (tool, version, command, config, inputs)."""

from __future__ import annotations

import datetime as _dt
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class WriteSummary:
    """What a committed output holds."""

    out: str
    shards: list[str]
    tensors: int
    total_size: int


def provenance_record(extra: dict, summary: WriteSummary) -> dict:
    """The provenance of a committed output: ``extra`` (method config, inputs) plus the
    tool, version, time, command line and a summary of what was written; models read from
    the Hugging Face cache are listed with their repository id and commit (``hub_models``)."""
    from weightsmith import __version__
    from weightsmith.io.hub import hub_models_in

    hub_models = hub_models_in(extra)

    return {
        "tool": "weightsmith",
        "version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "",
        **extra,
        **({"hub_models": hub_models} if hub_models else {}),
        "output": {
            "tensors": summary.tensors,
            "total_size": summary.total_size,
            "shards": summary.shards,
        },
    }
