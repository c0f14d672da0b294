"""The one sizing model: what a model stores and reads at each width and precision.

``inspect``, ``extract`` and ``plan`` all count through ``footprint``. Nothing is
materialised and neither torch nor onnx is imported: each part's layer kind gives its
parameter shapes and says which are MatMul matrices (``LayerKind.param_shapes``,
``matrices``); state bytes come from the kinds' state shapes.

Bytes are those an exported graph stores (``export.quantize`` says what each precision
does to which tensor):

    matrices (projections, MLP, head)   fp32 4 B, fp16 2 B, int8 1 B + a 4 B scale per
                                        block of ``INT8_BLOCK`` weights, int4 0.5 B + a 4 B
                                        scale per block of ``INT4_BLOCK`` weights
    embedding table (a Gather)          as matrices; at int8 and int4 a tied table is the
                                        head's blocks (``export.quantize_nbits``), nothing more
    everything else                     fp32 (conv kernels, A, D, dt bias, norms, biases)

At fp32 and fp16 a tied head is counted once more, transposed, as the head matrix (what a
graph built without ``tied_once`` stores).

``Footprint.layer_matrices`` keeps the (in, out) shape of every layer's projection, which
is what a prefill's working memory scales with (``targets.plan.peak_memory``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from edgeseq.choices import PRECISIONS
from edgeseq.config import ModelConfig
from edgeseq.errors import EdgeseqError
from edgeseq.kinds import get_kind
from edgeseq.shapes import layer_state_shapes
from edgeseq.width import LayerWidth, WidthSpec, resolve

INT4_BLOCK = 32
INT8_BLOCK = 128  # ``QuantOptions.int8_block_size``
POSITION_BYTES = 8  # the int64 token counter every stream carries
STATE_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}


@dataclass(frozen=True)
class Footprint:
    """Parameter counts of one extracted model, by how the graphs store them."""

    params: int  # every parameter, a tied embedding once
    matrix: int  # weights fed to MatMul (the head included, tied or not)
    embedding: int  # the Gather table
    other: int  # 1-D and conv parameters, always fp32
    d_model: int
    layer_matrices: tuple[tuple[tuple[int, int], ...], ...] = ()  # per layer, each projection's (in, out)
    tied: bool = False  # the embedding is the head's table

    @property
    def layer_columns(self) -> int:
        """The most projection outputs one layer computes per token (its matrices' ``out``
        summed; the head, which a prefill applies to the last token only, not counted)."""
        return max((sum(out for _, out in layer) for layer in self.layer_matrices), default=0)

    @property
    def flops_per_token(self) -> int:
        return 2 * self.matrix  # a multiply-add per matrix weight

    def weight_bytes(self, precision: str) -> int:
        """Bytes of the weights one graph stores."""
        block = self.int8_block
        return _table_bytes(self.matrix, precision, block) + self._embedding_bytes(precision) + 4 * self.other

    def _embedding_bytes(self, precision: str) -> int:
        if self.tied and precision in ("int8", "int4"):
            return 0
        return _table_bytes(self.embedding, precision, self.int8_block)

    @property
    def int8_block(self) -> int:
        """The int8 block: ``INT8_BLOCK`` halved until it divides every matrix's K (the head's is d_model)."""
        ks = {self.d_model} | {k for layer in self.layer_matrices for k, _ in layer}
        block = INT8_BLOCK
        while block > 16 and any(k % block for k in ks):
            block //= 2
        return block

    def bytes_read_per_token(self, precision: str) -> int:
        """Weights a decode step reads: all but the embedding table, of which one row."""
        return (
            self.weight_bytes(precision)
            - self._embedding_bytes(precision)
            + _table_bytes(self.d_model, precision, self.int8_block)
        )


def _table_bytes(count: int, precision: str, int8_block: int = INT8_BLOCK) -> int:
    if precision == "int4":
        return math.ceil(count / 2) + 4 * math.ceil(count / INT4_BLOCK)
    if precision == "int8":
        return count + 4 * math.ceil(count / int8_block)
    rate = {"fp32": 4, "fp16": 2}.get(precision)
    if rate is None:
        raise EdgeseqError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    return rate * count


def footprint(config: ModelConfig, widths: tuple[LayerWidth, ...]) -> Footprint:
    """Counted from the kinds' parameter shapes at ``widths``."""
    d, vocab = config.d_model, config.vocab_size
    embedding = vocab * d
    matrix, other = vocab * d, d  # the head ([d, vocab] as a MatMul) and norm_f
    params = embedding + d + (0 if config.tie_embeddings else vocab * d)
    layers = []
    for i, (spec, w) in enumerate(zip(config.layers, widths)):
        norms = d * (bool(spec.mixers) + bool(spec.mlp))  # the block's pre-norms
        other, params = other + norms, params + norms
        shapes = []
        for part in spec.parts:
            kind = get_kind(part)
            matrices = kind.matrices(config, i)
            for name, shape in kind.param_shapes(config, i, w[part]).items():
                n = math.prod(shape)
                params += n
                if name in matrices:
                    out = n // shape[-1]  # stored [out, in] like nn.Linear (3-D experts: [e, out, in])
                    matrix += n
                    shapes.append((shape[-1], out))
                else:
                    other += n
        layers.append(tuple(shapes))
    return Footprint(params, matrix, embedding, other, d, tuple(layers), config.tie_embeddings)


