"""Triton, or stand-ins when the optional ``kernels`` extra is not installed.

Kernel modules write ``@triton.jit`` and ``tl.constexpr`` at import time. Without Triton
those names resolve to ``_Missing``, which lets the decorators pass functions through
unchanged, so ``import edgeseq.kernels`` and the ``_ref`` twins work everywhere; the
launchers call ``require_triton`` before touching the GPU side.
"""

from __future__ import annotations

import os

from edgeseq.errors import RuntimeUnavailableError


class _Missing:
    """Any attribute is another stand-in; a call with one function returns it unchanged."""

    def __getattr__(self, name: str) -> _Missing:
        return self

    def __call__(self, *args, **kwargs):
        if len(args) == 1 and callable(args[0]) and not kwargs:
            return args[0]
        return self


try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # the `kernels` extra is optional
    triton = tl = _Missing()
    HAS_TRITON = False


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def require_triton() -> None:
    if not HAS_TRITON:
        raise RuntimeUnavailableError("Triton is not installed; pip install 'edgeseq[kernels]' or use the _ref path")


def next_pow2(n: int, floor: int = 16) -> int:
    """The block that covers ``n``: a power of two, at least ``floor`` (tl.dot needs 16)."""
    return max(floor, 1 << max(n - 1, 0).bit_length())
