"""What every sa-export command shares: how errors become exit codes, and common options."""

from __future__ import annotations

import functools
import os
import signal
import sys
from pathlib import Path

import click
from rich.markup import escape

from sa_export.core.errors import SAExportError, Terminated
from sa_export.core.progress import console
from sa_export.core.signals import signals_as_interrupts

EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE, EXIT_ENVIRONMENT = 0, 1, 2, 3


def quiet_libraries() -> None:
    """Keep third-party chatter (tracer warnings, transformers notices) out of the user's terminal."""
    import logging
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # torch sets its loggers' levels when it is imported, after this (the CLI loads it
    # lazily): "-onnx" is TORCH_LOGS' way to keep torch.onnx's at ERROR.
    os.environ.setdefault("TORCH_LOGS", "-onnx")
    warnings.filterwarnings("ignore")
    for name in ("transformers", "torch.onnx", "onnxscript", "onnx_ir", "onnxruntime"):
        logging.getLogger(name).setLevel(logging.ERROR)


def handle_errors(func):
    """Turn every failure into one line on stderr and the documented exit code.

    SIGTERM and SIGHUP unwind like Ctrl-C (temporary output removed): exit 128 + signal.
    An unexpected exception prints its type and message; SA_EXPORT_DEBUG=1 shows the traceback.
    """

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            with signals_as_interrupts():
                return func(*args, **kwargs)
        except SAExportError as exc:
            console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
            sys.exit(exc.exit_code)
        except Terminated as exc:
            console.print(f"[red]terminated[/red] by {signal.Signals(exc.signum).name}: nothing was written")
            sys.exit(128 + exc.signum)
        except KeyboardInterrupt:
            console.print("[red]interrupted[/red]: nothing was written")
            sys.exit(130)
        except Exception as exc:
            if os.environ.get("SA_EXPORT_DEBUG"):
                raise
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            console.print(f"[red]error:[/red] unexpected {type(exc).__name__}: {escape(message)} (SA_EXPORT_DEBUG=1 shows the traceback)", soft_wrap=True)
            sys.exit(EXIT_CHECK_FAILED)

    return wrapper


def write_json(path: str | None, data: dict) -> None:
    """--json FILE, written atomically; ``-`` prints it on stdout (``echo_report`` then sent the report to stderr)."""
    if path == "-":
        import json

        click.echo(json.dumps(data, indent=2))
    elif path:
        from sa_export.core.atomic import disk_error, write_json_atomic

        try:
            write_json_atomic(Path(path), data)
        except OSError as exc:
            raise disk_error(exc, Path(path)) from None


def echo_report(lines: list[str], json_file: str | None) -> None:
    """The human report: on stdout, or on stderr when stdout carries the JSON (``--json -``)."""
    click.echo("\n".join(lines), err=json_file == "-")


def _writable_json_path(ctx, param, value):
    """Refuse a --json path that cannot be written before the work starts, not after it.

    The probe creates and removes a file where the JSON will go (or in the nearest folder
    that exists: the write makes the others): permission bits alone say nothing of
    read-only mounts, /proc or a root user."""
    if value is None or value == "-":
        return value
    path = Path(value)
    if path.is_dir():
        raise click.BadParameter(f"{value} is a directory; give a file path")
    from sa_export.core.atomic import nearest_existing_parent

    folder = nearest_existing_parent(path)
    if not folder.is_dir():
        raise click.BadParameter(f"cannot write {value}: {folder} is a file, not a folder")
    import tempfile

    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise click.BadParameter(f"cannot write {value}: {exc.strerror or exc} ({folder})") from None
    return value


class PositiveIntList(click.ParamType):
    """A comma-separated list of positive integers (--contexts 256,2048): click reports a bad one as a usage error (exit 2)."""

    name = "N,N,..."

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        try:
            values = [int(item) for item in str(value).split(",")]
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of integers, for example 256,2048,8192", param, ctx)
        if min(values) < 1:
            self.fail(f"{value!r}: give positive integers, for example 256,2048,8192", param, ctx)
        return values


POSITIVE_INTS = PositiveIntList()


def json_option(what: str):
    """--json FILE|-: ``what`` as JSON, the path checked for writing before the work starts."""
    return click.option(
        "--json", "json_file", type=click.Path(dir_okay=False, allow_dash=True), callback=_writable_json_path,
        help=f"Write {what} as JSON to this file ('-': on stdout, the report going to stderr).",
    )


