"""Model configuration: frozen dataclasses with a JSON round trip.

A config describes one model at one set of widths. Each layer is a block: mixers applied
in parallel to its normed input, then an optional MLP (``LayerSpec``). What a mixer or MLP
is — its model-level section (``mamba``, ``attention``, ``d_mlp``, ...), its per-layer
options and sizes — belongs to its layer kind (``edgeseq.kinds``); this module only
routes values to the kinds and checks the model-level fields.

The full nested model leaves the per-layer sizes unset; an extracted submodel sets them
(``LayerSpec.sizes``), so every layer can have its own width (Mix'n'Match).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from edgeseq.errors import ConfigError
from edgeseq.kinds import DEFAULT_MLP, KINDS, by_section, get_kind, positive

TOP_LEVEL = (
    "d_model", "n_layer", "vocab_size", "layers", "tie_embeddings", "norm_eps", "nested_widths", "nested_kinds",
    "embedding_scale",
)  # fmt: skip


@dataclass(frozen=True)
class LayerSpec:
    mixers: tuple[str, ...]  # kinds applied in parallel to the block's normed input, outputs summed
    mlp: str | None = None  # the MLP kind after the mixers (own pre-norm); None: no MLP
    options: tuple[tuple[str, Any], ...] = ()  # per-layer options of its kinds, e.g. (("window", 256),)
    sizes: tuple[tuple[str, int], ...] = ()  # kept size per kind of an extracted layer; unset = full

    @classmethod
    def of(cls, *mixers: str, mlp: str | bool | None = None, sizes: dict[str, int] | None = None,
           **options: Any) -> LayerSpec:
        """``LayerSpec.of("attention", mlp=True, window=256)``; ``mlp=True`` is the default MLP kind."""
        mlp = DEFAULT_MLP if mlp is True else (mlp or None)
        opts = tuple(sorted((k, v) for k, v in options.items() if v is not None))
        return cls(tuple(mixers), mlp, opts, tuple(sorted((sizes or {}).items())))

    @property
    def parts(self) -> tuple[str, ...]:
        return self.mixers + ((self.mlp,) if self.mlp else ())

    def option(self, name: str, default: Any = None) -> Any:
        return dict(self.options).get(name, default)

    def options_dict(self) -> dict[str, Any]:
        return dict(self.options)

    def size(self, kind: str) -> int | None:
        return dict(self.sizes).get(kind)

    def prefix(self, kind: str) -> str:
        """Where the part's weights live in the block: ``mixer`` (the one mixer), ``mixers.<kind>``
        (parallel mixers) or ``mlp``; checkpoint keys are ``layers.{i}.<prefix>.<name>``."""
        if kind == self.mlp:
            return "mlp"
        return "mixer" if len(self.mixers) == 1 else f"mixers.{kind}"

    def with_sizes(self, sizes: dict[str, int]) -> LayerSpec:
        return LayerSpec(self.mixers, self.mlp, self.options, tuple(sorted(sizes.items())))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"mixers": list(self.mixers), "mlp": self.mlp, **self.options_dict()}
        if self.sizes:
            d["sizes"] = dict(self.sizes)
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str) -> LayerSpec:
        """A layer as config.json writes it, or in the single-mixer form of earlier versions
        (``{"mixer": "attention", "mlp": true, "window": 6, "heads": 4, "d_mlp": 24}``)."""
        if not isinstance(d, dict):
            raise ConfigError(f"{where} must be a JSON object")
        d = dict(d)
        if "mixer" in d:  # the single-mixer form: sizes under each kind's size key
            mixers = [d.pop("mixer")]
        else:
            mixers = d.pop("mixers", None)
        if not isinstance(mixers, list) or not all(isinstance(m, str) for m in mixers):
            raise ConfigError(f"{where} needs 'mixers', a list of layer kinds (known: {', '.join(sorted(KINDS))})")
        mlp = d.pop("mlp", None)
        mlp = DEFAULT_MLP if mlp is True else (mlp or None)
        sizes = d.pop("sizes", {}) or {}
        if not isinstance(sizes, dict):
            raise ConfigError(f"{where}.sizes must map layer kinds to sizes")
        for kind in [*mixers, *([mlp] if isinstance(mlp, str) else [])]:
            key = get_kind(kind).size_key if kind in KINDS else None
            if key in d and key not in _options_of([*mixers, mlp]):
                sizes[kind] = d.pop(key)
        return cls.of(*mixers, mlp=mlp, sizes=sizes, **d)


def _options_of(parts: list[str | None]) -> set[str]:
    return {o for p in parts if p in KINDS for o in get_kind(p).layer_options}


@dataclass(frozen=True, init=False)
class ModelConfig:
    d_model: int
    n_layer: int
    vocab_size: int
    layers: tuple[LayerSpec, ...]
    sections: tuple[tuple[str, Any], ...]  # the kinds' model-level params: ("mamba", Mamba2Params(...)), ...
    tie_embeddings: bool  # lm_head shares the embedding matrix
    norm_eps: float
    nested_widths: tuple[float, ...]  # trained granularities
    nested_kinds: tuple[str, ...] | None  # kinds trained nested; None: every kind (edgeseq's own models)
    embedding_scale: float  # the looked-up rows are multiplied by it (Granite, μP); with a tied head only
    # the lookup is scaled, so it cannot be folded into the shared table

    def __init__(self, d_model: int, n_layer: int, vocab_size: int, layers: tuple[LayerSpec, ...], *,
                 tie_embeddings: bool = True, norm_eps: float = 1e-5,
                 nested_widths: tuple[float, ...] = (1.0, 0.5, 0.25, 0.125), nested_kinds: tuple[str, ...] | None = None,
                 embedding_scale: float = 1.0, sections: tuple[tuple[str, Any], ...] = (), **by_name: Any):  # fmt: skip
        """Kind sections are keyword arguments by section name (``mamba=Mamba2Params(...)``)."""
        merged = dict(sections) | by_name
        _check_sections(merged)
        values = dict(d_model=d_model, n_layer=n_layer, vocab_size=vocab_size, layers=tuple(layers),
                      tie_embeddings=tie_embeddings, norm_eps=norm_eps, nested_widths=tuple(nested_widths),
                      nested_kinds=None if nested_kinds is None else tuple(nested_kinds),
                      embedding_scale=embedding_scale)  # fmt: skip
        for name, value in values.items():
            object.__setattr__(self, name, value)
        for spec in self.layers:  # a used kind without a section gets its default (or refuses)
            for part in spec.parts:
                kind = get_kind(part)
                if kind.section and kind.section not in merged:
                    merged[kind.section] = kind.default_section()
        object.__setattr__(self, "sections", tuple(sorted(merged.items())))
        _validate(self)

    def __getattr__(self, name: str) -> Any:
        """A kind's section by its name (``config.mamba``); None when a known section is absent."""
        if name.startswith("_") or name == "sections":
            raise AttributeError(name)
        for key, value in self.sections:
            if key == name:
                return value
        if by_section(name) is not None:
            return None
        raise AttributeError(f"ModelConfig has no field or section {name!r}")

    # ---- per-layer sizes -------------------------------------------------------------
    def part_size(self, i: int, kind: str) -> int:
        """Size of layer i's part of ``kind`` as stored (heads, hidden units, ...)."""
        stored = self.layers[i].size(kind)
        return stored if stored is not None else get_kind(kind).full_size(self, i)

    def is_nested_full(self) -> bool:
        return all(not s.sizes for s in self.layers)

    def is_nested(self, kind: str) -> bool:
        return self.nested_kinds is None or kind in self.nested_kinds

    def stream_limit(self) -> int | None:
        """Longest stream the model takes (a global attention cache); None if unbounded."""
        limits = [get_kind(k).stream_limit(self, i) for i, s in enumerate(self.layers) for k in s.parts]
        limits = [n for n in limits if n is not None]
        return min(limits) if limits else None

    def uses_position(self) -> bool:
        return any(get_kind(k).uses_position(self, i) for i, s in enumerate(self.layers) for k in s.parts)

    # ---- JSON --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "sections"}
        d["layers"] = [spec.to_dict() for spec in self.layers]
        d["nested_widths"] = list(self.nested_widths)
        if self.nested_kinds is None:
            del d["nested_kinds"]
        else:
            d["nested_kinds"] = list(self.nested_kinds)
        if self.embedding_scale == 1.0:  # configs without it stay as they were
            del d["embedding_scale"]
        for key, value in self.sections:
            d[key] = by_section(key).section_to_json(value)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        if not isinstance(d, dict):
            raise ConfigError("config must be a JSON object; regenerate config.json")
        d = dict(d)
        layers = d.pop("layers", None)
        if not isinstance(layers, list):
            raise ConfigError("config.layers must be a list of layer specs, one per layer")
        specs = tuple(LayerSpec.from_dict(layer, f"config.layers[{j}]") for j, layer in enumerate(layers))
        keys = [k for k in d if k not in TOP_LEVEL]
        _check_sections(keys)
        sections = {key: by_section(key).parse_section(d.pop(key)) for key in keys}
        if "nested_widths" in d:
            d["nested_widths"] = tuple(d["nested_widths"])
        else:
            d["nested_widths"] = (1.0,)
        try:
            return cls(layers=specs, **d, **sections)
        except TypeError as e:  # a required field is missing
            raise ConfigError(f"config is incomplete ({e}); add the missing field") from None

    @classmethod
    def from_json(cls, text: str, source: str = "config.json") -> ModelConfig:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{source} is not valid JSON (line {e.lineno}): fix or regenerate it") from None

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path} not found; a model directory needs config.json")
        return cls.from_json(path.read_text(), source=str(path))

    @classmethod
    def from_pattern(cls, pattern: str, **kwargs: Any) -> ModelConfig:
        """Build from a layer pattern: a letter per mixer ('M' mamba2, 'A' global attention,
        'S' sliding-window attention; ``LayerKind.letters``), parallel mixers joined by '|'
        ('A|M'), a trailing '+' for the default MLP. Per-layer options a letter asks for
        (the window of 'S') come from ``kwargs``."""
        letters = {letter: (kind, wants) for kind in KINDS.values() for letter, wants in kind.letters.items()}
        option_names = {o for kind in KINDS.values() for o in kind.layer_options}
        options = {k: kwargs.pop(k) for k in list(kwargs) if k in option_names}
        layers = []
        for token in pattern.split():
            mlp = token.endswith("+")
            mixers, chosen = [], {}
            for letter in token.rstrip("+").split("|"):
                if letter not in letters:
                    raise ConfigError(f"pattern letter {letter!r} is unknown; use one of {sorted(letters)}")
                kind, wants = letters[letter]
                mixers.append(kind.name)
                chosen |= {k: options.get(k) if v is not None else None for k, v in wants.items()}
            layers.append(LayerSpec.of(*mixers, mlp=mlp, **chosen))
        return cls(layers=tuple(layers), n_layer=len(layers), **kwargs)

    def replace(self, **changes: Any) -> ModelConfig:
        current = {f.name: getattr(self, f.name) for f in fields(self)}
        sections = dict(current.pop("sections"))
        for key in [k for k in changes if by_section(k) is not None]:
            sections[key] = changes.pop(key)
        return ModelConfig(**(current | changes), **sections)


