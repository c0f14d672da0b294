"""Export flavors: what a graph may contain, and so which runtimes can run it.

A flavor fixes the opset and the extra op domains of a graph. Layer kinds emit their
pieces per flavor (``LayerKind.graph``); only the Mamba2 kind's conv and SSM core differ
between them (``edgeseq.kinds.mamba2.graph``), so the graph code around them never
branches on the backend.

- ``portable``: basic ops, opset 18 (ORT mobile and older ORT, CoreML/NNAPI/XNNPACK EPs,
  TensorRT's ONNX parser). Quantizing can raise it: int4 needs opset 21, the first with
  int4 tensors (both its forms, ``edgeseq.export.quantize``); fp16 and int8 keep 18.
- ``opset27``: the standard ``CausalConvWithState`` and ``LinearAttention`` ops.
- ``contrib``: onnxruntime's ``com.microsoft`` twins of those two ops, native kernels
  where onnxruntime 1.32 runs the standard ones as their (slow) function bodies: the
  fastest graphs on onnxruntime, and only there.
- ``tensorrt``: TensorRT plugin nodes (op type = plugin name, ``plugin_namespace`` and
  ``plugin_version`` attributes, as TensorRT's ONNX parser expects), each one Triton
  kernel; contract and definitions in ``edgeseq.export.trt_plugins``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edgeseq.choices import FLAVORS as FLAVOR_NAMES
from edgeseq.export.trt_plugins import DOMAIN as TRT_DOMAIN
from edgeseq.export.trt_plugins import NAMESPACE as TRT_NAMESPACE
from edgeseq.export.trt_plugins import PLUGINS as TRT_PLUGINS
from edgeseq.export.trt_plugins import VERSION as TRT_VERSION

Op = tuple[str, str, int]  # (domain, op type, version); "" is ai.onnx


@dataclass(frozen=True)
class Flavor:
    name: str
    opset: int
    domains: dict[str, int] = field(default_factory=dict, hash=False)  # extra op domains -> versions
    plugin_domain: str = ""  # the domain of plugin nodes (plugin flavors)
    plugin_attrs: dict[str, str] = field(default_factory=dict, hash=False)  # attributes every plugin node carries
    ops: tuple[Op, ...] = ()  # what its graphs add to the portable flavor's basic ops (a runtime must parse them)


FLAVORS = {
    f.name: f
    for f in (
        Flavor("portable", 18),
        Flavor("opset27", 27, ops=(("", "CausalConvWithState", 27), ("", "LinearAttention", 27))),
        Flavor("tensorrt", 18, {TRT_DOMAIN: 1}, TRT_DOMAIN,
               {"plugin_namespace": TRT_NAMESPACE, "plugin_version": TRT_VERSION},
               tuple((TRT_DOMAIN, name, 1) for name in TRT_PLUGINS)),
        Flavor("contrib", 21, {"com.microsoft": 1},
               ops=(("com.microsoft", "CausalConvWithState", 1), ("com.microsoft", "LinearAttention", 1))),
    )
}  # fmt: skip
assert tuple(FLAVORS) == tuple(FLAVOR_NAMES), "edgeseq.choices.FLAVORS and the flavors defined here differ"
