"""The ``edgeseq`` command line (``edgeseq.cli.common`` holds the group and its helpers;
each ``*_commands`` module adds its commands to it)."""

import os
import sys

from edgeseq.cli.common import INTERRUPTED, main

# Register the commands (import for side effects).
from edgeseq.cli import deploy_commands, model_commands, target_commands  # noqa: E402, F401  isort: skip

__all__ = ["main", "run"]


def run() -> None:
    """The ``edgeseq`` executable: ``main``, leaving with exit code 130 after an interrupt.

    An interrupt that lands while a C extension runs Python code (pybind11's eval) marks the
    interpreter as killed by SIGINT even once the command has handled it and cleaned up, and
    CPython then re-raises SIGINT at exit (code -2). So an interrupted run leaves directly."""
    try:
        main()
    except KeyboardInterrupt:  # one before a command started
        _leave_interrupted()
    except SystemExit as e:
        if e.code == INTERRUPTED:
            _leave_interrupted()
        raise


def _leave_interrupted() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(INTERRUPTED)
