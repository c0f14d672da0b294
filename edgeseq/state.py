"""The explicit decode state: fixed-size tensors per layer, fp32 by default.

Each layer holds the tensors its parts' kinds declare (``LayerKind.state_shapes``): a
Mamba2 mixer ``conv`` (b, conv_channels, d_conv-1) and ``ssm`` (b, h, n, p); an attention
mixer ``key`` and ``value`` ring buffers (b, kv_heads, W, head_dim); an MLP nothing. One
``position`` (b,) int64 counts the tokens each stream has consumed. Names in
``to_named`` are the ONNX graphs' input names without the ``past.`` prefix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from edgeseq.config import ModelConfig
from edgeseq.shapes import layer_state_shapes
from edgeseq.width import LayerWidth, full

LayerState = dict[str, Tensor]


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
        layers = [
            {k: torch.zeros(batch, *s, dtype=dtype, device=device) for k, s in layer_state_shapes(config, i, w).items()}
            for i, w in enumerate(widths)
        ]
        return cls(layers, torch.zeros(batch, dtype=torch.int64, device=device))

    def to_named(self) -> dict[str, Tensor]:
        named = {f"{i}.{k}": t for i, layer in enumerate(self.layers) for k, t in layer.items()}
        named["position"] = self.position
        return named

    @classmethod
    def from_named(cls, config: ModelConfig, named: dict[str, Tensor]) -> ModelState:
        widths = full(config)
        layers = [{k: named[f"{i}.{k}"] for k in layer_state_shapes(config, i, w)} for i, w in enumerate(widths)]
        return cls(layers, named["position"])

    def clone(self) -> ModelState:
        return ModelState.from_tensors(self, lambda t: t.clone())

    def to(self, device: torch.device | str) -> ModelState:
        return ModelState.from_tensors(self, lambda t: t.to(device))

    @staticmethod
    def from_tensors(state: ModelState, fn) -> ModelState:
        return ModelState([{k: fn(t) for k, t in layer.items()} for layer in state.layers], fn(state.position))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.to_named().values())
