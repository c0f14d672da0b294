"""The explicit decode state: fixed-size tensors per layer, fp32 by default.

Per Mamba2 layer: ``conv`` (b, conv_channels, d_conv-1), the last inputs of the causal
conv, and ``ssm`` (b, h, n, p). Per attention layer: ``key`` and ``value`` ring buffers
(b, kv_heads, W, head_dim). One ``position`` (b,) int64 counts the tokens each stream has
consumed. Names in ``to_named`` are the ONNX graphs' input names without the ``past.``
prefix.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from edgeseq.config import ModelConfig
from edgeseq.shapes import layer_state_shapes, ring_size  # noqa: F401  (re-exported)
from edgeseq.width import LayerWidth, full


@dataclass
class Mamba2LayerState:
    conv: Tensor  # (b, d_inner + 2*G*N, d_conv - 1)
    ssm: Tensor  # (b, h, n, p)


@dataclass
class AttentionLayerState:
    key: Tensor  # (b, kv_heads, W, head_dim), rotated keys
    value: Tensor  # (b, kv_heads, W, head_dim)


LayerState = Mamba2LayerState | AttentionLayerState


@dataclass
class ModelState:
    layers: list[LayerState]
    position: Tensor  # (b,) int64

    @classmethod
    def zeros(
        cls,
        config: ModelConfig,
        batch: int,
        widths: tuple[LayerWidth, ...] | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> ModelState:
        widths = widths or full(config)
        layers: list[LayerState] = []
        for i, w in enumerate(widths):
            shapes = layer_state_shapes(config, i, w)
            tensors = {k: torch.zeros(batch, *s, dtype=dtype, device=device) for k, s in shapes.items()}
            kind = Mamba2LayerState if config.layers[i].mixer == "mamba2" else AttentionLayerState
            layers.append(kind(**tensors))
        return cls(layers, torch.zeros(batch, dtype=torch.int64, device=device))

    def to_named(self) -> dict[str, Tensor]:
        named = {f"{i}.{f.name}": getattr(s, f.name) for i, s in enumerate(self.layers) for f in fields(s)}
        named["position"] = self.position
        return named

    @classmethod
    def from_named(cls, config: ModelConfig, named: dict[str, Tensor]) -> ModelState:
        layers: list[LayerState] = []
        for i, spec in enumerate(config.layers):
            kind = Mamba2LayerState if spec.mixer == "mamba2" else AttentionLayerState
            layers.append(kind(**{f.name: named[f"{i}.{f.name}"] for f in fields(kind)}))
        return cls(layers, named["position"])

    def clone(self) -> ModelState:
        return ModelState.from_tensors(self, lambda t: t.clone())

    def to(self, device: torch.device | str) -> ModelState:
        return ModelState.from_tensors(self, lambda t: t.to(device))

    @staticmethod
    def from_tensors(state: ModelState, fn) -> ModelState:
        layers = [type(s)(**{f.name: fn(getattr(s, f.name)) for f in fields(s)}) for s in state.layers]
        return ModelState(layers, fn(state.position))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.to_named().values())
