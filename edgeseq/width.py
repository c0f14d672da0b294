"""Width specs: which prefix of every layer a submodel keeps.

A width is a fraction of each part's nesting units, which its layer kind defines
(``LayerKind.units``): mamba2 heads counted per B/C group, attention kv groups, MLP
hidden units. Kinds the checkpoint was not trained nested (``ModelConfig.nested_kinds``)
stay whole at every width.

A fraction is snapped to the nearest whole number of units k when |fraction - k/units|
is at most ``SNAP_TOLERANCE`` (so 0.33 means a third, and 0.3 of 24 heads means 7);
anything else is refused with the nearest widths that work. Layers with many units
(MLPs) therefore accept any fraction, rounded to whole units.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from edgeseq.config import ModelConfig
from edgeseq.errors import WidthError
from edgeseq.kinds import get_kind

SNAP_TOLERANCE = 0.01  # largest |fraction - k/units| that still snaps to k units


@dataclass(frozen=True)
class LayerWidth:
    """Absolute sizes one layer keeps, per part kind: {"mamba2": 12, "mlp": 96}."""

    sizes: tuple[tuple[str, int], ...]

    @classmethod
    def of(cls, sizes: dict[str, int]) -> LayerWidth:
        return cls(tuple(sorted(sizes.items())))

    def __getitem__(self, kind: str) -> int:
        return dict(self.sizes)[kind]

    def to_dict(self) -> dict[str, int]:
        return dict(self.sizes)


@dataclass(frozen=True)
class WidthSpec:
    """One fraction for every layer, or one per layer (Mix'n'Match)."""

    fractions: tuple[float, ...]

    @classmethod
    def uniform(cls, width: float) -> WidthSpec:
        return cls((float(width),))

    @classmethod
    def parse(cls, text: str) -> WidthSpec:
        """'0.5', '1/2' or a comma list '1,1,0.5,0.25' (one per layer)."""
        parts = [p.strip() for p in str(text).split(",") if p.strip()]
        if not parts:
            raise WidthError("empty width; give a fraction such as 0.5 or a per-layer list such as 1,0.5,0.5")
        values = []
        for p in parts:
            try:
                values.append(float(Fraction(p)))
            except (ValueError, ZeroDivisionError):
                raise WidthError(f"width {p!r} is not a number; use a fraction such as 0.5 or 1/4") from None
        return cls(tuple(values))

    def per_layer(self, n_layer: int) -> tuple[float, ...]:
        for w in self.fractions:
            if not (math.isfinite(w) and 0 < w <= 1):
                raise WidthError(f"width {w:g} is out of range; use a fraction in (0, 1]")
        if len(self.fractions) == 1:
            return self.fractions * n_layer
        if len(self.fractions) != n_layer:
            raise WidthError(
                f"{len(self.fractions)} per-layer widths given for a model of {n_layer} layers; give one or {n_layer}"
            )
        return self.fractions

    def __str__(self) -> str:
        return ",".join(f"{w:g}" for w in self.fractions)


def _snap(w: float, units: int, where: str) -> int:
    k = round(w * units)
    if k >= 1 and abs(w - k / units) <= SNAP_TOLERANCE:
        return k
    if w * units < 1 - SNAP_TOLERANCE * units:
        raise WidthError(f"width {w:g} keeps no unit of {where} ({units} units); the narrowest width is {1 / units:g}")
    lo, hi = math.floor(w * units), math.ceil(w * units)
    options = [f"{n / units:g} ({n}/{units})" for n in sorted({max(lo, 1), max(hi, 1)}) if n <= units]
    raise WidthError(f"width {w:g} falls between whole units of {where} ({units} units); use {' or '.join(options)}")


def resolve(config: ModelConfig, spec: WidthSpec | float | str | None) -> tuple[LayerWidth, ...]:
    """Absolute per-layer sizes of ``config`` at ``spec`` (None = the config as stored)."""
    if spec is None:
        spec = WidthSpec.uniform(1.0)
    elif not isinstance(spec, WidthSpec):
        spec = WidthSpec.parse(str(spec))
    out = []
    for i, w in enumerate(spec.per_layer(config.n_layer)):
        sizes = {}
        for part in config.layers[i].parts:
            kind, stored = get_kind(part), config.part_size(i, part)
            if not config.is_nested(part):  # not trained nested: kept whole at every width
                sizes[part] = stored
                continue
            units, per_unit = kind.units(config, i, stored)
            sizes[part] = _snap(w, units, f"layer {i} ({kind.unit_name()})") * per_unit
        out.append(LayerWidth.of(sizes))
    return tuple(out)


def full(config: ModelConfig) -> tuple[LayerWidth, ...]:
    return resolve(config, None)


def kept_fractions(config: ModelConfig, widths: tuple[LayerWidth, ...]) -> list[dict[str, Fraction]]:
    """What each layer's nested parts keep, as exact fractions of their stored size."""
    return [
        {part: Fraction(w[part], config.part_size(i, part)) for part in spec.parts if config.is_nested(part)}
        for i, (spec, w) in enumerate(zip(config.layers, widths))
    ]


