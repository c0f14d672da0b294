"""Model configuration: frozen dataclasses with a JSON round trip.

A config describes one model at one set of widths. The full nested model leaves the
per-layer sizes (``LayerSpec.heads``, ``LayerSpec.d_mlp``) unset; an extracted submodel
sets them, so every layer can have its own width (Mix'n'Match).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeseq.errors import ConfigError

MIXERS = ("mamba2", "attention")


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

    def n_heads(self, d_model: int) -> int:
        return _whole(self.expand * d_model / self.headdim, "mamba.expand * d_model / headdim")


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


@dataclass(frozen=True)
class LayerSpec:
    mixer: str  # "mamba2" or "attention"
    mlp: bool = False  # a gated MLP after the mixer (own pre-norm)
    window: int | None = None  # attention: sliding window of W tokens; None = global
    heads: int | None = None  # kept mamba2 heads / attention query heads; None = all
    d_mlp: int | None = None  # kept MLP hidden units; None = ModelConfig.d_mlp


@dataclass(frozen=True)
class ModelConfig:
    d_model: int
    n_layer: int
    vocab_size: int
    layers: tuple[LayerSpec, ...]
    mamba: Mamba2Params = field(default_factory=Mamba2Params)
    attention: AttentionParams | None = None  # required when any layer is attention
    d_mlp: int = 0  # gated MLP hidden size at full width
    tie_embeddings: bool = True  # lm_head shares the embedding matrix
    norm_eps: float = 1e-5
    nested_widths: tuple[float, ...] = (1.0, 0.5, 0.25, 0.125)  # trained granularities

    def __post_init__(self) -> None:
        _validate(self)

    # ---- per-layer sizes -------------------------------------------------------------
    def mamba_heads_full(self) -> int:
        return self.mamba.n_heads(self.d_model)

    def layer_heads(self, i: int) -> int:
        """Heads of layer i as stored: mamba2 heads or attention query heads."""
        spec = self.layers[i]
        if spec.heads is not None:
            return spec.heads
        if spec.mixer == "mamba2":
            return self.mamba_heads_full()
        return self.attention.n_heads

    def layer_d_mlp(self, i: int) -> int:
        spec = self.layers[i]
        if not spec.mlp:
            return 0
        return self.d_mlp if spec.d_mlp is None else spec.d_mlp

    def is_nested_full(self) -> bool:
        return all(s.heads is None and s.d_mlp is None for s in self.layers)

    # ---- JSON ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        lo, hi = self.mamba.dt_limit
        d["mamba"]["dt_limit"] = [lo, None if math.isinf(hi) else hi]
        d["layers"] = [{k: v for k, v in layer.items() if v is not None} for layer in d["layers"]]
        d["nested_widths"] = list(self.nested_widths)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        if not isinstance(d, dict):
            raise ConfigError("config must be a JSON object; regenerate config.json")
        d = dict(d)
        _check_keys("config", d, cls)
        mamba = dict(d.pop("mamba", {}) or {})
        _check_keys("config.mamba", mamba, Mamba2Params)
        if "dt_limit" in mamba:
            lo, hi = mamba["dt_limit"]
            mamba["dt_limit"] = (float(lo), math.inf if hi is None else float(hi))
        attn = d.pop("attention", None)
        if attn is not None:
            _check_keys("config.attention", attn, AttentionParams)
        layers = d.pop("layers", None)
        if not isinstance(layers, list):
            raise ConfigError("config.layers must be a list of layer specs, one per layer")
        for j, layer in enumerate(layers):
            _check_keys(f"config.layers[{j}]", layer, LayerSpec)
        try:
            return cls(
                layers=tuple(LayerSpec(**layer) for layer in layers),
                mamba=Mamba2Params(**mamba),
                attention=AttentionParams(**attn) if attn is not None else None,
                nested_widths=tuple(d.pop("nested_widths", (1.0,))),
                **d,
            )
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
        """Build from a layer pattern: 'M' mamba2, 'A' global attention, 'S' sliding window
        attention (window ``kwargs.pop('window')``); a trailing '+' adds a gated MLP."""
        window = kwargs.pop("window", None)
        layers = []
        for token in pattern.split():
            mixer = {"M": "mamba2", "A": "attention", "S": "attention"}[token[0]]
            layers.append(LayerSpec(mixer, mlp=token.endswith("+"), window=window if token[0] == "S" else None))
        return cls(layers=tuple(layers), n_layer=len(layers), **kwargs)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


# ---- validation ------------------------------------------------------------------------
def _whole(x: float, what: str) -> int:
    n = round(x)
    if abs(x - n) > 1e-6 or n < 1:
        raise ConfigError(f"{what} must be a whole number ≥ 1 (got {x:g}); adjust the config")
    return n


def _check_keys(where: str, d: Any, cls: type) -> None:
    if not isinstance(d, dict):
        raise ConfigError(f"{where} must be a JSON object")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"{where} has unknown keys {unknown}; known keys are {sorted(known)}")


def _positive(where: str, value: Any, *, allow_zero: bool = False) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 0 if allow_zero else value >= 1)
    if not ok:
        bound = "≥ 0" if allow_zero else "≥ 1"
        raise ConfigError(f"{where} must be an integer {bound} (got {value!r})")


def _validate(c: ModelConfig) -> None:
    for name in ("d_model", "n_layer", "vocab_size"):
        _positive(f"config.{name}", getattr(c, name))
    _positive("config.d_mlp", c.d_mlp, allow_zero=True)
    if not (isinstance(c.norm_eps, float | int) and 0 < c.norm_eps < 1):
        raise ConfigError(f"config.norm_eps must be in (0, 1) (got {c.norm_eps!r})")
    if len(c.layers) != c.n_layer:
        raise ConfigError(f"config.layers has {len(c.layers)} entries but n_layer is {c.n_layer}; make them agree")
    if not c.nested_widths or any(not (0 < w <= 1) for w in c.nested_widths):
        raise ConfigError(f"config.nested_widths must be fractions in (0, 1] (got {list(c.nested_widths)})")
    m = c.mamba
    for name in ("d_state", "headdim", "ngroups", "d_conv", "chunk_size"):
        _positive(f"config.mamba.{name}", getattr(m, name))
    if not (m.dt_limit[0] >= 0 and m.dt_limit[1] > m.dt_limit[0]):
        raise ConfigError(f"config.mamba.dt_limit must satisfy 0 ≤ low < high (got {m.dt_limit})")
    kinds = {s.mixer for s in c.layers}
    if not kinds <= set(MIXERS):
        raise ConfigError(f"config.layers: unknown mixer {sorted(kinds - set(MIXERS))}; use one of {list(MIXERS)}")
    if "mamba2" in kinds:
        heads = m.n_heads(c.d_model)
        if heads % m.ngroups:
            raise ConfigError(f"mamba2 heads ({heads}) must be a multiple of config.mamba.ngroups ({m.ngroups})")
    if "attention" in kinds:
        a = c.attention
        if a is None:
            raise ConfigError("config has attention layers but no config.attention section; add one")
        for name in ("n_heads", "n_kv_heads", "head_dim", "max_context"):
            _positive(f"config.attention.{name}", getattr(a, name))
        if a.n_heads % a.n_kv_heads:
            raise ConfigError(f"config.attention.n_heads ({a.n_heads}) must be a multiple of n_kv_heads ({a.n_kv_heads})")
        rot = a.head_dim * a.rope_fraction
        if not (0 <= a.rope_fraction <= 1) or abs(rot - round(rot)) > 1e-6 or round(rot) % 2:
            raise ConfigError("config.attention.rope_fraction * head_dim must be an even whole number")
    for i, s in enumerate(c.layers):
        _validate_layer(c, i, s)


def _validate_layer(c: ModelConfig, i: int, s: LayerSpec) -> None:
    where = f"config.layers[{i}]"
    if s.mlp and c.d_mlp == 0 and s.d_mlp is None:
        raise ConfigError(f"{where} has an MLP but config.d_mlp is 0; set d_mlp")
    if s.d_mlp is not None:
        _positive(f"{where}.d_mlp", s.d_mlp)
    if s.window is not None:
        _positive(f"{where}.window", s.window)
        if s.mixer != "attention":
            raise ConfigError(f"{where}.window is set on a {s.mixer} layer; only attention layers have windows")
    if s.heads is None:
        return
    _positive(f"{where}.heads", s.heads)
    if s.mixer == "mamba2":
        full = c.mamba.n_heads(c.d_model)
        if s.heads > full or s.heads % c.mamba.ngroups:
            raise ConfigError(f"{where}.heads ({s.heads}) must be ≤ {full} and a multiple of ngroups ({c.mamba.ngroups})")
    else:
        a = c.attention
        if s.heads > a.n_heads or s.heads % a.q_per_kv:
            raise ConfigError(f"{where}.heads ({s.heads}) must be ≤ {a.n_heads} and a multiple of {a.q_per_kv}")