# ---- validation ------------------------------------------------------------------------
def _check_sections(keys) -> None:
    unknown = sorted(k for k in keys if by_section(k) is None)
    if unknown:
        known = sorted([*TOP_LEVEL, *(k.section for k in KINDS.values() if k.section)])
        raise ConfigError(f"config has unknown keys {unknown}; known keys are {known}")


def _validate(c: ModelConfig) -> None:
    for name in ("d_model", "n_layer", "vocab_size"):
        positive(f"config.{name}", getattr(c, name))
    if not (isinstance(c.norm_eps, float | int) and 0 < c.norm_eps < 1):
        raise ConfigError(f"config.norm_eps must be in (0, 1) (got {c.norm_eps!r})")
    if len(c.layers) != c.n_layer:
        raise ConfigError(f"config.layers has {len(c.layers)} entries but n_layer is {c.n_layer}; make them agree")
    if not c.nested_widths or any(not (0 < w <= 1) for w in c.nested_widths):
        raise ConfigError(f"config.nested_widths must be fractions in (0, 1] (got {list(c.nested_widths)})")
    if not (isinstance(c.embedding_scale, float | int) and math.isfinite(c.embedding_scale) and c.embedding_scale > 0):
        raise ConfigError(f"config.embedding_scale must be a positive number (got {c.embedding_scale!r})")
    if c.nested_kinds is not None:
        for name in c.nested_kinds:
            get_kind(name)
    for key, value in c.sections:
        by_section(key).check_section(value)
    for i, spec in enumerate(c.layers):
        _validate_layer(c, i, spec)


