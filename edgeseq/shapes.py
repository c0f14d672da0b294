"""Shapes of the decode state, without torch (runtimes that must not import torch use this)."""

from __future__ import annotations

from edgeseq.config import ModelConfig
from edgeseq.width import LayerWidth


def ring_size(config: ModelConfig, i: int) -> int:
    """Slots of attention layer i's cache: its window, or the longest stream if global."""
    window = config.layers[i].window
    return window if window is not None else config.attention.max_context


def layer_state_shapes(config: ModelConfig, i: int, width: LayerWidth) -> dict[str, tuple[int, ...]]:
    """Layer i's state tensors at ``width``, shapes without the batch axis."""
    if config.layers[i].mixer == "mamba2":
        m = config.mamba
        conv_channels = width.heads * m.headdim + 2 * m.ngroups * m.d_state
        return {"conv": (conv_channels, m.d_conv - 1), "ssm": (width.heads, m.d_state, m.headdim)}
    a = config.attention
    kv = width.heads // a.q_per_kv
    return {"key": (kv, ring_size(config, i), a.head_dim), "value": (kv, ring_size(config, i), a.head_dim)}
