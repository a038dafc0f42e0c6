"""What every command shares: one-line errors, exit codes, ``--report``, SIGTERM cleanup."""

from __future__ import annotations

import functools
import gc
import importlib
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from weightsmith.core.report import check_report_path, peak_rss_bytes, write_report
from weightsmith.errors import ConfigError, OutputError, PickleRefusedError, WeightsmithError

EXIT_ERROR = 1  # bad input, failed write: the message says what and where
EXIT_INTERNAL = 3  # a bug: rerun with --debug for the traceback


def debug_enabled() -> bool:
    return os.environ.get("WEIGHTSMITH_DEBUG", "") not in ("", "0")


def _on_sigterm(signum: int, frame: object) -> None:
    # Turn a CI job's SIGTERM into an exception so writers clean their temp dirs up.
    raise KeyboardInterrupt


class OneLineUsageError(click.ClickException):
    """A command line click refused (unknown option or command, missing argument, bad value),
    shown as every other bad input is: ``error: <command>: <what>`` on one line, exit 1 (click
    itself prints its usage block and exits 2)."""

    exit_code = EXIT_ERROR

    def __init__(self, e: click.UsageError) -> None:
        where = e.ctx.command_path if e.ctx is not None else ""
        message = " ".join(e.format_message().split())
        super().__init__(f"{where}: {message}" if where else message)

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


def one_line_usage(e: click.UsageError) -> click.ClickException:
    """The error to raise for a refused command line (a bare group's help stays click's)."""
    if isinstance(e, click.exceptions.NoArgsIsHelpError):
        return e
    return OneLineUsageError(e)


class OneLineParse:
    """Mixed into commands and groups: what their parsing refuses is a one-line error."""

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        try:
            return super().make_context(*args, **kwargs)
        except click.UsageError as e:
            raise one_line_usage(e) from e


class WsCommand(OneLineParse, click.Command):
    """A command that records itself, so errors can be worded for the command at hand. A
    command that takes a model (a :data:`MODEL` parameter) also gets ``--download``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        takes_model = any(isinstance(p.type, ModelPath) for p in self.params)
        if takes_model and not any(p.name == "download" for p in self.params):
            download_option(self)

    def invoke(self, ctx: click.Context) -> Any:
        ctx.meta["weightsmith_command"] = ctx
        return super().invoke(ctx)


class WsGroup(OneLineParse, click.Group):
    """A click group whose commands fail with ``error: <one line>`` and a non-zero exit.

    ``lazy_modules``: the modules that register this group's commands (and ``lazy_setup``, run
    after them), imported the first time a command or the parameters are looked up, so a
    command only pays for its own imports (``merge run`` never imports distillation or
    quantization code)."""

    command_class = WsCommand
    lazy_modules: tuple[str, ...] = ()
    lazy_setup: Callable[[], None] | None = None
    _lazy_loaded = False

    def load_lazy(self) -> None:
        if not self._lazy_loaded:
            self._lazy_loaded = True
            for module in self.lazy_modules:
                importlib.import_module(module)
            if self.lazy_setup is not None:
                self.lazy_setup()

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        self.load_lazy()
        return super().get_command(ctx, cmd_name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self.load_lazy()
        return super().list_commands(ctx)

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        self.load_lazy()
        return super().get_params(ctx)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The console-script entry (tests call ``main`` instead). Every object the imports
        made (torch's, about 10^5) is frozen out of the collector before the command runs, so
        no collection during the command scans them again (0.06 s of a short command), and
        what the command made is frozen once it is done, so Python's shutdown skips collecting
        it (about half a second)."""
        gc.freeze()
        try:
            return super().__call__(*args, **kwargs)
        finally:
            gc.freeze()

    def invoke(self, ctx: click.Context) -> Any:
        previous = signal.getsignal(signal.SIGTERM)
        try:
            signal.signal(signal.SIGTERM, _on_sigterm)
        except ValueError:  # not in the main thread (e.g. some test runners)
            previous = None
        try:
            return super().invoke(ctx)
        except PickleRefusedError as e:
            remedy = _pickle_remedy(ctx.meta.get("weightsmith_command"), e.path)
            _fail(e.with_remedy(remedy), EXIT_ERROR)
        except WeightsmithError as e:
            _fail(str(e), EXIT_ERROR)
        except click.UsageError as e:  # an unknown subcommand, a callback's bad value
            raise one_line_usage(e) from e
        except (click.ClickException, click.exceptions.Exit, click.Abort, KeyboardInterrupt):
            raise
        except Exception as e:
            if debug_enabled():
                raise
            _fail(
                f"internal error: {type(e).__name__}: {e} "
                "(set WEIGHTSMITH_DEBUG=1 for the traceback)",
                EXIT_INTERNAL,
            )
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)


