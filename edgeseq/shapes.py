"""Shapes of the decode state, without torch: what each part's kind keeps per layer."""

from __future__ import annotations

from edgeseq.config import ModelConfig
from edgeseq.kinds import get_kind
from edgeseq.width import LayerWidth


def layer_state_shapes(config: ModelConfig, i: int, width: LayerWidth) -> dict[str, tuple[int, ...]]:
    """Layer i's state tensors at ``width``, shapes without the batch axis, in part order."""
    shapes: dict[str, tuple[int, ...]] = {}
    for part in config.layers[i].parts:
        shapes |= get_kind(part).state_shapes(config, i, width[part])
    return shapes
