"""The mixture-of-experts MLP as a torch module; the block hands every call its parameters
at the width it runs (``p``). The math is ``edgeseq.reference.moe_ref``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgeseq.reference import moe_ref


class Experts(nn.Module):
    """The routed experts' weights, 3-D as [experts, out, in]."""

    def __init__(self, d_model: int, n_experts: int, d_expert: int):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(n_experts, d_expert, d_model))
        self.up_proj = nn.Parameter(torch.empty(n_experts, d_expert, d_model))
        self.down_proj = nn.Parameter(torch.empty(n_experts, d_model, d_expert))
        for w in (self.gate_proj, self.up_proj, self.down_proj):
            nn.init.normal_(w, std=w.size(-1) ** -0.5)


class MoEModule(nn.Module):
    def __init__(self, d_model: int, d_shared: int, params, activation: str = "silu"):
        super().__init__()
        self.top_k, self.activation = params.top_k, getattr(F, activation)
        self.gate_proj = nn.Linear(d_model, d_shared, bias=False)
        self.up_proj = nn.Linear(d_model, d_shared, bias=False)
        self.down_proj = nn.Linear(d_shared, d_model, bias=False)
        self.router = nn.Linear(d_model, params.n_experts, bias=False)
        self.experts = Experts(d_model, params.n_experts, params.d_expert)

    def forward(self, p: dict[str, Tensor], x: Tensor, state: dict, position: Tensor, kept: int,
                mask: Tensor | None = None):  # fmt: skip
        """x (b, [l,] d) -> (b, [l,] d); no state. Per token: a pad (mask 0) changes nothing."""
        shared = (p["gate_proj.weight"], p["up_proj.weight"], p["down_proj.weight"])
        y = moe_ref(x, p["router.weight"], p["experts.gate_proj"], p["experts.up_proj"], p["experts.down_proj"],
                    self.top_k, shared, self.activation)  # fmt: skip
        return y, state

    step = forward
