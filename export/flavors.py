"""Export flavors: what the recurrent cores of a Mamba2 layer become in the graph.

A flavor emits only the causal conv and the SSM core; everything around them (projections,
norms, attention, MLPs) is the same basic-op graph for all flavors, so graph code never
branches on the backend.

- ``portable``: basic ops, opset 18 (ORT mobile and older ORT, CoreML/NNAPI/XNNPACK EPs,
  TensorRT's ONNX parser).
- ``opset27``: the standard ``CausalConvWithState`` and ``LinearAttention``
  (update_rule "gated"): query = C, key = B, value = dt*x, decay = dt*A (log space),
  state (b, h, n, p), scale 1.
- ``tensorrt``: the scan and the step as TensorRT plugin nodes (op type = plugin name,
  ``plugin_namespace`` and ``plugin_version`` attributes) — the node contract below; the
  conv stays in basic ops.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeseq.export import ssd_graph
from edgeseq.export.builder import GraphBuilder, reshape, silu

TRT_DOMAIN = "edgeseq.trt"  # custom-op domain of the plugin nodes (ORT binds it in tests)
TRT_NAMESPACE = "edgeseq"
TRT_VERSION = "1"


@dataclass(frozen=True)
class SSMDims:
    heads: int
    groups: int
    headdim: int
    d_state: int
    chunk: int


class Portable:
    name = "portable"
    opset = 18
    domains: dict[str, int] = {}

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
    """Plugin nodes for the SSM core; the node contract, TensorRT-parser style.

    ``EdgeseqSSDScan``  inputs  x [b,t,h,p], dt [b,t,h], A [h], B [b,t,g,n], C [b,t,g,n],
                                D [h], state [b,h,n,p]
                        outputs y [b,t,h,p], state [b,h,n,p]
                        attrs   chunk_size, ngroups, plugin_namespace, plugin_version
    ``EdgeseqSSDStep``  the same with t absent (x [b,h,p], dt [b,h], B/C [b,g,n]).
    dt is after softplus and clamping; A is negative; all fp32, the state always fp32.
    """

    name = "tensorrt"
    opset = 18
    domains = {TRT_DOMAIN: 1}

    def _plugin(self, g: GraphBuilder, op: str, d: SSMDims, x, dt, A, B, C, D, past):
        return g.op(op, x, dt, g.const(A), B, C, g.const(D), past, outputs=2, domain=TRT_DOMAIN,
                    chunk_size=d.chunk, ngroups=d.groups, plugin_namespace=TRT_NAMESPACE, plugin_version=TRT_VERSION)

    def ssm_step(self, g: GraphBuilder, d: SSMDims, x, dt, A, B, C, D, past):
        return self._plugin(g, "EdgeseqSSDStep", d, x, dt, A, B, C, D, past)

    def ssm_prefill(self, g: GraphBuilder, d: SSMDims, x, dt, A, B, C, D, past):
        return self._plugin(g, "EdgeseqSSDScan", d, x, dt, A, B, C, D, past)


FLAVORS = {f.name: f for f in (Portable(), Opset27(), TensorRT())}
