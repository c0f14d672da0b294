"""Reference math for a mixture-of-experts MLP with a shared expert (Granite 4.0-H).

Shapes use n tokens (any leading axes, flattened), d model, e experts, k experts per
token, f an expert's hidden size, s the shared MLP's hidden size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from edgeseq.reference.layers import gated_mlp_ref


def moe_route_ref(x: Tensor, w_router: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """Top-k routing, softmax over the chosen logits only (not over all experts).

    x (n, d); w_router (e, d) -> weights (n, k) in x's dtype, experts (n, k) int64.
    """
    logits = F.linear(x, w_router)  # (n, e)
    logits = logits if logits.dtype == torch.float64 else logits.float()  # fp32 as upstream
    chosen, experts = logits.topk(top_k, dim=-1)  # (n, k), largest first
    return torch.softmax(chosen, dim=-1).to(x.dtype), experts


def moe_experts_ref(x: Tensor, weights: Tensor, experts: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor,
                    act=F.silu) -> Tensor:  # fmt: skip
    """sum over the k chosen experts of weight * down_e(act(gate_e(x)) * up_e(x)).

    x (n, d); weights, experts (n, k); w_gate, w_up (e, f, d); w_down (e, d, f) -> (n, d).
    Experts no token chose are skipped: their weight is zero. A few tokens (a decode step)
    gather their k experts' weights and run them at once; many (a prompt) go expert by
    expert over the tokens that chose it. The same sum either way.
    """
    n, k = experts.shape
    if n * k <= w_gate.size(0):  # fewer (token, expert) pairs than experts: gather them
        gate = torch.einsum("nd,nkfd->nkf", x, w_gate[experts])
        hidden = act(gate) * torch.einsum("nd,nkfd->nkf", x, w_up[experts])
        y = torch.einsum("nkf,nkdf->nkd", hidden, w_down[experts])  # (n, k, d)
        return (y * weights[..., None]).sum(1)
    out = torch.zeros_like(x)
    for e in experts.unique().tolist():
        token, slot = torch.where(experts == e)  # the tokens that chose e, and where in their top-k
        y = gated_mlp_ref(x[token], w_gate[e], w_up[e], w_down[e], act)  # (m, d)
        out.index_add_(0, token, y * weights[token, slot, None])
    return out


def moe_ref(x: Tensor, w_router: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, top_k: int,
            shared: tuple[Tensor, Tensor, Tensor] | None = None, act=F.silu) -> Tensor:  # fmt: skip
    """Routed experts plus, if given, a shared gated MLP (gate, up (s, d), down (d, s)) that
    every token runs. x (..., d) -> (..., d)."""
    flat = x.reshape(-1, x.size(-1))  # (n, d)
    weights, experts = moe_route_ref(flat, w_router, top_k)
    out = moe_experts_ref(flat, weights, experts, w_gate, w_up, w_down, act)
    if shared is not None:
        out = out + gated_mlp_ref(flat, *shared, act)
    return out.reshape(x.shape)
