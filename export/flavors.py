"""Export flavors: what the recurrent cores of a Mamba2 layer become in the graph.

A flavor emits only the causal conv and the SSM core; everything around them (projections,
norms, attention, MLPs) is the same basic-op graph for all flavors, so graph code never
branches on the backend.

- ``portable``: basic ops, opset 18 (ORT mobile and older ORT, CoreML/NNAPI/XNNPACK EPs,
  TensorRT's ONNX parser).
- ``opset27``: the standard ``CausalConvWithState`` and ``LinearAttention``
  (update_rule "gated"): query = C, key = B, value = dt*x, decay = dt*A (log space),
  state (b, h, n, p), scale 1.
- ``tensorrt``: TensorRT plugin nodes (op type = plugin name, ``plugin_namespace`` and
  ``plugin_version`` attributes, as TensorRT's ONNX parser expects), each one Triton kernel
  (contract and definitions: ``edgeseq.export.trt_plugins``): the step's conv, dt and SSM
  as one ``EdgeseqSSDStep``; the prefill scan as ``EdgeseqSSDChunkState`` then
  ``EdgeseqSSDChunkScan``, the prefill conv in basic ops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from edgeseq.export import ssd_graph
from edgeseq.export.builder import GraphBuilder, reshape, silu, split
from edgeseq.export.trt_plugins import DOMAIN as TRT_DOMAIN
from edgeseq.export.trt_plugins import NAMESPACE as TRT_NAMESPACE
from edgeseq.export.trt_plugins import VERSION as TRT_VERSION


@dataclass(frozen=True)
class SSMDims:
    heads: int
    groups: int
    headdim: int
    d_state: int
    chunk: int


@dataclass(frozen=True)
class MixerWeights:
    """What the conv + SSM core of one Mamba2 layer reads besides activations and state."""

    conv_weight: np.ndarray  # [k, w]
    conv_bias: np.ndarray | None  # [k]
    dt_bias: str  # graph value [h]
    A: np.ndarray  # [h], negative
    D: np.ndarray  # [h]
    dt_limit: tuple[float, float]


class Portable:
    name = "portable"
    opset = 18
    domains: dict[str, int] = {}

    def mixer_core(self, g: GraphBuilder, d: SSMDims, w: MixerWeights, xBC, dt, past: dict[str, str], rank: int):
        """xBC [b,(t,)k] and dt [b,(t,)h] from in_proj -> y [b,(t,)h,p], {"conv", "ssm"} present.

            xBC -> causal conv + SiLU -> x | B | C;  dt -> softplus(dt + dt_bias) -> clamp
            SSM core: x, dt, A, B, C, D, past ssm -> y
        """
        lead = (0,) * (rank - 1)
        conv = self.conv_step if rank == 2 else self.conv_prefill
        xBC, conv_state = conv(g, xBC, past["conv"], w.conv_weight, w.conv_bias)
        di, gn = d.heads * d.headdim, d.groups * d.d_state
        xs, Bs, Cs = split(g, xBC, [di, gn, gn])
        dt = g.op("Softplus", g.op("Add", dt, w.dt_bias))
        lo, hi = w.dt_limit
        if lo > 0 or math.isfinite(hi):
            dt = g.op("Clip", dt, g.const(lo), g.const(hi if math.isfinite(hi) else np.finfo(np.float32).max))
        core = self.ssm_step if rank == 2 else self.ssm_prefill
        y, ssm_state = core(
            g, d, reshape(g, xs, *lead, d.heads, d.headdim), dt, w.A,
            reshape(g, Bs, *lead, d.groups, d.d_state), reshape(g, Cs, *lead, d.groups, d.d_state), w.D, past["ssm"],
        )  # fmt: skip
        return y, {"conv": conv_state, "ssm": ssm_state}

    def conv_step(self, g: GraphBuilder, x, past, weight: np.ndarray, bias: np.ndarray | None):
        """x [b,c], past [b,c,k-1], weight [c,k] -> silu(conv) [b,c], present [b,c,k-1]."""
        window = g.op("Concat", past, g.op("Unsqueeze", x, g.ints(-1)), axis=-1)  # [b, c, k]
        y = g.op("ReduceSum", g.op("Mul", window, g.const(weight)), g.ints(-1), keepdims=0)
        if bias is not None:
            y = g.op("Add", y, g.const(bias))
        present = g.op("Slice", window, g.ints(1), g.ints(weight.shape[1]), g.ints(-1))
        return silu(g, y), present

    def conv_prefill(self, g: GraphBuilder, x, past, weight: np.ndarray, bias: np.ndarray | None):
        """x [b,t,c], past [b,c,k-1] -> silu(conv) [b,t,c], present [b,c,k-1]."""
        k = weight.shape[1]
        window = g.op("Concat", past, g.op("Transpose", x, perm=[0, 2, 1]), axis=-1)  # [b, c, k-1+t]
        inputs = [window, g.const(weight[:, None, :])] + ([g.const(bias)] if bias is not None else [])
        y = g.op("Conv", *inputs, group=weight.shape[0], kernel_shape=[k])  # [b, c, t]
        present = g.op("Slice", window, g.ints(-(k - 1)), g.ints(np.iinfo(np.int64).max), g.ints(-1))
        return silu(g, g.op("Transpose", y, perm=[0, 2, 1])), present

    def ssm_step(self, g: GraphBuilder, d: SSMDims, x, dt, A, B, C, D, past):
        return ssd_graph.ssd_step(g, x, dt, A, B, C, D, past, heads=d.heads, groups=d.groups, headdim=d.headdim,
                                  d_state=d.d_state)

    def ssm_prefill(self, g: GraphBuilder, d: SSMDims, x, dt, A, B, C, D, past):
        return ssd_graph.ssd_scan(g, x, dt, A, B, C, D, past, heads=d.heads, groups=d.groups, headdim=d.headdim,
                                  d_state=d.d_state, chunk=d.chunk)


class Opset27(Portable):
    name = "opset27"
    opset = 27

    def conv_step(self, g: GraphBuilder, x, past, weight, bias):
        y, present = self.conv_prefill(g, g.op("Unsqueeze", x, g.ints(1)), past, weight, bias)
        return g.op("Squeeze", y, g.ints(1)), present

    def conv_prefill(self, g: GraphBuilder, x, past, weight, bias):
        inputs = [g.op("Transpose", x, perm=[0, 2, 1]), g.const(weight[:, None, :]), g.const(bias) if bias is not None else "", past]
        y, present = g.op("CausalConvWithState", *inputs, outputs=2, activation="silu")
        return g.op("Transpose", y, perm=[0, 2, 1]), present

    def _linear_attention(self, g: GraphBuilder, d: SSMDims, x, dt, A, B, C, D, past):
        """x [b,t,h,p], dt [b,t,h], B/C [b,t,g,n] -> y [b,t,h,p], present [b,h,n,p]."""
        H, N, P = d.heads, d.d_state, d.headdim
        q = reshape(g, ssd_graph.heads_from_groups(g, C, d.groups, H, N, axis=2), 0, 0, H * N)
        k = reshape(g, ssd_graph.heads_from_groups(g, B, d.groups, H, N, axis=2), 0, 0, H * N)
        v = reshape(g, g.op("Mul", x, g.op("Unsqueeze", dt, g.ints(-1))), 0, 0, H * P)
        decay = g.op("Mul", dt, g.const(A))  # log-space decay per head
        out, present = g.op("LinearAttention", q, k, v, past, decay, outputs=2, update_rule="gated",
                            q_num_heads=H, kv_num_heads=H, scale=1.0, chunk_size=d.chunk)
        y = g.op("Add", reshape(g, out, 0, 0, H, P), g.op("Mul", x, g.const(D.reshape(H, 1))))
        return y, present

    def ssm_prefill(self, g: GraphBuilder, d: SSMDims, x, dt, A, B, C, D, past):
        return self._linear_attention(g, d, x, dt, A, B, C, D, past)

    def ssm_step(self, g: GraphBuilder, d: SSMDims, x, dt, A, B, C, D, past):
        one = [g.op("Unsqueeze", v, g.ints(1)) for v in (x, dt, B, C)]
        y, present = self._linear_attention(g, d, *one[:2], A, *one[2:], D, past)
        return g.op("Squeeze", y, g.ints(1)), present


class TensorRT(Portable):
    """Plugin nodes (``edgeseq.export.trt_plugins.PLUGINS`` is the node contract)."""

    name = "tensorrt"
    opset = 18
    domains = {TRT_DOMAIN: 1}

    def _plugin(self, g: GraphBuilder, op: str, d: SSMDims, *inputs: str, outputs: int, **attrs):
        sizes = dict(heads=d.heads, ngroups=d.groups, headdim=d.headdim, d_state=d.d_state)
        return g.op(op, *inputs, outputs=outputs, domain=TRT_DOMAIN, output_dtype="float32",
                    plugin_namespace=TRT_NAMESPACE, plugin_version=TRT_VERSION, **sizes, **attrs)  # fmt: skip

    def mixer_core(self, g: GraphBuilder, d: SSMDims, w: MixerWeights, xBC, dt, past: dict[str, str], rank: int):
        """The step: conv, dt, state update and output in one EdgeseqSSDStep node."""
        if rank != 2:
            return super().mixer_core(g, d, w, xBC, dt, past, rank)
        bias = w.conv_bias if w.conv_bias is not None else np.zeros(w.conv_weight.shape[0], np.float32)
        lo, hi = w.dt_limit
        y, conv_state, ssm_state = self._plugin(
            g, "EdgeseqSSDStep", d, xBC, dt, past["conv"], g.const(w.conv_weight), g.const(bias), w.dt_bias,
            g.const(w.A), g.const(w.D), past["ssm"], outputs=3,
            d_conv=int(w.conv_weight.shape[1]), dt_min=float(lo), dt_max=float(hi),
        )  # fmt: skip
        return y, {"conv": conv_state, "ssm": ssm_state}

    def ssm_prefill(self, g: GraphBuilder, d: SSMDims, x, dt, A, B, C, D, past):
        """EdgeseqSSDChunkState (a_cum, states entering chunks, final) -> EdgeseqSSDChunkScan (y)."""
        a_cum, states, final = self._plugin(g, "EdgeseqSSDChunkState", d, x, dt, g.const(A), B, past, outputs=3,
                                            chunk_size=d.chunk)  # fmt: skip
        y = self._plugin(g, "EdgeseqSSDChunkScan", d, x, dt, B, C, states, a_cum, g.const(D), outputs=1,
                         chunk_size=d.chunk)  # fmt: skip
        return y, final


FLAVORS = {f.name: f for f in (Portable(), Opset27(), TensorRT())}
