"""Export flavors: what a graph may contain, and so which runtimes can run it.

A flavor fixes the opset and the extra op domains of a graph. Layer kinds emit their
pieces per flavor (``LayerKind.graph``); only the Mamba2 kind's conv and SSM core differ
between them (``edgeseq.kinds.mamba2.graph``), so the graph code around them never
branches on the backend.

- ``portable``: basic ops, opset 18 (ORT mobile and older ORT, CoreML/NNAPI/XNNPACK EPs,
  TensorRT's ONNX parser).
- ``opset27``: the standard ``CausalConvWithState`` and ``LinearAttention`` ops.
- ``tensorrt``: TensorRT plugin nodes (op type = plugin name, ``plugin_namespace`` and
  ``plugin_version`` attributes, as TensorRT's ONNX parser expects), each one Triton
  kernel; contract and definitions in ``edgeseq.export.trt_plugins``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edgeseq.choices import FLAVORS as FLAVOR_NAMES
from edgeseq.export.trt_plugins import DOMAIN as TRT_DOMAIN
from edgeseq.export.trt_plugins import NAMESPACE as TRT_NAMESPACE
from edgeseq.export.trt_plugins import VERSION as TRT_VERSION


@dataclass(frozen=True)
class Flavor:
    name: str
    opset: int
    domains: dict[str, int] = field(default_factory=dict, hash=False)  # extra op domains -> versions
    plugin_domain: str = ""  # the domain of plugin nodes (plugin flavors)
    plugin_attrs: dict[str, str] = field(default_factory=dict, hash=False)  # attributes every plugin node carries


FLAVORS = {
    f.name: f
    for f in (
        Flavor("portable", 18),
        Flavor("opset27", 27),
        Flavor("tensorrt", 18, {TRT_DOMAIN: 1}, TRT_DOMAIN,
               {"plugin_namespace": TRT_NAMESPACE, "plugin_version": TRT_VERSION}),
    )
}  # fmt: skip
assert tuple(FLAVORS) == tuple(FLAVOR_NAMES), "edgeseq.choices.FLAVORS and the flavors defined here differ"
