"""Graph code for one block: pre-norm, its mixers (each its kind's piece), optional MLP.

    h -> RMSNorm -> mixer_1 ... mixer_k (each adds into h) -> (+ RMSNorm -> MLP) -> h

The block only routes: every part's graph comes from its layer kind (``LayerKind.graph``),
with the part's weights (numpy, short names), their initializer prefix and the past state
names it declared. ``rank`` is 2 for the step graph ([b, d] hidden states) and 3 for
prefill ([b, t, d]); a prefill hands every part its ``attention_mask`` too.
"""

from __future__ import annotations

import numpy as np

from edgeseq.config import ModelConfig
from edgeseq.export.builder import GraphBuilder
from edgeseq.kinds import get_kind


def part_weights(weights: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}


def block(g: GraphBuilder, flavor, config: ModelConfig, i: int, weights: dict[str, np.ndarray], h: str,
          past: dict[str, str], position: str | None, mask: str | None, rank: int) -> tuple[str, dict[str, str]]:
    """h + mixers(norm(h)) (+ mlp(mlp_norm(.))) -> h, present state of layer i by short name."""
    spec, prefix = config.layers[i], f"layers.{i}."
    presents: dict[str, str] = {}

    def run(part: str, x: str) -> str:
        kind, p = get_kind(part), f"{prefix}{spec.prefix(part)}."
        size = config.part_size(i, part)
        own = {name: past[name] for name in kind.state_shapes(config, i, size)}
        y, present = kind.graph(g, flavor, config, i, size, part_weights(weights, p), p, x, own, position, mask, rank)
        presents.update(present)
        return y

    if spec.mixers:
        x = g.rmsnorm(h, g.weight(f"{prefix}norm.weight", weights[f"{prefix}norm.weight"]), config.norm_eps)
        for part in spec.mixers:
            h = g.op("Add", h, run(part, x))
    if spec.mlp:
        x = g.rmsnorm(h, g.weight(f"{prefix}mlp_norm.weight", weights[f"{prefix}mlp_norm.weight"]), config.norm_eps)
        h = g.op("Add", h, run(spec.mlp, x))
    return h, presents
