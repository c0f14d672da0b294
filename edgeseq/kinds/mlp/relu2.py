"""The squared-ReLU MLP kind: down(relu(up(x))²), no gate (Nemotron-H's MLP).

Config section ``d_mlp_relu2``: its hidden size at full width, a top-level key of its
own (the gated MLP's ``d_mlp`` stays that kind's). Nesting keeps the leading hidden units,
as the gated MLP does: up_proj's rows and down_proj's columns. No state, no biases.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgeseq.errors import ConfigError
from edgeseq.kinds.base import Index, LayerKind, positive, register


class Relu2MLP(LayerKind):
    name = "mlp_relu2"
    role = "mlp"
    section = "d_mlp_relu2"
    size_key = "d_mlp_relu2"

    # ---- config ----------------------------------------------------------------------
    def parse_section(self, value: Any) -> int:
        return 0 if value is None else value

    def default_section(self) -> int:
        return 0

    def check_section(self, d_mlp: int) -> None:
        positive(f"config.{self.section}", d_mlp, allow_zero=True)

    def check_layer(self, config, i: int) -> None:
        if config.layers[i].size(self.name) is None and self.full_size(config, i) == 0:
            raise ConfigError(f"config.layers[{i}] has a {self.name} MLP but config.{self.section} is 0; set it")

    # ---- nesting ---------------------------------------------------------------------
    def full_size(self, config, i: int) -> int:
        return getattr(config, self.section)

    def unit_name(self) -> str:
        return "MLP hidden units"

    def weight_index(self, config, i: int, size: int, kept: int) -> Index:
        rows = np.arange(kept)
        return {"up_proj.weight": (0, rows), "down_proj.weight": (1, rows)}

    # ---- torch / export --------------------------------------------------------------
    def module(self, config, i: int, size: int):
        from edgeseq.kinds.mlp.relu2_module import Relu2MLPModule

        return Relu2MLPModule(config.d_model, size)

    def graph(self, g, flavor, config, i, size, weights, prefix, x, past, position, mask, rank):
        """x -> MatMul(up) -> Relu -> Mul(itself) -> MatMul(down); the same in every flavor."""
        hidden = g.op("Relu", g.linear(x, g.matrix(weights, prefix, "up_proj")))
        return g.linear(g.op("Mul", hidden, hidden), g.matrix(weights, prefix, "down_proj")), {}

    # ---- sizing ----------------------------------------------------------------------
    def param_shapes(self, config, i: int, size: int) -> dict[str, tuple[int, ...]]:
        d = config.d_model
        return {"up_proj.weight": (size, d), "down_proj.weight": (d, size)}

    def matrices(self, config, i: int) -> frozenset[str]:
        return frozenset({"up_proj.weight", "down_proj.weight"})


RELU2_MLP = register(Relu2MLP)
