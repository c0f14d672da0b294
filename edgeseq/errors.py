"""Errors a user can cause. Each message is one line that says what to do next.

The CLI prints ``str(error)`` without a traceback and exits with ``error.exit_code``.
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
    """An output path is taken and overwriting was not asked for."""


class CheckpointError(EdgeseqError):
    """A checkpoint is missing, corrupt, unsafe or does not match its config."""


class UnknownFormatError(CheckpointError):
    """No registered checkpoint family recognises the input."""


class RuntimeUnavailableError(EdgeseqError):
    """A runtime backend (TensorRT, a CUDA device) is not installed or not reachable."""
