"""The squared-ReLU MLP as a torch module; the block hands every call its parameters at
the width it runs (``p``)."""

from __future__ import annotations

from torch import Tensor, nn

from edgeseq.reference import relu2_mlp_ref


class Relu2MLPModule(nn.Module):
    def __init__(self, d_model: int, d_mlp: int):
        super().__init__()
        self.d_mlp = d_mlp
        self.up_proj = nn.Linear(d_model, d_mlp, bias=False)
        self.down_proj = nn.Linear(d_mlp, d_model, bias=False)

    def forward(self, p: dict[str, Tensor], x: Tensor, state: dict, position: Tensor, kept: int,
                mask: Tensor | None = None):  # fmt: skip
        """x (b, [l,] d) -> (b, [l,] d); no state. Per token: a pad (mask 0) changes nothing."""
        return relu2_mlp_ref(x, p["up_proj.weight"], p["down_proj.weight"]), state

    step = forward
