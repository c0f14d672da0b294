"""The attention mixer kind: grouped-query attention with RoPE over a ring-buffer cache.

Config section ``attention``; per-layer option ``window`` (a sliding window of W tokens;
unset = global attention, whose cache holds ``attention.max_context`` tokens and so bounds
the stream). Nesting keeps whole kv groups (a kv head with its query heads), leading
first. State per layer: ``key`` and ``value`` (kv_heads, W, head_dim), rotated keys.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeseq.errors import ConfigError
from edgeseq.kinds.base import Index, LayerKind, channels, positive, register


@dataclass(frozen=True)
class AttentionParams:
    n_heads: int = 4  # query heads at full width
    n_kv_heads: int = 4  # key/value heads; nesting keeps whole kv groups
    head_dim: int = 64
    rope_theta: float = 10000.0
    rope_fraction: float = 1.0  # leading fraction of head_dim that is rotated (Bamba: 0.5)
    max_context: int = 4096  # ring size of a global layer's cache: its longest stream
    qkv_bias: bool = False
    out_bias: bool = False

    @property
    def q_per_kv(self) -> int:
        return self.n_heads // self.n_kv_heads


class Attention(LayerKind):
    name = "attention"
    role = "mixer"
    section = "attention"
    size_key = "heads"
    layer_options = {"window": None}
    letters = {"A": {"window": None}, "S": {"window": "window"}}

    # ---- config ----------------------------------------------------------------------
    def parse_section(self, value: Any) -> AttentionParams | None:
        if value is None:
            return None
        if not isinstance(value, dict):
            raise ConfigError("config.attention must be a JSON object")
        known = {f.name for f in dataclasses.fields(AttentionParams)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ConfigError(f"config.attention has unknown keys {unknown}; known keys are {sorted(known)}")
        return AttentionParams(**value)

    def section_to_json(self, params: AttentionParams | None) -> dict[str, Any] | None:
        return None if params is None else dataclasses.asdict(params)

    def check_section(self, a: AttentionParams | None) -> None:
        if a is None:
            return
        for name in ("n_heads", "n_kv_heads", "head_dim", "max_context"):
            positive(f"config.attention.{name}", getattr(a, name))
        if a.n_heads % a.n_kv_heads:
            raise ConfigError(f"config.attention.n_heads ({a.n_heads}) must be a multiple of n_kv_heads ({a.n_kv_heads})")
        rot = a.head_dim * a.rope_fraction
        if not (0 <= a.rope_fraction <= 1) or abs(rot - round(rot)) > 1e-6 or round(rot) % 2:
            raise ConfigError("config.attention.rope_fraction * head_dim must be an even whole number")

    def check_layer(self, config, i: int) -> None:
        a, where = config.attention, f"config.layers[{i}]"
        if a is None:
            raise ConfigError("config has attention layers but no config.attention section; add one")
        window = config.layers[i].option("window")
        if window is not None:
            positive(f"{where}.window", window)
        kept = config.layers[i].size(self.name)
        if kept is not None and (kept > a.n_heads or kept % a.q_per_kv):
            raise ConfigError(f"{where}.heads ({kept}) must be ≤ {a.n_heads} and a multiple of {a.q_per_kv}")

    # ---- nesting ---------------------------------------------------------------------
    def full_size(self, config, i: int) -> int:
        return config.attention.n_heads

    def units(self, config, i: int, size: int) -> tuple[int, int]:
        q_per_kv = config.attention.q_per_kv
        return size // q_per_kv, q_per_kv  # a unit is one kv head with its query heads

    def unit_name(self) -> str:
        return "attention kv groups"

    def weight_index(self, config, i: int, size: int, kept: int) -> Index:
        """Rows of q and k/v for the leading ``kept`` query heads; o_proj's columns follow q."""
        a = config.attention
        q = channels(np.arange(kept), a.head_dim)
        kv = channels(np.arange(kept // a.q_per_kv), a.head_dim)
        rows = {"q_proj": q, "k_proj": kv, "v_proj": kv}
        index = {f"{proj}.{t}": (0, idx) for proj, idx in rows.items() for t in ("weight", "bias")}
        return index | {"o_proj.weight": (1, q)}

    def state_index(self, config, i: int, size: int, kept: int) -> Index:
        kv = np.arange(kept // config.attention.q_per_kv)
        return {"key": (0, kv), "value": (0, kv)}

    # ---- state -----------------------------------------------------------------------
    def ring(self, config, i: int) -> int:
        """Slots of layer i's cache: its window, or the longest stream if global."""
        window = config.layers[i].option("window")
        return window if window is not None else config.attention.max_context

    def state_shapes(self, config, i: int, size: int) -> dict[str, tuple[int, ...]]:
        a = config.attention
        kv = size // a.q_per_kv
        return {"key": (kv, self.ring(config, i), a.head_dim), "value": (kv, self.ring(config, i), a.head_dim)}

    def stream_limit(self, config, i: int) -> int | None:
        return config.attention.max_context if config.layers[i].option("window") is None else None

    def uses_position(self, config, i: int) -> bool:
        return True

    # ---- torch / export --------------------------------------------------------------
    def module(self, config, i: int, size: int):
        from edgeseq.kinds.attention.module import AttentionMixer

        return AttentionMixer(config, size, config.layers[i].option("window"))

    def graph(self, g, flavor, config, i, size, weights, prefix, x, past, position, mask, rank):
        from edgeseq.kinds.attention.graph import attention

        window = config.layers[i].option("window")
        return attention(g, config, size, self.ring(config, i), window, weights, prefix, x, past, position, mask,
                         rank)  # fmt: skip

    # ---- sizing ----------------------------------------------------------------------
    def param_shapes(self, config, i: int, size: int) -> dict[str, tuple[int, ...]]:
        a, d = config.attention, config.d_model
        q, kv = size * a.head_dim, size // a.q_per_kv * a.head_dim
        shapes = {"q_proj.weight": (q, d), "k_proj.weight": (kv, d), "v_proj.weight": (kv, d), "o_proj.weight": (d, q)}
        if a.qkv_bias:
            shapes |= {"q_proj.bias": (q,), "k_proj.bias": (kv,), "v_proj.bias": (kv,)}
        if a.out_bias:
            shapes["o_proj.bias"] = (d,)
        return shapes

    def matrices(self, config, i: int) -> frozenset[str]:
        return frozenset({"q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"})

    def describe(self, config, i: int, kept: int) -> dict[str, Any]:
        q_per_kv, full = config.attention.q_per_kv, config.part_size(i, self.name)
        return {"heads": kept, "heads_total": full, "kv_heads": kept // q_per_kv, "kv_heads_total": full // q_per_kv}


ATTENTION = register(Attention)
