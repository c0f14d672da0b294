"""Materialise a standalone submodel from a nested one.

``extract(model, spec)`` slices every weight through ``edgeseq.nesting`` (the maps the
model itself uses when run at a width), so the extracted model's logits equal the full
model's logits at that width up to floating-point rounding.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from edgeseq.config import ModelConfig
from edgeseq.model import NestedLM
from edgeseq.width import LayerWidth, WidthSpec, resolve


def extracted_config(config: ModelConfig, widths: tuple[LayerWidth, ...], spec: WidthSpec | None = None) -> ModelConfig:
    """The config of the submodel with these per-layer sizes.

    Nested granularities carry over, rescaled, when the width is uniform: a half-width
    model of a (1, 1/2, 1/4) model is itself nested at (1, 1/2).
    """
    layers = tuple(
        replace(spec_i, heads=w.heads, d_mlp=w.d_mlp if spec_i.mlp else None)
        for spec_i, w in zip(config.layers, widths)
    )
    nested = (1.0,)
    if spec is not None and len(set(spec.per_layer(config.n_layer))) == 1:
        f = spec.per_layer(config.n_layer)[0]
        nested = tuple(sorted({round(w / f, 6) for w in config.nested_widths if w <= f + 1e-9}, reverse=True))
    return config.replace(layers=layers, nested_widths=nested or (1.0,))


def extract(model: NestedLM, spec: WidthSpec | float | str) -> NestedLM:
    """A new model holding only the weights ``spec`` keeps (copies, same dtype and device)."""
    spec = spec if isinstance(spec, WidthSpec) else WidthSpec.parse(str(spec))
    widths = resolve(model.config, spec)
    config = extracted_config(model.config, widths, spec)
    weights = {k: v.detach().clone() for k, v in model.sliced_state_dict(widths).items()}
    with torch.device("meta"):
        sub = NestedLM(config)
    sub.load_state_dict(weights, strict=True, assign=True)
    return sub.to(model.embedding.weight.device)
