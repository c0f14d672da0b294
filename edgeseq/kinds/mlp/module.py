"""The gated MLP as a torch module; the block hands every call its parameters at the
width it runs (``p``)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from edgeseq.reference import gated_mlp_ref


class GatedMLPModule(nn.Module):
    def __init__(self, d_model: int, d_mlp: int, activation: str = "silu"):
        super().__init__()
        self.d_mlp, self.activation = d_mlp, getattr(F, activation)
        self.gate_proj = nn.Linear(d_model, d_mlp, bias=False)
        self.up_proj = nn.Linear(d_model, d_mlp, bias=False)
        self.down_proj = nn.Linear(d_mlp, d_model, bias=False)

    def forward(self, p: dict[str, Tensor], x: Tensor, state: dict, position: Tensor, kept: int,
                mask: Tensor | None = None):  # fmt: skip
        """x (b, [l,] d) -> (b, [l,] d); no state. Per token: a pad (mask 0) changes nothing."""
        return gated_mlp_ref(x, p["gate_proj.weight"], p["up_proj.weight"], p["down_proj.weight"], self.activation), state

    step = forward
