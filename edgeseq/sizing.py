"""What a model costs at each width: parameters, weight bytes, decode-state bytes.

Nothing is materialised: parameters are counted on a ``meta``-device model built from
the extracted config, and state bytes come from ``edgeseq.state.layer_state_shapes``, so
a size table of a large checkpoint costs no memory.

Quantized sizes follow weight-only quantization: the int8 and int4 columns count the 2-D
weight matrices (embedding, projections, untied lm_head) at 1 and 1/2 byte per parameter
and keep every other parameter (norms, biases, conv kernels, A_log, D, dt_bias) at fp32.
Quantization scales are not counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from edgeseq.config import ModelConfig
from edgeseq.extract import extracted_config
from edgeseq.model import NestedLM
from edgeseq.shapes import layer_state_shapes
from edgeseq.width import LayerWidth, WidthSpec, resolve

BYTES_PER_PARAM = {"fp32": 4.0, "fp16": 2.0, "int8": 1.0, "int4": 0.5}
QUANTIZED = ("int8", "int4")  # applied to 2-D matrices only; the rest stays fp32
POSITION_BYTES = 8  # the int64 token counter every stream carries


@dataclass(frozen=True)
class Size:
    """One model at one width."""

    label: str  # the width as asked ("0.5", "1,0.5,...") or "stored"
    widths: tuple[LayerWidth, ...]  # absolute per-layer sizes
    params: int  # every parameter, tied embeddings once
    matrix_params: int  # those in 2-D weight matrices: what int8/int4 quantize
    state_bytes: int  # one stream's fp32 decode state, position counter included

    def weight_bytes(self, dtype: str) -> int:
        rate = BYTES_PER_PARAM[dtype]
        if dtype in QUANTIZED:
            return math.ceil(self.matrix_params * rate) + 4 * (self.params - self.matrix_params)
        return round(self.params * rate)

    def to_dict(self) -> dict[str, Any]:
        return {
            "width": self.label,
            "params": self.params,
            "matrix_params": self.matrix_params,
            "weight_bytes": {dtype: self.weight_bytes(dtype) for dtype in BYTES_PER_PARAM},
            "state_bytes_per_stream": self.state_bytes,
            "layers": [{"heads": w.heads, "d_mlp": w.d_mlp} for w in self.widths],
        }


def state_bytes(config: ModelConfig, widths: tuple[LayerWidth, ...], dtype: torch.dtype = torch.float32) -> int:
    """Bytes of one stream's decode state (equals ``ModelState.zeros(config, 1, widths).nbytes()``)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    tensors = sum(math.prod(s) for i, w in enumerate(widths) for s in layer_state_shapes(config, i, w).values())
    return tensors * itemsize + POSITION_BYTES


def size_of(config: ModelConfig, widths: tuple[LayerWidth, ...], label: str) -> Size:
    with torch.device("meta"):
        model = NestedLM(extracted_config(config, widths))
    params = matrix = 0
    for p in model.parameters():
        params += p.numel()
        matrix += p.numel() if p.dim() == 2 else 0
    return Size(label, widths, params, matrix, state_bytes(config, widths))


def size_table(config: ModelConfig, specs: list[WidthSpec | float | str]) -> list[Size]:
    """One ``Size`` per width spec; a spec the model cannot honour raises ``WidthError``."""
    return [size_of(config, resolve(config, spec), str(spec)) for spec in specs]


def nested_sizes(config: ModelConfig) -> list[Size]:
    """A row per nested width of ``config``, plus the model as stored if no row is it."""
    rows = size_table(config, [WidthSpec.uniform(w) for w in config.nested_widths])
    stored = resolve(config, None)
    if all(row.widths != stored for row in rows):
        rows.append(size_of(config, stored, "stored"))
    return rows


def layer_pattern(config: ModelConfig) -> str:
    """The layers as ``ModelConfig.from_pattern`` spells them: 'M M+ S+ A'."""
    tokens = []
    for s in config.layers:
        kind = "M" if s.mixer == "mamba2" else ("A" if s.window is None else "S")
        tokens.append(kind + ("+" if s.mlp else ""))
    return " ".join(tokens)


def kept_per_layer(config: ModelConfig, widths: tuple[LayerWidth, ...]) -> list[dict[str, Any]]:
    """What each layer keeps of ``config`` as stored: heads (and kv heads), MLP units."""
    rows = []
    for i, (spec, w) in enumerate(zip(config.layers, widths)):
        row = {"layer": i, "mixer": spec.mixer, "heads": w.heads, "heads_total": config.layer_heads(i)}
        if spec.mixer == "attention":
            q_per_kv = config.attention.q_per_kv
            row |= {"kv_heads": w.heads // q_per_kv, "kv_heads_total": config.layer_heads(i) // q_per_kv}
        row |= {"d_mlp": w.d_mlp, "d_mlp_total": config.layer_d_mlp(i)}
        rows.append(row)
    return rows
