"""TensorRT plugins for the ``tensorrt`` flavor's nodes: the contract and the definitions.

Three plugins, namespace ``edgeseq``, version ``1``; each is one Triton kernel of
``edgeseq.kernels`` compiled ahead of time to PTX (``edgeseq.kernels.aot``) for the
compute capability the engine is built for (sm_87 on Jetson Orin). The PTX, its name and
launch parameters go into the engine, so it runs with no Python on the device.

    EdgeseqSSDChunkState  x [b,t,h,p], dt [b,t,h], A [h], B [b,t,g,n], state [b,h,n,p]
                          -> a_cum [b,h,c*q], chunk_states [b,c,h,n,p], final_state [b,h,n,p]
    EdgeseqSSDChunkScan   x, dt, B, C [b,t,g,n], chunk_states, a_cum, D [h] -> y [b,t,h,p]
    EdgeseqSSDStep        xBC [b,k], dt [b,h], conv_state [b,k,w-1], conv_weight [k,w], conv_bias [k],
                          dt_bias [h], A [h], D [h], ssm_state [b,h,n,p]
                          -> y [b,h,p], conv_state [b,k,w-1], ssm_state [b,h,n,p]

c = ceil(t / q) chunks of q = chunk_size, k = h*p + 2*g*n conv channels, w = d_conv taps.
The scan's dt is after softplus and clamp; the step's dt is in_proj's raw output (the
kernel adds dt_bias, applies softplus and clamps to [dt_min, dt_max]). All tensors fp32.

``edgeseq.export.trt_register.register()`` needs TensorRT >= 10.9 (``tensorrt.plugin`` came in 10.6, ``aot_impl`` in
10.9), i.e. JetPack 7 on Jetson; it is imported only there. The node contract
(``PLUGINS``) is plain data, used by the exporter and by the onnxruntime binding that runs
these nodes without TensorRT (``edgeseq.runtimes.plugin_ops``).
"""

import math
from dataclasses import dataclass

NAMESPACE, VERSION, DOMAIN = "edgeseq", "1", "edgeseq.trt"
MIN_TENSORRT = (10, 9)


@dataclass(frozen=True)
class PluginSpec:
    kind: str  # the kernel in edgeseq.kernels.aot
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    int_attrs: tuple[str, ...]
    float_attrs: tuple[str, ...] = ()

    @property
    def attrs(self) -> tuple[str, ...]:
        return self.int_attrs + self.float_attrs


_SIZES = ("heads", "ngroups", "headdim", "d_state")
PLUGINS = {
    "EdgeseqSSDChunkState": PluginSpec(
        "chunk_state", ("x", "dt", "A", "B", "state"), ("a_cum", "chunk_states", "final_state"), (*_SIZES, "chunk_size")
    ),
    "EdgeseqSSDChunkScan": PluginSpec(
        "chunk_scan", ("x", "dt", "B", "C", "chunk_states", "a_cum", "D"), ("y",), (*_SIZES, "chunk_size")
    ),
    "EdgeseqSSDStep": PluginSpec(
        "step",
        ("xBC", "dt", "conv_state", "conv_weight", "conv_bias", "dt_bias", "A", "D", "ssm_state"),
        ("y", "conv_state_out", "ssm_state_out"),
        (*_SIZES, "d_conv"),
        ("dt_min", "dt_max"),
    ),
}


def plugin_dims(attrs: dict):
    """The kernel's baked-in sizes from a node's attributes."""
    from edgeseq.kernels.aot import PluginDims

    return PluginDims(
        heads=int(attrs["heads"]), groups=int(attrs["ngroups"]), headdim=int(attrs["headdim"]),
        d_state=int(attrs["d_state"]), chunk=int(attrs.get("chunk_size", 256)), d_conv=int(attrs.get("d_conv", 4)),
        dt_min=float(attrs.get("dt_min", 0.0)), dt_max=float(attrs.get("dt_max", math.inf)),
    )  # fmt: skip


def output_shapes(op: str, shapes: dict, attrs: dict, cdiv=lambda a, b: -(-a // b)) -> list:
    """A plugin's output shapes from its inputs' (``shapes`` by contract name): int tuples, or
    TensorRT's symbolic shapes with ``cdiv=tensorrt.plugin.cdiv`` (an output shaped like an
    input is that input's shape, as given)."""
    h, p, n = attrs["heads"], attrs["headdim"], attrs["d_state"]
    if op == "EdgeseqSSDChunkState":
        b, q = shapes["x"][0], attrs["chunk_size"]
        c = cdiv(shapes["x"][1], q)
        return [(b, h, c * q), (b, c, h, n, p), shapes["state"]]
    if op == "EdgeseqSSDChunkScan":
        return [shapes["x"]]
    return [(shapes["xBC"][0], h, p), shapes["conv_state"], shapes["ssm_state"]]


def compute_capability_of(text: str) -> int:
    """ "8.7" -> 87 (a target profile's compute_capability)."""
    major, minor = text.split(".")
    return int(major) * 10 + int(minor)
