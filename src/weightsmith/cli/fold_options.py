"""The options of commands that take ``MODEL+ADAPTER`` references (a LoRA folded in)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import click


def lora_fold_options(fn: Callable) -> Callable:
    """``--lora-merge-cache`` / ``--lora-merge-dtype`` (mergekit's names), handed to the
    command as one ``folds`` mapping of the library call's keyword arguments."""

    @functools.wraps(fn)
    def wrapper(**kwargs: Any) -> Any:
        keys = ("lora_merge_cache", "lora_merge_dtype")
        return fn(folds={k: kwargs.pop(k) for k in keys}, **kwargs)

    wrapper = click.option(
        "--lora-merge-dtype",
        type=click.Choice(["bfloat16", "float16", "float32"]),
        default=None,
        help="Write the folded MODEL+ADAPTER models in this dtype (to --lora-merge-cache, "
        "else to a temporary folder beside OUT).",
    )(wrapper)
    return click.option(
        "--lora-merge-cache",
        default=None,
        type=click.Path(file_okay=False),
        help="Write the models that MODEL+ADAPTER references fold into here, and reuse them "
        "on the next run (default: fold each adapted tensor as it is read, writing nothing).",
    )(wrapper)
