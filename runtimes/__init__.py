"""Runners (torch reference, onnxruntime, tensorrt) and the StreamingSession API.

Import-light: nothing here imports torch, onnxruntime or tensorrt. Each runner imports
its backend on activate(); ``edgeseq.runtimes.session`` and ``.ort_runner`` never import
torch, so an app can ship them with numpy, safetensors and onnxruntime only.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "Runner": "base",
    "FeedError": "base",
    "GraphIOError": "base",
    "InferenceError": "base",
    "RunnerNotActiveError": "base",
    "TorchRunner": "torch_runner",
    "OnnxRuntimeRunner": "ort_runner",
    "TensorRTRunner": "trt_runner",
    "StreamingSession": "session",
    "StateError": "session",
    "SessionError": "session",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