def _validate_layer(c: ModelConfig, i: int, spec: LayerSpec) -> None:
    where = f"config.layers[{i}]"
    if not spec.parts:
        raise ConfigError(f"{where} has neither a mixer nor an MLP; give it at least one")
    if len(set(spec.parts)) != len(spec.parts):
        raise ConfigError(f"{where} uses a layer kind twice ({list(spec.parts)}); each kind once per layer")
    for role, names in (("mixer", spec.mixers), ("mlp", (spec.mlp,) if spec.mlp else ())):
        for name in names:
            if get_kind(name).role != role:
                raise ConfigError(f"{where}: {name!r} is a {get_kind(name).role}, not a {role}; move it")
    allowed = _options_of(list(spec.parts))
    for option in spec.options_dict():
        if option not in allowed:
            raise ConfigError(f"{where}.{option} is set, but none of its kinds {list(spec.parts)} reads it; remove it")
    for kind, size in spec.sizes:
        if kind not in spec.parts:
            raise ConfigError(f"{where}.sizes names {kind!r}, which the layer does not have")
        positive(f"{where}.sizes.{kind}", size)
    state: set[str] = set()
    for part in spec.parts:
        kind = get_kind(part)
        kind.check_layer(c, i)
        names = set(kind.state_shapes(c, i, c.part_size(i, part)))
        if names & state:
            raise ConfigError(f"{where}: two of its mixers keep state named {sorted(names & state)}; they cannot share a layer")
        state |= names
