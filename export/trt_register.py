"""Registering edgeseq's TensorRT plugins (``edgeseq.export.trt_plugins`` is their contract).

Needs TensorRT >= 10.9 (``tensorrt.plugin`` came in 10.6, ``aot_impl`` in 10.9), i.e.
JetPack 7 on Jetson; the definitions (``_trt_defs``) are imported only once TensorRT is
known to be there.
"""

from __future__ import annotations

from edgeseq.errors import RuntimeUnavailableError
from edgeseq.export.trt_plugins import MIN_TENSORRT

_registered: dict[str, int] = {}


def register(cc: int) -> None:
    """Register the three plugins with ``tensorrt.plugin`` for compute capability ``cc``
    (87 = Jetson Orin, 90 = H100). Idempotent for one cc: TensorRT keeps one creator per name."""
    if _registered:
        if _registered["cc"] != cc:
            raise RuntimeUnavailableError(
                f"edgeseq's TensorRT plugins are registered for sm_{_registered['cc']}; build sm_{cc} in a new process"
            )
        return
    try:
        import tensorrt as trt
    except ImportError:
        raise RuntimeUnavailableError("TensorRT is not installed; install tensorrt>=10.9 on the target") from None
    if tuple(int(v) for v in trt.__version__.split(".")[:2]) < MIN_TENSORRT or not hasattr(trt, "QuickPluginCreationRequest"):
        raise RuntimeUnavailableError(f"TensorRT {trt.__version__} has no AOT Python plugins; install tensorrt>=10.9")
    from edgeseq.export import _trt_defs

    _trt_defs.define(cc)
    _registered["cc"] = cc
