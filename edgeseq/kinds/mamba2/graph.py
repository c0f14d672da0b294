"""The Mamba2 layer in ONNX, with one core per export flavor.

    x -> in_proj -> z | xBC | dt
                    xBC, dt -> conv + SSM core (per flavor) -> y
    y, z -> gated RMSNorm -> out_proj

Only the causal conv and the SSM core differ between flavors; everything around them is
the same basic-op graph:

- ``portable``: basic ops, opset 18 (``ssd_graph``).
- ``opset27``: the standard ``CausalConvWithState`` and ``LinearAttention``
  (update_rule "gated"): query = C, key = B, value = dt*x, decay = dt*A (log space),
  state (b, h, n, p), scale 1.
- ``contrib``: the same two ops from onnxruntime's ``com.microsoft`` domain, C and B
  shared per group instead of expanded to every head.
- ``tensorrt``: TensorRT plugin nodes (op type = plugin name, the flavor's
  ``plugin_attrs``; contract in ``edgeseq.export.trt_plugins``), each one Triton kernel: the
  step's conv, dt and SSM as one ``EdgeseqSSDStep``; the prefill scan as
  ``EdgeseqSSDChunkState`` then ``EdgeseqSSDChunkScan``, the prefill conv in basic ops.

A prefill's left pads (``attention_mask`` 0) are dealt with before the core, so every
flavor inherits it: the conv input is reordered (``pads_first``) and a pad's dt is zeroed
(no decay, no input), which leaves both states as they were.

``g`` is an ``edgeseq.export.builder.GraphBuilder``; ``flavor`` an
``edgeseq.export.flavors.Flavor``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from edgeseq.errors import ConfigError
from edgeseq.kinds.mamba2 import ssd_graph


@dataclass(frozen=True)
class SSMDims:
    heads: int
    groups: int
    headdim: int
    d_state: int
    chunk: int


@dataclass(frozen=True)
class CoreWeights:
    """What the conv + SSM core of one Mamba2 layer reads besides activations and state."""

    conv_weight: np.ndarray  # [k, w]
    conv_bias: np.ndarray | None  # [k]
    dt_bias: str  # graph value [h]
    A: np.ndarray  # [h], negative
    D: np.ndarray  # [h]
    dt_limit: tuple[float, float]


def lead(rank: int) -> tuple[int, ...]:
    """Reshape dims that copy the leading (batch, time) axes."""
    return (0,) * (rank - 1)


def gated_norm(g, y: str, z: str, weight: str, groups: int, width: int, eps: float, rank: int) -> str:
    """RMSNorm(y * silu(z)) over ``groups`` groups of the last axis, times weight."""
    yz = g.op("Mul", y, g.silu(z))
    if groups == 1:  # the plain RMSNorm pattern, which onnxruntime fuses into one node
        return g.rmsnorm(yz, weight, eps)
    grouped = g.op("Reshape", yz, g.ints(*lead(rank), groups, width // groups))
    ms = g.op("ReduceMean", g.op("Pow", grouped, g.const(2.0)), g.ints(-1), keepdims=1)
    normed = g.op("Div", grouped, g.op("Sqrt", g.op("Add", ms, g.const(eps))))
    return g.op("Mul", g.op("Reshape", normed, g.ints(*lead(rank), width)), weight)


def mamba2(g, flavor, config, heads: int, w: dict[str, np.ndarray], p: str, x: str, past: dict[str, str],
           mask: str | None, rank: int):  # fmt: skip
    """x [b,(t,)d] normed -> out [b,(t,)d], {"conv": present, "ssm": present} (diagram above);
    mask [b, t] int64 (prefill) or None (step)."""
    m = config.mamba
    H, P, N, G = heads, m.headdim, m.d_state, m.ngroups
    di, gn = H * P, G * N
    zxbcdt = g.linear(x, g.matrix(w, p, "in_proj"), g.bias(w, p, "in_proj"))
    z, xBC, dt = g.split(zxbcdt, [di, di + 2 * gn, H])
    weights = CoreWeights(
        conv_weight=w["conv1d.weight"][:, 0, :],
        conv_bias=w.get("conv1d.bias"),
        dt_bias=g.vector(w, p, "dt_bias"),
        A=-np.exp(w["A_log"].astype(np.float64)).astype(np.float32),
        D=w["D"],
        dt_limit=m.dt_limit,
    )
    if flavor.name not in CORES:
        raise ConfigError(f"the mamba2 layer has no {flavor.name!r} graph piece; use one of {sorted(CORES)}")
    core = CORES[flavor.name]
    y, present = core.mixer_core(g, flavor, SSMDims(H, G, P, N, m.chunk_size), weights, xBC, dt, past, mask, rank)
    y = g.op("Reshape", y, g.ints(*lead(rank), di))
    if m.rmsnorm:
        y = gated_norm(g, y, z, g.vector(w, p, "norm.weight"), G, di, config.norm_eps, rank)
    else:  # the gate alone (Falcon-H1's mamba_rms_norm=False)
        y = g.op("Mul", y, g.silu(z))
    out = g.linear(y, g.matrix(w, p, "out_proj"), g.bias(w, p, "out_proj"))
    return out, present


def pads_first(g, x: str, past: str, mask: str, k: int) -> tuple[str, str]:
    """x [b,t,c], past [b,c,k-1], mask [b,t] -> (x', past'): each row's left pads moved
    ahead of its conv state, so that a token's window is [state | earlier tokens] and the
    last k-1 columns of [past' | x'] are the state a pad leaves untouched
    (``edgeseq.reference.pads_first``).

        u = Concat(past, x^T) [b, c, s+t]              s = k-1, p = t - ReduceSum(mask) pads
        src[i] = i >= s+p ? i : (i + s) mod (s+p)      [b, s+t]
        u' = GatherElements(u, src) -> past' = u'[:, :, :s], x' = u'[:, :, s:]^T
    """
    s = k - 1
    u = g.op("Concat", past, g.op("Transpose", x, perm=[0, 2, 1]), axis=-1)
    t = g.op("Shape", mask, start=1, end=2)
    pads = g.op("Sub", t, g.op("ReduceSum", mask, g.ints(1), keepdims=1))  # [b, 1]
    lead_cols = g.op("Add", pads, g.const(s, "int64"))
    n = g.op("Squeeze", g.op("Shape", u, start=2, end=3), g.ints(0))
    i = g.op("Unsqueeze", g.op("Range", g.const(0, "int64"), n, g.const(1, "int64")), g.ints(0))  # [1, s+t]
    rotated = g.op("Mod", g.op("Add", i, g.const(s, "int64")), lead_cols)
    src = g.op("Where", g.op("GreaterOrEqual", i, lead_cols), i, rotated)  # [b, s+t]
    u = g.op("GatherElements", u, g.op("Expand", g.op("Unsqueeze", src, g.ints(1)), g.op("Shape", u)), axis=2)
    past = g.op("Slice", u, g.ints(0), g.ints(s), g.ints(2))
    x = g.op("Transpose", g.op("Slice", u, g.ints(s), g.ints(np.iinfo(np.int64).max), g.ints(2)), perm=[0, 2, 1])
    return x, past


class Portable:
    def mixer_core(self, g, flavor, d: SSMDims, w: CoreWeights, xBC, dt, past: dict[str, str], mask: str | None,
                   rank: int):  # fmt: skip
        """xBC [b,(t,)k] and dt [b,(t,)h] from in_proj -> y [b,(t,)h,p], {"conv", "ssm"} present.

            xBC (-> pads_first) -> causal conv + SiLU -> x | B | C
            dt -> softplus(dt + dt_bias) -> clamp (-> * mask: a pad neither decays nor adds)
            SSM core: x, dt, A, B, C, D, past ssm -> y
        """
        lead_dims = lead(rank)
        conv = self.conv_step if rank == 2 else self.conv_prefill
        conv_past = past["conv"]
        if mask is not None:
            xBC, conv_past = pads_first(g, xBC, conv_past, mask, w.conv_weight.shape[1])
        xBC, conv_state = conv(g, xBC, conv_past, w.conv_weight, w.conv_bias)
        di, gn = d.heads * d.headdim, d.groups * d.d_state
        xs, Bs, Cs = g.split(xBC, [di, gn, gn])
        dt = g.op("Softplus", g.op("Add", dt, w.dt_bias))
        lo, hi = w.dt_limit
        if lo > 0 or math.isfinite(hi):
            dt = g.op("Clip", dt, g.const(lo), g.const(hi if math.isfinite(hi) else np.finfo(np.float32).max))
        if mask is not None:
            dt = g.op("Mul", dt, g.op("Unsqueeze", g.op("Cast", mask, to=1), g.ints(-1)))
        core = self.ssm_step if rank == 2 else self.ssm_prefill
        y, ssm_state = core(
            g, flavor, d, g.reshape(xs, *lead_dims, d.heads, d.headdim), dt, w.A,
            g.reshape(Bs, *lead_dims, d.groups, d.d_state), g.reshape(Cs, *lead_dims, d.groups, d.d_state), w.D,
            past["ssm"],
        )  # fmt: skip
        return y, {"conv": conv_state, "ssm": ssm_state}

    def conv_step(self, g, x, past, weight: np.ndarray, bias: np.ndarray | None):
        """x [b,c], past [b,c,k-1], weight [c,k] -> silu(conv) [b,c], present [b,c,k-1]."""
        window = g.op("Concat", past, g.op("Unsqueeze", x, g.ints(-1)), axis=-1)  # [b, c, k]
        y = g.op("ReduceSum", g.op("Mul", window, g.const(weight)), g.ints(-1), keepdims=0)
        if bias is not None:
            y = g.op("Add", y, g.const(bias))
        present = g.op("Slice", window, g.ints(1), g.ints(weight.shape[1]), g.ints(-1))
        return g.silu(y), present

    def conv_prefill(self, g, x, past, weight: np.ndarray, bias: np.ndarray | None):
        """x [b,t,c], past [b,c,k-1] -> silu(conv) [b,t,c], present [b,c,k-1]."""
        k = weight.shape[1]
        window = g.op("Concat", past, g.op("Transpose", x, perm=[0, 2, 1]), axis=-1)  # [b, c, k-1+t]
        inputs = [window, g.const(weight[:, None, :])] + ([g.const(bias)] if bias is not None else [])
        y = g.op("Conv", *inputs, group=weight.shape[0], kernel_shape=[k])  # [b, c, t]
        present = g.op("Slice", window, g.ints(-(k - 1)), g.ints(np.iinfo(np.int64).max), g.ints(-1))
        return g.silu(g.op("Transpose", y, perm=[0, 2, 1])), present

    def ssm_step(self, g, flavor, d: SSMDims, x, dt, A, B, C, D, past):
        return ssd_graph.ssd_step(g, x, dt, A, B, C, D, past, heads=d.heads, groups=d.groups, headdim=d.headdim,
                                  d_state=d.d_state)

    def ssm_prefill(self, g, flavor, d: SSMDims, x, dt, A, B, C, D, past):
        return ssd_graph.ssd_scan(g, x, dt, A, B, C, D, past, heads=d.heads, groups=d.groups, headdim=d.headdim,
                                  d_state=d.d_state, chunk=d.chunk)


class Opset27(Portable):
    domain = ""  # of the CausalConvWithState and LinearAttention nodes
    shared_keys = False  # C and B stay one per group (the op shares them across heads); else expanded to heads

    def conv_step(self, g, x, past, weight, bias):
        """x [b,c] -> [b,c,1] (channels first, one position) -> the conv -> [b,c]."""
        y, present = self._conv(g, g.op("Unsqueeze", x, g.ints(-1)), past, weight, bias)
        return g.op("Squeeze", y, g.ints(-1)), present

    def conv_prefill(self, g, x, past, weight, bias):
        y, present = self._conv(g, g.op("Transpose", x, perm=[0, 2, 1]), past, weight, bias)
        return g.op("Transpose", y, perm=[0, 2, 1]), present

    def _conv(self, g, x, past, weight, bias):
        """x [b,c,t] channels first -> silu(conv) [b,c,t], present [b,c,k-1]."""
        inputs = [x, g.const(weight[:, None, :]), g.const(bias) if bias is not None else "", past]
        return g.op("CausalConvWithState", *inputs, outputs=2, activation="silu", domain=self.domain,
                    output_dtype="float32" if self.domain else None)  # fmt: skip

    def _linear_attention(self, g, d: SSMDims, x, dt, A, B, C, D, past):
        """x [b,t,h,p], dt [b,t,h], B/C [b,t,g,n] -> y [b,t,h,p], present [b,h,n,p]."""
        H, N, P = d.heads, d.d_state, d.headdim
        qk = d.groups if self.shared_keys else H
        q, k = (g.reshape(M if self.shared_keys else ssd_graph.heads_from_groups(g, M, d.groups, H, N, axis=2),
                          0, 0, qk * N) for M in (C, B))  # fmt: skip
        v = g.reshape(g.op("Mul", x, g.op("Unsqueeze", dt, g.ints(-1))), 0, 0, H * P)
        decay = g.op("Mul", dt, g.const(A))  # log-space decay per head
        out, present = g.op("LinearAttention", q, k, v, past, decay, outputs=2, update_rule="gated", domain=self.domain,
                            output_dtype="float32" if self.domain else None,  # a custom domain: no type inference
                            q_num_heads=qk, kv_num_heads=H, scale=1.0, chunk_size=d.chunk)  # fmt: skip
        y = g.op("Add", g.reshape(out, 0, 0, H, P), g.op("Mul", x, g.const(D.reshape(H, 1))))
        return y, present

    def ssm_prefill(self, g, flavor, d: SSMDims, x, dt, A, B, C, D, past):
        return self._linear_attention(g, d, x, dt, A, B, C, D, past)

    def ssm_step(self, g, flavor, d: SSMDims, x, dt, A, B, C, D, past):
        one = [g.op("Unsqueeze", v, g.ints(1)) for v in (x, dt, B, C)]
        y, present = self._linear_attention(g, d, *one[:2], A, *one[2:], D, past)
        return g.op("Squeeze", y, g.ints(1)), present


class TensorRT(Portable):
    """Plugin nodes (``edgeseq.export.trt_plugins.PLUGINS`` is the node contract)."""

    def _plugin(self, g, flavor, op: str, d: SSMDims, *inputs: str, outputs: int, **attrs):
        sizes = dict(heads=d.heads, ngroups=d.groups, headdim=d.headdim, d_state=d.d_state)
        return g.op(op, *inputs, outputs=outputs, domain=flavor.plugin_domain, output_dtype="float32",
                    **flavor.plugin_attrs, **sizes, **attrs)  # fmt: skip

    def mixer_core(self, g, flavor, d: SSMDims, w: CoreWeights, xBC, dt, past: dict[str, str], mask: str | None,
                   rank: int):  # fmt: skip
        """The step: conv, dt, state update and output in one EdgeseqSSDStep node."""
        if rank != 2:
            return super().mixer_core(g, flavor, d, w, xBC, dt, past, mask, rank)
        bias = w.conv_bias if w.conv_bias is not None else np.zeros(w.conv_weight.shape[0], np.float32)
        lo, hi = w.dt_limit
        y, conv_state, ssm_state = self._plugin(
            g, flavor, "EdgeseqSSDStep", d, xBC, dt, past["conv"], g.const(w.conv_weight), g.const(bias), w.dt_bias,
            g.const(w.A), g.const(w.D), past["ssm"], outputs=3,
            d_conv=int(w.conv_weight.shape[1]), dt_min=float(lo), dt_max=float(hi),
        )  # fmt: skip
        return y, {"conv": conv_state, "ssm": ssm_state}

    def ssm_prefill(self, g, flavor, d: SSMDims, x, dt, A, B, C, D, past):
        """EdgeseqSSDChunkState (a_cum, states entering chunks, final) -> EdgeseqSSDChunkScan (y)."""
        a_cum, states, final = self._plugin(g, flavor, "EdgeseqSSDChunkState", d, x, dt, g.const(A), B, past,
                                            outputs=3, chunk_size=d.chunk)  # fmt: skip
        y = self._plugin(g, flavor, "EdgeseqSSDChunkScan", d, x, dt, B, C, states, a_cum, g.const(D), outputs=1,
                         chunk_size=d.chunk)  # fmt: skip
        return y, final


class Contrib(Opset27):
    """onnxruntime's ``com.microsoft`` twins of the opset-27 ops (native kernels, where
    onnxruntime runs the standard ones as their function bodies); LinearAttention takes C
    and B once per group and shares them across that group's heads. The step's conv is
    CausalConvWithState, a prompt's the portable Conv."""

    domain = "com.microsoft"
    shared_keys = True
    # a prompt's conv as Concat + depthwise Conv + Slice: onnxruntime 1.32's CausalConvWithState
    # kernel took 4x as long over [1, 1792, 512] on a 2-core EPYC (scripts/bench_peer_cpu.py's model)
    conv_prefill = Portable.conv_prefill

    def ssm_step(self, g, flavor, d: SSMDims, x, dt, A, B, C, D, past):
        """x [b,h,p], dt [b,h], B/C [b,g,n] -> y [b,h,p], present: one token as T = 1,
        reshaped straight into the op's packed [b, 1, heads*dim] inputs.

            q, k = C, B -> [b,1,g*n]     v = x*dt -> [b,1,h*p]     decay = dt*A -> [b,1,h]
            y = LinearAttention(...) -> [b,h,p] + D x
        """
        H, N, P, G = d.heads, d.d_state, d.headdim, d.groups
        q, k = (g.reshape(M, 0, 1, G * N) for M in (C, B))
        v = g.reshape(g.op("Mul", x, g.op("Unsqueeze", dt, g.ints(-1))), 0, 1, H * P)
        decay = g.reshape(g.op("Mul", dt, g.const(A)), 0, 1, H)
        out, present = g.op("LinearAttention", q, k, v, past, decay, outputs=2, update_rule="gated", domain=self.domain,
                            output_dtype="float32", q_num_heads=G, kv_num_heads=H, scale=1.0, chunk_size=d.chunk)  # fmt: skip
        g.in_place.append(past)  # the op alone reads it, each element before writing it: half the state traffic
        return g.op("Add", g.reshape(out, 0, H, P), g.op("Mul", x, g.const(D.reshape(H, 1)))), present


CORES = {"portable": Portable(), "opset27": Opset27(), "tensorrt": TensorRT(), "contrib": Contrib()}  # by flavor name