def state_bytes(config: ModelConfig, widths: tuple[LayerWidth, ...], dtype: Any = "float32") -> int:
    """Bytes of one stream's decode state (equals ``ModelState.zeros(config, 1, widths).nbytes()``);
    ``dtype`` a numpy/torch dtype or its name."""
    itemsize = STATE_ITEMSIZE[str(dtype).removeprefix("torch.")]
    tensors = sum(math.prod(s) for i, w in enumerate(widths) for s in layer_state_shapes(config, i, w).values())
    return tensors * itemsize + POSITION_BYTES


@dataclass(frozen=True)
class Size:
    """One model at one width, for ``inspect`` and ``extract``."""

    label: str  # the width as asked ("0.5", "1,0.5,...") or "stored"
    widths: tuple[LayerWidth, ...]  # absolute per-layer sizes
    footprint: Footprint
    state_bytes: int  # one stream's fp32 decode state, position counter included

    @property
    def params(self) -> int:
        return self.footprint.params

    def weight_bytes(self, precision: str) -> int:
        return self.footprint.weight_bytes(precision)

    def to_dict(self) -> dict[str, Any]:
        return {
            "width": self.label,
            "params": self.params,
            "matrix_params": self.footprint.matrix,
            "weight_bytes": {p: self.weight_bytes(p) for p in PRECISIONS},
            "state_bytes_per_stream": self.state_bytes,
            "layers": [w.to_dict() for w in self.widths],
        }


def size_of(config: ModelConfig, widths: tuple[LayerWidth, ...], label: str) -> Size:
    return Size(label, widths, footprint(config, widths), state_bytes(config, widths))


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
    for i, spec in enumerate(config.layers):
        token = "|".join(get_kind(part).pattern_token(config, i) for part in spec.mixers)
        tokens.append(token + ("+" if spec.mlp else ""))
    return " ".join(tokens)


def kept_per_layer(config: ModelConfig, widths: tuple[LayerWidth, ...]) -> list[dict[str, Any]]:
    """What each layer keeps of ``config`` as stored, per part: {"layer", "mixers", "parts": {kind: {...}}}."""
    rows = []
    for i, (spec, w) in enumerate(zip(config.layers, widths)):
        parts = {part: get_kind(part).describe(config, i, w[part]) for part in spec.parts}
        rows.append({"layer": i, "mixers": list(spec.mixers), "mlp": spec.mlp, "parts": parts})
    return rows