def _pickle_remedy(ctx: click.Context | None, path: object) -> str:
    """How to get past a refused pickle with the command that was run."""
    if ctx is not None and any(p.name == "allow_pickle" for p in ctx.command.params):
        return (
            f"pass --allow-pickle to `{ctx.command_path}` to load it with "
            "torch.load(weights_only=True), or convert it to safetensors at the source"
        )
    return (
        "this command does not load pickles; convert it first with "
        f"`weightsmith convert --allow-pickle {path} -o NEW` (it loads with "
        "torch.load(weights_only=True)) and pass NEW"
    )


def _fail(message: str, code: int) -> None:
    first_line = message.strip().splitlines()[0] if message.strip() else "failed"
    click.echo(f"error: {first_line}", err=True)
    sys.exit(code)


class ModelPath(click.Path):
    """A model reference: a local checkpoint path (used as given when it exists), or a hub
    id ``org/name[@revision]`` resolved to its Hugging Face cache snapshot (offline unless
    ``--download``; see :mod:`weightsmith.io.hub`). Every command's model arguments use it,
    so this is the one place the CLI turns a reference into a checkpoint path."""

    name = "model"

    def __init__(self, adapters: bool = False) -> None:
        super().__init__()
        self.adapters = adapters  # MODEL+ADAPTER allowed: both halves resolved

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        from weightsmith.io.hub import resolve_model_reference

        if not isinstance(value, str):
            return super().convert(value, param, ctx)
        if self.adapters and "+" in value and not Path(value).expanduser().exists():
            model, _, adapter = value.partition("+")
            adapter = resolve_model_reference(adapter, adapter=True)
            return f"{resolve_model_reference(model)}+{adapter}"
        return super().convert(resolve_model_reference(value), param, ctx)


MODEL = ModelPath()
MODEL_OR_FOLD = ModelPath(adapters=True)  # also MODEL+ADAPTER (a LoRA folded in first)


def _allow_download(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
    """``--download`` is eager (parsed before the model arguments it applies to); it sets
    ``WEIGHTSMITH_DOWNLOAD=1`` for this command (and the recipe steps it starts)."""
    from weightsmith.io.hub import DOWNLOAD_ENV

    if value and not ctx.resilient_parsing:
        before = os.environ.get(DOWNLOAD_ENV)
        os.environ[DOWNLOAD_ENV] = "1"

        def restore() -> None:
            if before is None:
                os.environ.pop(DOWNLOAD_ENV, None)
            else:
                os.environ[DOWNLOAD_ENV] = before

        ctx.call_on_close(restore)
    return value


def download_option(fn: Callable) -> Callable:
    return click.option(
        "--download",
        is_flag=True,
        is_eager=True,
        expose_value=False,
        callback=_allow_download,
        help="Download hub models (org/name[@revision]) missing from the Hugging Face cache "
        "(default: offline; also WEIGHTSMITH_DOWNLOAD=1).",
    )(fn)


def report_option(fn: Callable) -> Callable:
    """Add ``--report PATH``: a JSON report of the command, written on success and failure."""

    @click.option(
        "--report",
        "report_path",
        type=click.Path(dir_okay=False),
        default=None,
        help="Also write a machine-readable JSON report here (for CI).",
    )
    @functools.wraps(fn)
    def wrapper(*args: Any, report_path: str | None = None, **kwargs: Any) -> Any:
        ctx = click.get_current_context()
        command = ctx.command_path
        if report_path:
            check_report_path(report_path)  # before any work, not after it
        start = time.perf_counter()
        try:
            result = fn(*args, **kwargs)
        except (WeightsmithError, Exception) as e:
            if report_path:
                report = {
                    **ctx.meta.get("weightsmith_report", {}),
                    "command": command,
                    "ok": False,
                    "error": str(e).splitlines()[0] if str(e) else type(e).__name__,
                    "wall_s": round(time.perf_counter() - start, 3),
                    "peak_rss": peak_rss_bytes(),
                }
                try:
                    write_report(report_path, report)
                except WeightsmithError as report_error:  # the command's error comes first
                    click.echo(f"warning: {report_error}", err=True)
            raise
        if report_path:
            body = result if isinstance(result, dict) else {}
            report = {
                "command": command,
                "ok": True,
                "wall_s": round(time.perf_counter() - start, 3),
                "peak_rss": peak_rss_bytes(),
                **body,
            }
            try:
                write_report(report_path, report)
            except WeightsmithError as e:  # exit 1 (CI must notice), saying the work is done
                raise OutputError(f"{e} (the command itself succeeded)") from None
        return result

    return wrapper


class FiniteFloat(click.ParamType):
    """A float option that refuses nan and ±inf at parse time, before any work (a NaN
    learning rate or scale would train or write non-finite weights)."""

    name = "float"

    def convert(self, value, param, ctx):
        if isinstance(value, float) and math.isfinite(value):
            return value
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number):  # bad input: exit 1 and one line, like the other checks
            name = max(param.opts, key=len) if param is not None else "value"
            raise ConfigError(f"{name}: {value!r} is not a finite number")
        return number