span_option = click.option(
    "--span",
    "spans",
    multiple=True,
    required=True,
    metavar="A-B|L.G",
    help="Layers A..B (inclusive) reuse the probabilities of the last unshared layer before A. Repeatable. "
    "L.G shares part of layer L: the query heads of its KV group G (0-based) borrow, and its K cache "
    "keeps the other groups (one KV head's share of the layer's K cache saved per group; every graph takes it).",
)
anchor_option = click.option(
    "--anchor",
    "anchors",
    multiple=True,
    type=int,
    metavar="N",
    help="Anchor layer instead of the default (once for all spans, or once per span).",
)
force_option = click.option("--force", is_flag=True, help="Share across layers whose attention differs in kind.")
accept_keys_option = click.option(
    "--accept-unknown-config-keys",
    is_flag=True,
    help="Use a config.json that sets keys the installed transformers does not know (typically saved by a newer "
    "release) as if they were absent. Without it such a config is refused: the model built would differ from yours.",
)


def head_map_option(default: str = "identity", fitted: bool = True):
    """--head-map; ``fitted=False`` leaves out the modes fitted through the model (too slow to search with)."""
    from sa_export.core.choices import CALIBRATED_DEFAULT, FITTED_MODES, HEAD_MAP_MODES

    return click.option(
        "--head-map",
        type=click.Choice([mode for mode in HEAD_MAP_MODES if fitted or mode not in FITTED_MODES]),
        default=default,
        show_default=True,
        help=(
            "Which probabilities each shared head reads: identity (same head of the anchor), argmax (best anchor head), "
            "argmax-any (best head of any earlier unshared layer), mix (convex mixture of the best few, least squares), "
            "mix-anchor (the same over the anchor's heads only), mix-few (over the anchor and one more layer), "
            f"calibrated (= {CALIBRATED_DEFAULT}: at prefill each shared head is recomputed from its source's queries and K cache, "
            "so a prefill costs about what the unshared graph's does; the mixtures are more accurate, and on the GroupQueryAttention graph their prefill "
            "holds stored probabilities)"
            + (", fit (mix-few's layers, every head, weights fitted on the model's output by distillation: the most "
               "accurate, minutes on a CPU)" if fitted else "")
            + ". All but identity are fitted on calibration text."
        ),
    )


def fit_options(function):
    """--fit-steps and --lora-rank: how `--head-map fit` distills."""
    from sa_export.core.choices import FIT_STEPS, FIT_STEPS_WITH_CORRECTIONS

    function = click.option(
        "--lora-rank", type=click.IntRange(0, 256), default=0, show_default=True,
        help="With --head-map fit: also fit a rank-R correction (LoRA) of each shared layer's V and output projections, "
        "and of the Q and K projections of the layers they read from, with the maps, and fold it into those weights "
        "before export, so a decode step costs the same. 0: none.",
    )(function)
    return click.option(
        "--fit-steps", type=click.IntRange(1, 100_000), default=None,
        help=f"Steps of --head-map fit's distillation (4 chunks of 256 calibration tokens each). "
        f"Default: {FIT_STEPS}, or {FIT_STEPS_WITH_CORRECTIONS} with --lora-rank.",
    )(function)


def _calib_option(help_text: str):
    return click.option(
        "--calib", "calib_file", type=click.Path(), multiple=True, callback=lambda ctx, param, value: tuple(value) or None, help=help_text,
    )


calib_option = _calib_option(
    "Calibration text (default: the tail of the default text; with --lora-rank, also the tail of torch.nn.Module's "
    "source). Repeat it to calibrate on several domains: --calib-tokens from the tail of each. It replaces the default texts; "
    "--add-calib adds to them."
)
analyze_calib_option = _calib_option(
    "Calibration text (default: the tail of the default text): the maps and the span search read --calib-tokens of its tail. "
    "With --frontier, repeat it to search on several domains (a plan's cost is its mean or worst penalty over them, --search-cost)."
)
add_calib_option = click.option(
    "--add-calib", "add_calib", type=click.Path(), multiple=True,
    help="Calibrate on this text as well as on the default texts (or the --calib files): repeat it for several. "
    "--calib alone replaces the defaults.",
)
prefill_chunk_option = click.option(
    "--prefill-chunk", type=click.IntRange(0), default=512, show_default=True,
    help="Feed prompts in chunks of at most this many tokens (0: whole): bounds the attention probabilities a prefill holds.",
)
def memory_mode_option(what: str):
    """--memory: where ONNX Runtime's working memory comes from (``runtime.memory``)."""
    from sa_export.runtime.memory import MEMORY_MODES

    return click.option(
        "--memory", "memory_mode", type=click.Choice(list(MEMORY_MODES)), default="arena", show_default=True,
        help=f"Memory of {what}: " + "; ".join(f"{name}: {text}" for name, text in MEMORY_MODES.items()) + ".",
    )


def calib_tokens_option(function):
    """--calib-tokens; unset, each request takes its default (``texts.calib_tokens_for``)."""
    from sa_export.accuracy.texts import CALIB_TOKENS, LORA_CALIB_TOKENS

    return click.option(
        "--calib-tokens", type=click.IntRange(256), default=None,
        help=f"Calibration tokens (of each --calib file) [default: {CALIB_TOKENS}; {LORA_CALIB_TOKENS} with --lora-rank].",
    )(function)
