"""Materialise a standalone submodel from a nested one.

``extract(model, spec)`` slices every weight through its layer kind's ``weight_index``
(the maps the model itself uses when run at a width), so the extracted model's logits equal the full
model's logits at that width up to floating-point rounding.
"""

from __future__ import annotations

import torch

from edgeseq.config import ModelConfig
from edgeseq.errors import WidthError
from edgeseq.model import NestedLM
from edgeseq.width import LayerWidth, WidthSpec, resolve


def extracted_config(config: ModelConfig, widths: tuple[LayerWidth, ...]) -> ModelConfig:
    """The config of the submodel with these per-layer sizes.

    The trained granularities that fit inside the submodel carry over, as fractions of
    the submodel: a half-width model of a (1, 1/2, 1/4) model is nested at (1, 1/2).
    """
    layers = tuple(spec_i.with_sizes(w.to_dict()) for spec_i, w in zip(config.layers, widths))
    sub = config.replace(layers=layers, nested_widths=(1.0,))
    return sub.replace(nested_widths=_carried_widths(config, sub))


def _carried_widths(config: ModelConfig, sub: ModelConfig) -> tuple[float, ...]:
    """Fractions r of ``sub`` that select exactly the sizes of one of ``config``'s
    nested widths; a width whose sizes no single r reproduces is dropped."""
    kept = resolve(sub, None)
    carried = {1.0}
    for w in config.nested_widths:
        try:
            want = resolve(config, w)
        except WidthError:
            continue
        ratios = {round(a[k] / b[k], 6) for a, b in zip(want, kept) for k, _ in b.sizes if b[k]}
        for r in sorted(ratios):
            if not 0 < r <= 1:
                continue
            try:
                if resolve(sub, r) == want:
                    carried.add(r)
                    break
            except WidthError:
                continue
    return tuple(sorted(carried, reverse=True))


def extract(model: NestedLM, spec: WidthSpec | float | str) -> NestedLM:
    """A new model holding only the weights ``spec`` keeps (copies, same dtype and device)."""
    spec = spec if isinstance(spec, WidthSpec) else WidthSpec.parse(str(spec))
    return extract_at(model, resolve(model.config, spec))


def extract_at(model: NestedLM, widths: tuple[LayerWidth, ...]) -> NestedLM:
    """``extract`` at per-layer sizes already resolved (a bundle's ``layer_widths``)."""
    config = extracted_config(model.config, widths)
    weights = {k: v.detach().clone() for k, v in model.sliced_state_dict(widths).items()}
    with torch.device("meta"):
        sub = NestedLM(config)
    sub.load_state_dict(weights, strict=True, assign=True)
    return sub.to(model.embedding.weight.device)
