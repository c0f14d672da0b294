"""Graph code for the mixture-of-experts MLP (same math as ``edgeseq.reference.moe``).

Routing is the same in both graphs; the experts are run two ways:

- step (one token per stream): the k chosen experts' weights are gathered from the 3-D
  tables and applied as batched products, so a decode step reads k of e experts;
- prefill (many tokens): every expert runs on every token as three 2-D MatMuls over the
  experts laid side by side, and the experts a token did not choose get weight zero.
  A prompt touches most experts anyway, and 2-D weights are what the quantizers know.
"""

from __future__ import annotations

import numpy as np


def moe(g, m, w: dict[str, np.ndarray], p: str, x: str, rank: int) -> str:
    """x [b,(t,)d] normed -> shared(x) + routed experts(x), [b,(t,)d].

    x -> MatMul(router) -> TopK(k) -> Softmax over the k logits -> weights, experts
      -> step: Gather(experts) -> k gated MLPs -> weighted sum
      -> prefill: all experts -> weights scattered over e (zeros elsewhere) -> sum
      + shared gated MLP(x)
    """
    logits = g.linear(x, g.matrix(w, p, "router"))  # [b,(t,)e]
    chosen, experts = g.op("TopK", logits, g.ints(m.top_k), outputs=2, axis=-1)  # [b,(t,)k]
    weights = g.op("Softmax", chosen, axis=-1)
    routed = _step(g, w, p, x, weights, experts) if rank == 2 else _prefill(g, m, w, p, x, weights, experts)
    return g.op("Add", routed, _shared(g, w, p, x))


def _shared(g, w, p: str, x: str) -> str:
    gate = g.linear(x, g.matrix(w, p, "gate_proj"))
    return g.linear(g.op("Mul", g.silu(gate), g.linear(x, g.matrix(w, p, "up_proj"))), g.matrix(w, p, "down_proj"))


def _step(g, w, p: str, x: str, weights: str, experts: str) -> str:
    """x [b, d], weights/experts [b, k] -> [b, d].

    W_e [e, out, in] -> Gather(experts) [b, k, out, in] @ x [b, 1, in, 1] -> [b, k, out]
    """

    def apply(table: str, v: str) -> str:  # v [b, (k|1), in] -> [b, k, out]
        chosen = g.op("Gather", g.weight(f"{p}{table}", w[table]), experts, axis=0)  # [b, k, out, in]
        return g.op("Squeeze", g.op("MatMul", chosen, g.op("Unsqueeze", v, g.ints(-1))), g.ints(-1))

    xk = g.op("Unsqueeze", x, g.ints(1))  # [b, 1, d]
    hidden = g.op("Mul", g.silu(apply("experts.gate_proj", xk)), apply("experts.up_proj", xk))  # [b, k, f]
    out = apply("experts.down_proj", hidden)  # [b, k, d]
    return g.op("ReduceSum", g.op("Mul", out, g.op("Unsqueeze", weights, g.ints(-1))), g.ints(1), keepdims=0)


def _prefill(g, m, w, p: str, x: str, weights: str, experts: str) -> str:
    """x [b, t, d], weights/experts [b, t, k] -> [b, t, d].

    x @ [d, e*f] (gate, up) -> h [b, t, e, f] * dense weights [b, t, e, 1]
      -> [b, t, e*f] @ [e*f, d] (down, the experts stacked along K)
    """
    e, f = m.n_experts, m.d_expert
    side_by_side = {  # [e, f, d] -> [d, e*f]; down [e, d, f] -> [e*f, d]
        name: np.ascontiguousarray(w[name].reshape(e * f, -1).T) for name in ("experts.gate_proj", "experts.up_proj")
    }
    stacked = np.ascontiguousarray(w["experts.down_proj"].transpose(0, 2, 1).reshape(e * f, -1))
    gate = g.linear(x, g.weight(f"{p}experts.gate_proj.t", side_by_side["experts.gate_proj"]))
    up = g.linear(x, g.weight(f"{p}experts.up_proj.t", side_by_side["experts.up_proj"]))
    hidden = g.op("Reshape", g.op("Mul", g.silu(gate), up), g.ints(0, 0, e, f))  # [b, t, e, f]
    zeros = g.op("ConstantOfShape", g.op("Concat", g.op("Shape", experts, end=2), g.ints(e), axis=0),
                 value=_zero())  # fmt: skip
    dense = g.op("ScatterElements", zeros, experts, weights, axis=-1)  # [b, t, e]
    hidden = g.op("Reshape", g.op("Mul", hidden, g.op("Unsqueeze", dense, g.ints(-1))), g.ints(0, 0, e * f))
    return g.linear(hidden, g.weight(f"{p}experts.down_proj.t", stacked))


def _zero():
    from onnx import numpy_helper

    return numpy_helper.from_array(np.zeros(1, dtype=np.float32))
