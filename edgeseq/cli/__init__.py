"""The ``edgeseq`` command line (``edgeseq.cli.common`` holds the group and its helpers;
each ``*_commands`` module adds its commands to it)."""

from edgeseq.cli.common import main

# Register the commands (import for side effects).
from edgeseq.cli import deploy_commands, model_commands, target_commands  # noqa: E402, F401  isort: skip

__all__ = ["main"]
