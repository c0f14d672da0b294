"""Kernel tests run on a GPU when there is one, else through Triton's CPU interpreter
(chosen in tests/conftest.py, before anything imports triton). Tests of the Triton path
skip when Triton (the optional ``kernels`` extra) is not installed.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch


def _patch_interpreter() -> None:
    """Two gaps in Triton 3.6's interpreter, closed so that it computes what a GPU does:

    - a scalar argument is a 1-element array that it passes to int(), which numpy >= 2.4
      refuses (triton-lang/triton#9171, fixed upstream after 3.6): read the element;
    - fp32 -> bf16 casts truncate (or, asked for RTNE, can carry into the exponent's wrong
      bit), where the GPU rounds to nearest even: convert through torch.

    Each patch applies only where the original is the one it was written against.
    """
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    original_patch, original_convert = interpreter._patch_lang_tensor, interpreter._convert_float

    def patch_lang_tensor(tensor, scope):
        original_patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    def convert_float(input, input_dtype, output_dtype, rounding_mode):
        if input_dtype.primitive_bitwidth == 32 and output_dtype.name == "bf16":  # torch rounds as the GPU does
            return torch.from_numpy(input.view(np.float32)).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        return original_convert(input, input_dtype, output_dtype, rounding_mode)

    if original_patch.__name__ == "_patch_lang_tensor":
        interpreter._patch_lang_tensor = patch_lang_tensor
    if original_convert.__name__ == "_convert_float":
        interpreter._convert_float = convert_float


if os.environ.get("TRITON_INTERPRET") == "1":
    _patch_interpreter()


@pytest.fixture
def triton_kernels(monkeypatch):
    """Route the custom ops to the Triton kernels, on the CPU through the interpreter."""
    pytest.importorskip("triton")
    monkeypatch.setenv("EDGESEQ_KERNELS_ON_CPU", "1")
