"""What a layer kind is, and the registry of kinds.

A block of the model is a list of mixers applied in parallel to its normed input (their
outputs summed into the residual) plus an optional MLP with its own pre-norm. Every
mixer and MLP is a *part* of some registered kind, and the kind answers every question
about it:

    config      its section of ``ModelConfig`` (``section``, ``parse_section``,
                ``section_to_json``), its per-layer options (``layer_options``), checks
    nesting     its units (``units``) and the slicing maps of its weights
                (``weight_index``) and of its state (``state_index``)
    state       its state tensors per layer (``state_shapes``), what limits a stream
    torch       its module (``module``), which calls the reference functions
    export      its ONNX graph piece (``graph``), per flavor where the flavors differ
    sizing      its parameters' shapes and which of them are MatMul matrices
                (``param_shapes``, ``matrices``): what quantization touches

Code outside a kind never tests which kind it has; it asks the kind. Adding a kind is a
module that subclasses ``LayerKind`` and calls ``register``. Whether a kind is *nested*
(trained so that its leading units form a smaller working part) is a property of the
checkpoint (``ModelConfig.nested_kinds``), not of the kind.

This module imports neither torch nor onnx: config, width and sizing use kinds without
either. A kind's torch module and graph code are imported when first asked for.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from edgeseq.errors import ConfigError, UsageError

Index = dict[str, tuple[int, np.ndarray]]  # parameter or state name -> (axis, kept indices along it)


class LayerKind:
    """One kind of mixer or MLP. Subclass, set the class attributes, implement the methods."""

    name: ClassVar[str]  # as written in config.json
    role: ClassVar[str]  # "mixer" or "mlp"
    section: ClassVar[str | None] = None  # its key in ModelConfig / config.json, if it has model-level params
    layer_options: ClassVar[Mapping[str, Any]] = {}  # per-layer options it reads, with defaults
    size_key: ClassVar[str] = "size"  # the per-layer size's key in single-mixer config.json layers
    letters: ClassVar[Mapping[str, Mapping[str, Any]]] = {}  # ``ModelConfig.from_pattern`` letters -> options

    # ---- config ----------------------------------------------------------------------
    def parse_section(self, value: Any) -> Any:
        """config.json's section (a dict, number or None) -> the params object."""
        return value

    def section_to_json(self, params: Any) -> Any:
        return params

    def default_section(self) -> Any:
        """The params when config.json has no section but a layer uses the kind; raise if
        it cannot do without one."""
        raise ConfigError(f"config has {self.name} layers but no config.{self.section} section; add one")

    def check_section(self, params: Any) -> None:
        """Raise ``ConfigError`` for a bad value in the kind's section."""

    def check_layer(self, config, i: int) -> None:
        """Raise ``ConfigError`` for a bad per-layer option or size of layer ``i``."""

    # ---- nesting ---------------------------------------------------------------------
    def full_size(self, config, i: int) -> int:
        """Layer i's size at full width (heads, hidden units, ...), as ``sizes`` count it."""
        raise NotImplementedError

    def units(self, config, i: int, size: int) -> tuple[int, int]:
        """(units, size per unit) of a part of ``size``: a width keeps a whole number of units."""
        return size, 1

    def unit_name(self) -> str:
        return f"{self.name} units"

    def weight_index(self, config, i: int, size: int, kept: int) -> Index:
        """Which entries of each parameter a part of ``size`` keeps at ``kept``; parameters
        not named stay whole."""
        raise NotImplementedError

    def state_index(self, config, i: int, size: int, kept: int) -> Index:
        """The same for its state tensors (axes without the batch axis)."""
        return {}

    # ---- state -----------------------------------------------------------------------
    def state_shapes(self, config, i: int, size: int) -> dict[str, tuple[int, ...]]:
        """Layer i's state tensors at ``size``, shapes without the batch axis."""
        return {}

    def stream_limit(self, config, i: int) -> int | None:
        """The longest stream the part takes (a global attention cache), None if unbounded."""
        return None

    def uses_position(self, config, i: int) -> bool:
        """Whether the part reads the absolute token position (graphs then carry ``position``)."""
        return False

    # ---- torch -----------------------------------------------------------------------
    def module(self, config, i: int, size: int):
        """The torch module of layer i's part (an ``nn.Module`` with ``forward`` and ``step``)."""
        raise NotImplementedError

    # ---- export ----------------------------------------------------------------------
    def check_export(self, config, i: int) -> None:
        """Raise ``ConfigError`` if the part cannot be exported."""

    def graph(self, g, flavor, config, i: int, size: int, weights: dict[str, np.ndarray], prefix: str, x: str,
              past: dict[str, str], position: str | None, mask: str | None, rank: int) -> tuple[str, dict[str, str]]:
        """x [b,(t,)d] normed -> (out [b,(t,)d], present state names); ``weights`` are the
        part's (short names), ``prefix`` their initializer prefix, ``rank`` 2 for the step
        graph and 3 for prefill. ``mask`` (prefill only, else None): the int64 [b, t]
        ``attention_mask``, 0 = a left pad, which must leave the part's state untouched
        (its output there is don't-care but finite)."""
        raise NotImplementedError

    # ---- sizing ----------------------------------------------------------------------
    def param_shapes(self, config, i: int, size: int) -> dict[str, tuple[int, ...]]:
        """Every parameter of the part at ``size``, short names (as the module names them)."""
        raise NotImplementedError

    def matrices(self, config, i: int) -> frozenset[str]:
        """Parameters stored as MatMul weights: what int8/int4 quantize."""
        return frozenset()

    def describe(self, config, i: int, kept: int) -> dict[str, Any]:
        """What a layer keeps, for tables: {"heads": 8, "heads_total": 16, ...}."""
        return {self.size_key: kept, f"{self.size_key}_total": config.part_size(i, self.name)}

    def pattern_token(self, config, i: int) -> str:
        """The letter ``ModelConfig.from_pattern`` spells the part with."""
        options = config.layers[i].options_dict()
        for letter, wants in self.letters.items():
            if all((options.get(k) is not None) == (v is not None) for k, v in wants.items()):
                return letter
        return self.name


