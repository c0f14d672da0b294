"""The command group and the helpers every command module shares.

The ``edgeseq`` command line is presentation only.

Commands load through ``edgeseq.zoo``, compute through the core modules and print a rich
table, or exactly one JSON document with ``--json``. An ``EdgeseqError`` (bad input) is
printed as one ``error: ...`` line on stderr and exits with its ``exit_code``; anything
else is a bug and raises. Heavy modules (torch, onnxruntime) are imported inside the
commands that need them, so ``edgeseq run``, ``bench`` and ``validate --golden`` work on
a device with the runtime-only install (``pip install edgeseq``: no PyTorch, no onnx);
a command that needs the toolchain says so first, with ``require_toolchain``.
"""

from __future__ import annotations

import importlib.util
import json
import signal
import threading
from pathlib import Path
from typing import Any

import click
from rich import box

from edgeseq import __version__
from edgeseq.errors import EdgeseqError

DEFAULT_MODEL = "mamba2-tiny"
INTERRUPTED = 130  # the shell's code for a run ended by Ctrl-C; SIGTERM ends a run the same way
TOOLCHAIN_INSTALL = "pip install 'edgeseq[export]'"


class ToolchainMissingError(EdgeseqError):
    """A command needs the toolchain (PyTorch, onnx: the ``export`` extra), which this install lacks."""


def require_toolchain(command: str, *modules: str, instead: str | None = None) -> None:
    """Raise ToolchainMissingError, before any work, unless every module ``command`` needs
    (default: torch) is installed; ``instead`` names what works without them."""
    missing = [m for m in modules or ("torch",) if not _installed(m)]
    if missing:
        other = f"; {instead}" if instead else ""
        raise ToolchainMissingError(f"edgeseq {command} needs the toolchain ({', '.join(missing)} not installed): "
                                    f"{TOOLCHAIN_INSTALL}{other}")  # fmt: skip


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken install, or one a test hides
        return False


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
    if n < 1024:
        return f"{n} B"
    for unit in ("KiB", "MiB"):
        n /= 1024
        if n < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} GiB"


def _count(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} K" if n >= 1e3 else str(n)


def _trained(metadata: dict[str, Any]) -> str:
    trained = metadata.get("trained")
    return "trained" if trained is True else "untrained" if trained is False else "trained: unknown"


# Rich tables that stay readable in 80 columns (rich otherwise squeezes columns to a letter or
# two): a rule under the header, no edges, one space of padding between columns.
COMPACT_TABLE: dict[str, Any] = {
    "box": box.SIMPLE_HEAD,
    "collapse_padding": True,
    "pad_edge": False,
    "show_edge": False,
}

model_argument = click.argument("model", default=DEFAULT_MODEL, metavar="[MODEL]")
config_option = click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Config file for a model whose weights come apart from it (a training run's .pt): mamba_ssm config.json.",
)
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
