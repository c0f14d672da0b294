"""The mixture-of-experts MLP kind (``moe``): a shared gated MLP that every token runs plus
``top_k`` of ``n_experts`` routed gated experts, as IBM Granite 4.0-H builds its MLP.

    y = shared(x) + sum over the k experts with the largest router logits of
        softmax(those k logits)_e * down_e(silu(gate_e(x)) * up_e(x))

Config section ``moe`` (``MoEParams``). The part's size is the shared MLP's hidden units
(``d_shared``); nesting keeps its leading units and every expert whole (routed experts
were never trained nested, and dropping experts would change which ones a token gets).
Expert weights are 3-D, [experts, out, in]: ``experts.gate_proj`` and ``experts.up_proj``
(e, f, d), ``experts.down_proj`` (e, d, f). No state.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeseq.errors import ConfigError
from edgeseq.kinds.base import Index, LayerKind, positive, register

SHARED = ("gate_proj.weight", "up_proj.weight", "down_proj.weight")
EXPERTS = ("experts.gate_proj", "experts.up_proj", "experts.down_proj")


@dataclass(frozen=True)
class MoEParams:
    n_experts: int = 8  # routed experts per layer
    top_k: int = 2  # experts each token runs
    d_expert: int = 64  # f: hidden units of one routed expert
    d_shared: int = 64  # s: hidden units of the shared MLP every token runs


class MoE(LayerKind):
    name = "moe"
    role = "mlp"
    section = "moe"
    size_key = "d_shared"
    activation = "silu"

    # ---- config ----------------------------------------------------------------------
    def parse_section(self, value: Any) -> MoEParams | None:
        if value is None:
            return None
        if not isinstance(value, dict):
            raise ConfigError("config.moe must be a JSON object")
        known = {f.name for f in dataclasses.fields(MoEParams)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ConfigError(f"config.moe has unknown keys {unknown}; known keys are {sorted(known)}")
        return MoEParams(**value)

    def section_to_json(self, params: MoEParams | None) -> dict[str, Any] | None:
        return None if params is None else dataclasses.asdict(params)

    def check_section(self, m: MoEParams | None) -> None:
        if m is None:
            return
        for name in ("n_experts", "top_k", "d_expert", "d_shared"):
            positive(f"config.moe.{name}", getattr(m, name))
        if m.top_k > m.n_experts:
            raise ConfigError(f"config.moe.top_k ({m.top_k}) must be ≤ n_experts ({m.n_experts})")

    def check_layer(self, config, i: int) -> None:
        if config.moe is None:
            raise ConfigError("config has moe layers but no config.moe section; add one")

    # ---- nesting ---------------------------------------------------------------------
    def full_size(self, config, i: int) -> int:
        return config.moe.d_shared

    def unit_name(self) -> str:
        return "shared MLP hidden units"

    def weight_index(self, config, i: int, size: int, kept: int) -> Index:
        rows = np.arange(kept)
        return {"gate_proj.weight": (0, rows), "up_proj.weight": (0, rows), "down_proj.weight": (1, rows)}

    def describe(self, config, i: int, kept: int) -> dict[str, Any]:
        m = config.moe
        return {"d_shared": kept, "d_shared_total": config.part_size(i, self.name), "experts": m.n_experts,
                "top_k": m.top_k}  # fmt: skip

    # ---- torch / export --------------------------------------------------------------
    def module(self, config, i: int, size: int):
        from edgeseq.kinds.moe.module import MoEModule

        return MoEModule(config.d_model, size, config.moe, self.activation)

    def graph(self, g, flavor, config, i, size, weights, prefix, x, past, position, mask, rank):
        from edgeseq.kinds.moe.graph import moe

        return moe(g, config.moe, weights, prefix, x, rank), {}

    # ---- sizing ----------------------------------------------------------------------
    def param_shapes(self, config, i: int, size: int) -> dict[str, tuple[int, ...]]:
        m, d = config.moe, config.d_model
        e, f = m.n_experts, m.d_expert
        return {
            "gate_proj.weight": (size, d), "up_proj.weight": (size, d), "down_proj.weight": (d, size),
            "router.weight": (e, d),
            "experts.gate_proj": (e, f, d), "experts.up_proj": (e, f, d), "experts.down_proj": (e, d, f),
        }  # fmt: skip

    def matrices(self, config, i: int) -> frozenset[str]:
        """The shared MLP and the experts (3-D, [experts, out, in]); the router (e, d) stays
        fp32 in every precision: a rounded logit can change which experts a token runs."""
        return frozenset(SHARED + EXPERTS)


MOE = register(MoE)
