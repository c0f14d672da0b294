"""The Mamba2 (SSD) mixer kind: its config section ``mamba``, nesting, state and pieces.

Nesting (MatMamba): the inner width is nested per head — z and x channels, dt, dt_bias,
A_log, D and the norm weight follow the kept heads, while B, C (all groups), d_state and
d_conv stay whole. With G groups each group keeps its leading heads, so every head keeps
the B/C group it was trained with; the unit of nesting is one head per group.

State per layer: ``conv`` (conv_channels, d_conv-1), the last inputs of the causal conv
over [x | B | C], and ``ssm`` (h, n, p).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeseq.errors import ConfigError
from edgeseq.kinds.base import Index, LayerKind, channels, leading_per_group, positive, register, whole


@dataclass(frozen=True)
class Mamba2Params:
    d_state: int = 64  # N: state size per head, also the width of B and C per group
    headdim: int = 32  # P: channels per head; one head is the unit of nesting
    ngroups: int = 1  # G: B/C groups, each shared by n_heads / G heads
    expand: float = 2.0  # d_inner = expand * d_model at full width
    d_conv: int = 4  # kernel of the causal depthwise conv over x, B and C
    chunk_size: int = 64  # SSD chunk length for prefill; any sequence length is allowed
    dt_min: float = 0.001  # dt initialisation range (training only)
    dt_max: float = 0.1
    dt_limit: tuple[float, float] = (0.0, math.inf)  # clamp of softplus(dt + dt_bias)
    conv_bias: bool = True  # conv1d carries a bias (mamba_ssm and HF default)
    proj_bias: bool = False  # in_proj/out_proj carry biases
    rmsnorm: bool = True  # y = RMSNorm(y * silu(z)) (grouped, with ``norm.weight``); False: y * silu(z) (Falcon-H1)

    def n_heads(self, d_model: int) -> int:
        return whole(self.expand * d_model / self.headdim, "mamba.expand * d_model / headdim")


class Mamba2(LayerKind):
    name = "mamba2"
    role = "mixer"
    section = "mamba"
    size_key = "heads"
    letters = {"M": {}}

    # ---- config ----------------------------------------------------------------------
    def parse_section(self, value: Any) -> Mamba2Params:
        value = dict(value or {})
        known = {f.name for f in dataclasses.fields(Mamba2Params)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ConfigError(f"config.mamba has unknown keys {unknown}; known keys are {sorted(known)}")
        if "dt_limit" in value:
            lo, hi = value["dt_limit"]
            value["dt_limit"] = (float(lo), math.inf if hi is None else float(hi))
        return Mamba2Params(**value)

    def section_to_json(self, params: Mamba2Params) -> dict[str, Any]:
        d = dataclasses.asdict(params)
        lo, hi = params.dt_limit
        d["dt_limit"] = [lo, None if math.isinf(hi) else hi]
        return d

    def default_section(self) -> Mamba2Params:
        return Mamba2Params()

    def check_section(self, m: Mamba2Params) -> None:
        for name in ("d_state", "headdim", "ngroups", "d_conv", "chunk_size"):
            positive(f"config.mamba.{name}", getattr(m, name))
        if not (m.dt_limit[0] >= 0 and m.dt_limit[1] > m.dt_limit[0]):
            raise ConfigError(f"config.mamba.dt_limit must satisfy 0 ≤ low < high (got {m.dt_limit})")

    def check_layer(self, config, i: int) -> None:
        m, full = config.mamba, self.full_size(config, i)
        if full % m.ngroups:
            raise ConfigError(f"mamba2 heads ({full}) must be a multiple of config.mamba.ngroups ({m.ngroups})")
        kept = config.layers[i].size(self.name)
        if kept is not None and (kept > full or kept % m.ngroups):
            raise ConfigError(f"config.layers[{i}] mamba2 heads ({kept}) must be ≤ {full} and a multiple of "
                              f"ngroups ({m.ngroups})")  # fmt: skip

    # ---- nesting ---------------------------------------------------------------------
    def full_size(self, config, i: int) -> int:
        return config.mamba.n_heads(config.d_model)

    def units(self, config, i: int, size: int) -> tuple[int, int]:
        groups = config.mamba.ngroups
        return size // groups, groups  # a unit is one head in each group

    def unit_name(self) -> str:
        return "mamba2 heads per group"

    def weight_index(self, config, i: int, size: int, kept: int) -> Index:
        """in_proj rows are laid out [z (d_inner) | x (d_inner) | B (G*N) | C (G*N) | dt (H)];
        the conv runs over [x | B | C]; out_proj's columns are the inner channels."""
        m = config.mamba
        d_inner, bc = size * m.headdim, 2 * m.ngroups * m.d_state
        heads = leading_per_group(size, m.ngroups, kept)
        inner = channels(heads, m.headdim)
        conv = np.concatenate([inner, d_inner + np.arange(bc)])
        in_proj = np.concatenate([inner, d_inner + conv, 2 * d_inner + bc + heads])
        rows = {"in_proj.weight": in_proj, "in_proj.bias": in_proj, "conv1d.weight": conv, "conv1d.bias": conv,
                "dt_bias": heads, "A_log": heads, "D": heads, "norm.weight": inner}  # fmt: skip
        return {name: (0, index) for name, index in rows.items()} | {"out_proj.weight": (1, inner)}

    def state_index(self, config, i: int, size: int, kept: int) -> Index:
        index = self.weight_index(config, i, size, kept)
        return {"conv": index["conv1d.weight"], "ssm": index["D"]}

    # ---- state -----------------------------------------------------------------------
    def state_shapes(self, config, i: int, size: int) -> dict[str, tuple[int, ...]]:
        m = config.mamba
        conv_channels = size * m.headdim + 2 * m.ngroups * m.d_state
        return {"conv": (conv_channels, m.d_conv - 1), "ssm": (size, m.d_state, m.headdim)}

    # ---- torch / export --------------------------------------------------------------
    def module(self, config, i: int, size: int):
        from edgeseq.kinds.mamba2.module import Mamba2Mixer

        return Mamba2Mixer(config, size)

    def check_export(self, config, i: int) -> None:
        if config.mamba.d_conv < 2:
            raise ConfigError("export needs mamba.d_conv >= 2 (a conv state of at least one token)")

    def graph(self, g, flavor, config, i, size, weights, prefix, x, past, position, mask, rank):
        from edgeseq.kinds.mamba2.graph import mamba2

        return mamba2(g, flavor, config, size, weights, prefix, x, past, mask, rank)

    # ---- sizing ----------------------------------------------------------------------
    def param_shapes(self, config, i: int, size: int) -> dict[str, tuple[int, ...]]:
        m, d = config.mamba, config.d_model
        d_inner, bc = size * m.headdim, 2 * m.ngroups * m.d_state
        shapes = {
            "in_proj.weight": (2 * d_inner + bc + size, d),
            "conv1d.weight": (d_inner + bc, 1, m.d_conv),
            "dt_bias": (size,), "A_log": (size,), "D": (size,),
            "out_proj.weight": (d, d_inner),
        }  # fmt: skip
        if m.rmsnorm:
            shapes["norm.weight"] = (d_inner,)
        if m.proj_bias:
            shapes |= {"in_proj.bias": (2 * d_inner + bc + size,), "out_proj.bias": (d,)}
        if m.conv_bias:
            shapes["conv1d.bias"] = (d_inner + bc,)
        return shapes

    def matrices(self, config, i: int) -> frozenset[str]:
        return frozenset({"in_proj.weight", "out_proj.weight"})


MAMBA2 = register(Mamba2)
