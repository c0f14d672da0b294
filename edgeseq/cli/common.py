"""The command group and the helpers every command module shares.

The ``edgeseq`` command line is presentation only.

Commands load through ``edgeseq.zoo``, compute through the core modules and print a rich
table, or exactly one JSON document with ``--json``. An ``EdgeseqError`` (bad input) is
printed as one ``error: ...`` line on stderr and exits with its ``exit_code``; anything
else is a bug and raises. Heavy modules (torch, onnxruntime) are imported inside the
commands that need them, so ``edgeseq run`` works on a device without PyTorch.
"""

from __future__ import annotations

import json
import signal
import threading
from typing import Any

import click

from edgeseq import __version__
from edgeseq.errors import EdgeseqError

DEFAULT_MODEL = "mamba2-tiny"
INTERRUPTED = 130  # the shell's code for a run ended by Ctrl-C; SIGTERM ends a run the same way


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


class EdgeseqGroup(click.Group):
    """Turns a user error into one stderr line and its exit code, with no traceback, and an
    interrupt (Ctrl-C, SIGTERM) into exit 130 after every atomic writer has cleaned up."""

    def invoke(self, ctx: click.Context) -> Any:
        main_thread = threading.current_thread() is threading.main_thread()  # only it may set handlers
        previous = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None
        try:
            return super().invoke(ctx)
        except EdgeseqError as e:
            message = " ".join(str(e).split()) or type(e).__name__
            click.echo(f"error: {message}", err=True)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            if main_thread:  # one interrupt is enough: a second must not cut the cleanup short
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
            click.echo("interrupted; nothing was written", err=True)
            ctx.exit(INTERRUPTED)
        finally:
            if main_thread and signal.getsignal(signal.SIGTERM) is _interrupt:
                signal.signal(signal.SIGTERM, previous)


def _emit_json(doc: dict[str, Any]) -> None:
    click.echo(json.dumps(doc, indent=2))


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _count(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} K" if n >= 1e3 else str(n)


def _trained(metadata: dict[str, Any]) -> str:
    trained = metadata.get("trained")
    return "trained" if trained is True else "untrained" if trained is False else "trained: unknown"


model_argument = click.argument("model", default=DEFAULT_MODEL, metavar="[MODEL]")
json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of tables.")


@click.group(cls=EdgeseqGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgeseq")
def main() -> None:
    """Deploy nested Mamba2 and Mamba2/attention hybrid models to edge devices.

    MODEL is a built-in name (mamba2-tiny, the default, or hybrid-tiny) or a checkpoint
    directory in any known format.

    \b
    Example:
      edgeseq inspect
      edgeseq extract --width 0.5 -o out/mamba2-tiny-w0.5
    """