def exact_width(config: ModelConfig, spec: WidthSpec) -> str:
    """The width a spec really keeps: "7/24 = 0.2917" where every nested part keeps the same
    fraction and "0.3" would not say it exactly, else the spec as asked."""
    kept = {f for layer in kept_fractions(config, resolve(config, spec)) for f in layer.values()}
    if len(spec.fractions) == 1 and len(kept) == 1:
        (f,) = kept
        if f.denominator > 1 and (abs(float(f) - spec.fractions[0]) > 1e-12 or len(f"{float(f):g}") > 6):
            return f"{f.numerator}/{f.denominator} = {float(f):.4g}"
    return str(spec)


def untrained_warning(config: ModelConfig, spec: WidthSpec, model: str = "MODEL") -> str | None:
    """A one-line warning when ``spec`` keeps, in some layer, sizes the checkpoint was not
    trained at (None when every layer sits at a trained width: a plain nested width or a
    Mix'n'Match of them), naming the nearest trained widths and the ``edgeseq eval`` command
    (on ``model``, as the user named it) that measures the cost against them."""
    widths = resolve(config, spec)
    trained = []
    for w in config.nested_widths:
        with contextlib.suppress(WidthError):
            trained.append((w, resolve(config, w)))
    if all(any(layer == at[i] for _, at in trained) for i, layer in enumerate(widths)):
        return None
    asked = exact_width(config, spec).split(" = ")[0]
    below = [w for w, _ in trained if w <= min(spec.fractions)]  # a single width is never itself trained here
    above = [w for w, _ in trained if w >= max(spec.fractions)]
    near = ([max(below)] if below else []) + ([min(above)] if above else [])
    compare = " ".join(f"--width {w:g}" for w in near or [1.0]) + f" --width {asked}"
    measure = f"measure what it costs with `edgeseq eval {model} {compare}` (held-out bits per byte, side by side)"
    if [w for w, _ in trained] == [1.0]:
        return f"this checkpoint was not trained nested, so width {asked} is an untested cut; {measure}"
    if len(spec.fractions) > 1:
        names = ", ".join(f"{w:g}" for w, _ in trained)
        return f"widths {asked} keep sizes no trained width has in some layers (trained: {names}); {measure}"
    return f"width {asked} was not trained (the nearest trained widths are {' and '.join(f'{w:g}' for w in near)}); {measure}"


def width_value(width: Any) -> Fraction | None:
    """A width's value (1/2 and 0.5 are one width); None for text that is none."""
    try:
        return Fraction(str(width)).limit_denominator(1 << 16)
    except (ValueError, ZeroDivisionError):
        return None


def find_width(labels: list[str], width: Any) -> str | None:
    """The one of ``labels`` that names ``width``, given as a label or by value ("0.5" finds "1/2")."""
    return next((w for w in labels if w == str(width) or width_value(w) == width_value(width)), None)
