"""Errors a user can cause. Each message is one line that says what to do next.

The CLI prints ``str(error)`` without a traceback and exits with ``error.exit_code``:
2 for a user error, 1 for a failed validation (``ValidationFailedError``), 130 when
interrupted (Ctrl-C or SIGTERM; ``edgeseq.cli.common``).
"""

from __future__ import annotations


class EdgeseqError(Exception):
    """Base of every user-facing error."""

    exit_code = 2


class ConfigError(EdgeseqError):
    """A model configuration value is missing or out of range."""


class WidthError(EdgeseqError):
    """A width spec cannot be honoured by the model's nested granularity."""


class OutputExistsError(EdgeseqError):
    """An output path is taken and overwriting was not asked for (or what is there is not
    something edgeseq may replace)."""


class OutputPathError(EdgeseqError):
    """An output path cannot be written (a parent is a file, no permission, a read-only
    or virtual file system)."""


class CheckpointError(EdgeseqError):
    """A checkpoint is missing, corrupt, unsafe or does not match its config."""


class UnknownFormatError(CheckpointError):
    """No registered checkpoint family recognises the input."""


class RuntimeUnavailableError(EdgeseqError):
    """A runtime backend (TensorRT, a CUDA device) is not installed or not reachable."""


class UsageError(EdgeseqError, ValueError):
    """A Python API was called with arguments it cannot use (a ``ValueError`` too, for
    callers that catch those)."""


class BackendError(EdgeseqError, RuntimeError):
    """A compiled kernel or driver call failed on the device."""