FINITE_FLOAT = FiniteFloat()


def _quiet_libraries(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
    """``--no-progress`` also silences transformers' and the hub's own bars ("Loading
    weights") and every other library's tqdm bar (compressed-tensors' "Decompressing model",
    accelerate's), for this command only. transformers is not imported for it (a second of
    start-up that data-free commands never need): imported later, it starts from the hub's
    setting."""
    if not value:
        _quiet_tqdm(ctx)
        from huggingface_hub.utils import (
            are_progress_bars_disabled,
            disable_progress_bars,
            enable_progress_bars,
        )

        hub_was = not are_progress_bars_disabled()
        tf = sys.modules.get("transformers.utils.logging")
        tf_was = tf.is_progress_bar_enabled() if tf is not None else hub_was
        disable_progress_bars()
        if tf is not None:
            tf.disable_progress_bar()

        def restore() -> None:
            if hub_was:
                enable_progress_bars()
            tf_now = sys.modules.get("transformers.utils.logging")
            if tf_now is not None and tf_was:
                tf_now.enable_progress_bar()

        ctx.call_on_close(restore)
    return value


def _quiet_tqdm(ctx: click.Context) -> None:
    """Every tqdm bar created during the command is disabled (``disable=True``), whoever
    creates it; the class is restored when the command ends."""
    import tqdm.std

    cls = tqdm.std.tqdm
    original = cls.__init__

    def quiet_init(self, *args, **kwargs) -> None:
        kwargs["disable"] = True
        original(self, *args, **kwargs)

    cls.__init__ = quiet_init
    ctx.call_on_close(lambda: setattr(cls, "__init__", original))


def progress_option(fn: Callable) -> Callable:
    return click.option(
        "--progress/--no-progress",
        default=True,
        show_default=True,
        callback=_quiet_libraries,
        help="Show a progress bar on stderr.",
    )(fn)


def force_option(fn: Callable) -> Callable:
    return click.option(
        "--force", is_flag=True, help="Replace OUT if it exists (atomically, at the end)."
    )(fn)


def max_shard_size_option(fn: Callable) -> Callable:
    return click.option(
        "--max-shard-size",
        default="5GB",
        show_default=True,
        help="Largest shard file to write (e.g. 2GB, 500MB, 4GiB).",
    )(fn)


def allow_pickle_option(fn: Callable) -> Callable:
    return click.option(
        "--allow-pickle",
        is_flag=True,
        help="Accept pytorch_model.bin checkpoints (loaded with torch.load(weights_only=True)).",
    )(fn)


def calibration_options(fn: Callable) -> Callable:
    """``--calib``, ``--calib-samples``, ``--seq-len`` and ``--device`` of the calibrated commands
    (quantize, prune), declared once."""
    for opt in reversed(
        [
            click.option(
                "--calib",
                type=click.Path(),
                default=None,
                help="Calibration text (.txt or .jsonl); default: weightsmith's built-in "
                "calibration mix (stories, explanations, chat, math, code, docs, several "
                "languages; ~355 kB). Needs --calib-samples x --seq-len tokens.",
            ),
            click.option(
                "--calib-samples", default=128, show_default=True, help="Calibration windows."
            ),
            click.option(
                "--seq-len", default=512, show_default=True, help="Tokens per calibration window."
            ),
            click.option(
                "--device",
                default="cpu",
                show_default=True,
                help="Where calibration runs: cpu, cuda, cuda:N, or auto (CUDA when present).",
            ),
        ]
    ):
        fn = opt(fn)
    return fn


def note_builtin_calibration() -> None:
    """Say on stderr that calibration uses the built-in mix (no ``--calib``)."""
    from weightsmith.core.calibration_data import BUILTIN_SOURCE

    click.echo(
        f"note: no --calib given: calibrating on weightsmith's built-in mix ({BUILTIN_SOURCE}: "
        "stories, explanations, chat, math, code, docs, several languages)",
        err=True,
    )


def moe_options(fn: Callable) -> Callable:
    """``--min-expert-tokens`` and ``--calibrate-all-experts`` of the calibrated commands on
    mixture-of-experts models (docs/moe.md)."""
    fn = click.option(
        "--calibrate-all-experts",
        is_flag=True,
        help="MoE: feed every expert every calibration token (weighted by its routing "
        "weight) instead of only the tokens its router sends it.",
    )(fn)
    return click.option(
        "--min-expert-tokens",
        type=click.IntRange(min=0),
        default=32,
        show_default=True,
        help="MoE: an expert routed fewer calibration tokens falls back to RTN (quantize) "
        "or magnitude (wanda); listed in --report. With 0, only experts routed no token do.",
    )(fn)