# ---- registry --------------------------------------------------------------------------
KINDS: dict[str, LayerKind] = {}
DEFAULT_MLP = "mlp"  # the kind ``mlp: true`` in a config.json layer means


def register(kind: LayerKind | type[LayerKind]) -> LayerKind:
    """Register a kind (an instance or a class, instantiated here); returns the instance.
    Re-registering a name replaces the kind (tests register their own)."""
    kind = kind() if isinstance(kind, type) else kind
    if kind.role not in ("mixer", "mlp"):
        raise UsageError(f"layer kind {kind.name!r} has role {kind.role!r}; use 'mixer' or 'mlp'")
    KINDS[kind.name] = kind
    return kind


def unregister(name: str) -> None:
    KINDS.pop(name, None)


def get_kind(name: str) -> LayerKind:
    if name not in KINDS:
        raise ConfigError(f"unknown layer kind {name!r}; known kinds: {', '.join(sorted(KINDS))}")
    return KINDS[name]


def by_section(section: str) -> LayerKind | None:
    return next((k for k in KINDS.values() if k.section == section), None)


# ---- helpers the kinds share -----------------------------------------------------------
def leading_per_group(n: int, groups: int, kept: int) -> np.ndarray:
    """Indices of the leading kept/groups entries of each of ``groups`` contiguous groups of n."""
    per_group, keep = n // groups, kept // groups
    return (np.arange(groups)[:, None] * per_group + np.arange(keep)[None, :]).reshape(-1)


def channels(units: np.ndarray, width: int) -> np.ndarray:
    """Channel indices of the given units of ``width`` channels each, unit-major."""
    return (units[:, None] * width + np.arange(width)[None, :]).reshape(-1)


def positive(where: str, value: Any, *, allow_zero: bool = False) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 0 if allow_zero else value >= 1)
    if not ok:
        raise ConfigError(f"{where} must be an integer {'≥ 0' if allow_zero else '≥ 1'} (got {value!r})")


def whole(x: float, what: str) -> int:
    n = round(x)
    if abs(x - n) > 1e-6 or n < 1:
        raise ConfigError(f"{what} must be a whole number ≥ 1 (got {x:g}); adjust the config")
    return n
