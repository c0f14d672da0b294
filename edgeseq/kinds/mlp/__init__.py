"""The gated MLP kind: down(silu(gate(x)) * up(x)), hidden size ``d_mlp`` (config section).

Nesting keeps the leading hidden units (MatFormer), where the checkpoint trained it so;
MatMamba checkpoints nest only their Mamba2 layers and keep the MLP whole
(``ModelConfig.nested_kinds``). No state.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgeseq.errors import ConfigError
from edgeseq.kinds.base import Index, LayerKind, positive, register


class GatedMLP(LayerKind):
    name = "mlp"
    role = "mlp"
    section = "d_mlp"
    size_key = "d_mlp"
    activation = "silu"  # the gate's activation (torch.nn.functional and ONNX op names below)

    def parse_section(self, value: Any) -> int:
        return 0 if value is None else value

    def default_section(self) -> int:
        return 0

    def check_section(self, d_mlp: int) -> None:
        positive("config.d_mlp", d_mlp, allow_zero=True)

    def check_layer(self, config, i: int) -> None:
        kept = config.layers[i].size(self.name)
        if kept is None and self.full_size(config, i) == 0:
            raise ConfigError(f"config.layers[{i}] has an MLP but config.d_mlp is 0; set d_mlp")

    def full_size(self, config, i: int) -> int:
        return getattr(config, self.section)

    def unit_name(self) -> str:
        return "MLP hidden units"

    def weight_index(self, config, i: int, size: int, kept: int) -> Index:
        rows = np.arange(kept)
        return {"gate_proj.weight": (0, rows), "up_proj.weight": (0, rows), "down_proj.weight": (1, rows)}

    def module(self, config, i: int, size: int):
        from edgeseq.kinds.mlp.module import GatedMLPModule

        return GatedMLPModule(config.d_model, size, self.activation)

    def graph(self, g, flavor, config, i, size, weights, prefix, x, past, position, mask, rank):
        """down(act(gate(x)) * up(x))."""
        gate = g.linear(x, g.matrix(weights, prefix, "gate_proj"))
        hidden = g.op("Mul", self.graph_activation(g, gate), g.linear(x, g.matrix(weights, prefix, "up_proj")))
        return g.linear(hidden, g.matrix(weights, prefix, "down_proj")), {}

    def graph_activation(self, g, x: str) -> str:
        return g.silu(x)

    def param_shapes(self, config, i: int, size: int) -> dict[str, tuple[int, ...]]:
        d = config.d_model
        return {"gate_proj.weight": (size, d), "up_proj.weight": (size, d), "down_proj.weight": (d, size)}

    def matrices(self, config, i: int) -> frozenset[str]:
        return frozenset({"gate_proj.weight", "up_proj.weight", "down_proj.weight"})


MLP = register(GatedMLP)

# The squared-ReLU MLP kind (Nemotron-H) lives beside it and registers itself on import.
from edgeseq.kinds.mlp import relu2  # noqa: F401  isort: skip
