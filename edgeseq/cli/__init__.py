"""The ``edgeseq`` command line (``edgeseq.cli.common`` holds the group and its helpers;
each ``*_commands`` module adds its commands to it)."""

import os
import sys

from edgeseq.cli.common import INTERRUPTED, main

# Register the commands (import for side effects).
from edgeseq.cli import deploy_commands, model_commands, target_commands  # noqa: F401  isort: skip

__all__ = ["main", "run"]


def run() -> None:
    """The ``edgeseq`` executable: ``main``, leaving with exit code 130 after an interrupt.

    Under full-suite load an export interrupted and cleaned up here still ended with -2 (CPython
    re-raising SIGINT at exit, as it does after a KeyboardInterrupt it counts as unhandled; the
    likely trigger is the interrupt landing inside a C extension's call into Python, not
    confirmed). So an interrupted run leaves directly, after flushing its output."""
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
