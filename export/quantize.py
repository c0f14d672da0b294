"""Quantized variants of exported graphs, made with onnxruntime's own tools.

    fp16  onnxruntime.transformers.float16: weights, projections and the MLP in fp16; the
          recurrent path of every layer (conv, scan/step, attention over the cache, the
          gated norm) and every reduction stay fp32, and so do the graph's inputs and
          outputs: the state a stream carries is fp32 whatever the precision.
    int8  onnxruntime's MatMulNBitsQuantizer at 8 bits: symmetric blocks of 128 weights
          along K, one fp32 scale each, activations quantized to int8 inside MatMulNBits
          (accuracy level 4: the VNNI / dot-product kernels onnxruntime picks for the CPU
          it runs on, whatever the ISA preset); the embedding table too, as
          GatherBlockQuantized rows (``edgeseq.export.quantize_nbits``; a tied table is
          the head's blocks, stored once). For TensorRT targets, weight-only int8 through
          DequantizeLinear nodes (TensorRT's parser reads Q/DQ; its builder picks the kernels).
    int4  block-wise symmetric int4 weights (block size configurable), in one of two forms
          (``int4_form``), each at opset 21, the first with int4 tensors:
          MatMulNBits  onnxruntime's MatMulNBitsQuantizer and its ``com.microsoft`` contrib
                       ops: MatMulNBits, the embedding table as GatherBlockQuantized (a
                       tied one read from the head's blocks; onnxruntime targets);
          QDQ          standard ops only, for runtimes without the contrib ops (TensorRT):
                       int4 weights behind a block-wise DequantizeLinear feeding a MatMul,
                       scale = max|W| / 7 per block as NVIDIA's ModelOpt makes it (the same
                       quantizer's QDQ format gives blocks negative scales, which TensorRT
                       refuses), packed by onnx; the embedding table in fp16.

Only the weight matrices are quantized: the embedding (int4; fp16 in the QDQ form), the
projections and the head, and the 3-D expert tables [experts, out, in] that a
mixture-of-experts step graph gathers the chosen experts from
(``edgeseq.export.quantize_experts``): int8 per expert and output row, the chosen rows
gathered, then dequantized; int4 in blocks along ``in``, gathered and dequantized by
GatherBlockQuantized (MatMulNBits form) or dequantized whole for the Gather (QDQ form: ONNX
has no Gather on int4). A router (a weight MatMul feeding a TopK) stays fp32 in every
precision: a rounded logit can change which experts a token runs. The numerically
sensitive parameters (conv kernels, A, D, dt bias, norm weights, biases) and the state are
never quantized; neither is any MatMul whose operands are both activations (the scan's
C·B and state products).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgeseq.choices import INT8_PRESETS, PRECISIONS
from edgeseq.errors import EdgeseqError

# Op types the fp16 conversion leaves in fp32 wherever they are: reductions, exponentials
# and the recurrence ops of the opset-27 and TensorRT flavors.
FP32_OPS = (
    "ReduceMean", "ReduceSum", "Sqrt", "Div", "Pow", "Exp", "Softplus", "Softmax", "CumSum", "TopK",
    "LinearAttention", "CausalConvWithState", "EdgeseqSSDChunkState", "EdgeseqSSDChunkScan", "EdgeseqSSDStep",
)  # fmt: skip


EMBEDDING = "embedding.weight"  # the token table's initializer (``edgeseq.export.graphs``)
INT4_FORMS = ("MatMulNBits", "QDQ")  # in preference order: the contrib ops are faster in onnxruntime


class QuantizationError(EdgeseqError):
    """A precision or option the quantizer cannot honour."""


@dataclass(frozen=True)
class QuantOptions:
    precision: str = "fp32"
    int8_preset: str = "avx512_vnni"
    block_size: int = 32  # int4: weights per scale
    int8_block_size: int = 128  # int8 (MatMulNBits): weights per scale
    accuracy_level: int | None = 4  # MatMulNBits on CPU: 4 = int8 activations (fastest)
    int4_form: str = "MatMulNBits"  # one of INT4_FORMS: what the target's runtime parses

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise QuantizationError(f"unknown precision {self.precision!r}; use one of {', '.join(PRECISIONS)}")
        if self.int8_preset not in INT8_PRESETS:
            raise QuantizationError(f"unknown int8 preset {self.int8_preset!r}; use one of {', '.join(INT8_PRESETS)}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise QuantizationError(f"int4 block size must be a power of two >= 16, not {self.block_size}")
        if self.int4_form not in INT4_FORMS:
            raise QuantizationError(f"unknown int4 form {self.int4_form!r}; use one of {', '.join(INT4_FORMS)}")

    def introduces(self) -> tuple[tuple[str, str, int], ...]:
        """The ops this quantization adds to a graph, as (domain, op type, lowest version):
        what a runtime must parse on top of the flavor's own ops."""
        if self.precision == "int4":
            if self.int4_form == "QDQ":
                return (("", "DequantizeLinear", 21),)  # int4 tensors and block_size: opset 21
            return (("com.microsoft", "MatMulNBits", 1), ("com.microsoft", "GatherBlockQuantized", 1))
        if self.precision == "int8":
            if self.int8_preset == "qdq-weight-only":
                return (("", "DequantizeLinear", 13),)  # per-axis scales: opset 13
            return (("com.microsoft", "MatMulNBits", 1), ("com.microsoft", "GatherBlockQuantized", 1))
        return ()

    def describe(self) -> dict:
        d = {"precision": self.precision}
        if self.precision == "int8" and self.int8_preset == "qdq-weight-only":
            d |= {"method": "weight-only Q/DQ", "preset": self.int8_preset}
        elif self.precision == "int8":
            d |= {"method": "onnxruntime MatMulNBits (8 bits)", "preset": self.int8_preset,
                  "block_size": self.int8_block_size, "accuracy_level": self.accuracy_level, "embedding": "int8"}  # fmt: skip
        if self.precision == "int4" and self.int4_form == "QDQ":
            d |= {
                "method": "block-wise DequantizeLinear + MatMul (weight-only, scale max|W|/7)",
                "block_size": self.block_size,
                "embedding": "fp16",
                "fallback": "int8 per channel where the block does not divide a matrix's rows",
            }
        elif self.precision == "int4":
            d |= {
                "method": "onnxruntime MatMulNBits",
                "block_size": self.block_size,
                "accuracy_level": self.accuracy_level,
            }
        if self.precision == "fp16":
            d |= {"method": "onnxruntime float16 conversion", "fp32_kept": "state path, reductions, graph I/O"}
        return d


def weight_matmuls(model: onnx.ModelProto) -> list[str]:
    """Names of the MatMul nodes whose right operand is a 2-D weight initializer, routers
    (``routing_nodes``) left out."""
    inits = {t.name: t for t in model.graph.initializer}
    routers = set(routing_nodes(model))
    return [
        n.name
        for n in model.graph.node
        if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]].dims) == 2 and n.name not in routers
    ]


def routing_nodes(model: onnx.ModelProto) -> list[str]:
    """The TopK nodes and the weight MatMuls whose outputs they rank (a mixture-of-experts
    router): kept fp32, since a rounded logit can change which experts a token runs."""
    inits = {t.name for t in model.graph.initializer}
    producers = {out: n for n in model.graph.node for out in n.output}
    names = []
    for node in model.graph.node:
        if node.op_type == "TopK":
            names.append(node.name)
            source = producers.get(node.input[0])
            if source is not None and source.op_type == "MatMul" and source.input[1] in inits:
                names.append(source.name)
    return names


def recurrent_nodes(model: onnx.ModelProto) -> list[str]:
    """Nodes downstream of a ``past.*`` input up to (not including) the next weight MatMul:
    the conv, the scan or step, attention over the cache and what reads the state."""
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in model.graph.node:
        for name in n.input:
            consumers[name].append(n)
    stop = set(weight_matmuls(model))
    seen: set[str] = set()
    frontier = [i.name for i in model.graph.input if i.name.startswith("past.")]
    while frontier:
        for n in consumers[frontier.pop()]:
            if n.name in seen or n.name in stop:
                continue
            seen.add(n.name)
            frontier.extend(n.output)
    return [n.name for n in model.graph.node if n.name in seen]


class _NoPreprocessHint(logging.Filter):
    """onnxruntime's quantizer logs, on the root logger, a hint to run its pre-processing
    (shape inference and graph optimization) first; our graphs come optimized by onnxscript,
    so the hint tells the user nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


def quantize_graph(model: onnx.ModelProto, options: QuantOptions, tied: bool = False) -> onnx.ModelProto:
    """A quantized copy of an fp32 step or prefill graph (built without ``split_k`` or
    ``tied_once``); the I/O signature is unchanged. ``tied``: the model ties its embedding
    to the head, and the MatMulNBits forms read the embedding from the head's blocks."""
    if options.precision == "fp32":
        return model
    logging.getLogger("onnxruntime.quantization").setLevel(logging.ERROR)  # its INFO lines per node
    hint = _NoPreprocessHint()
    logging.getLogger().addFilter(hint)
    try:
        return _quantize(onnx.ModelProto.FromString(model.SerializeToString()), options, tied)  # the tools work in place
    finally:
        logging.getLogger().removeFilter(hint)


def _quantize(model: onnx.ModelProto, options: QuantOptions, tied: bool) -> onnx.ModelProto:
    if options.precision == "fp16":
        return _fp16(model)
    from edgeseq.export.quantize_experts import quantize_expert_tables

    contrib = options.precision == "int4" and options.int4_form == "MatMulNBits"
    model = quantize_expert_tables(model, options.precision, options.block_size, contrib)
    if options.precision == "int4":
        return _int4(model, options, tied)
    if options.int8_preset == "qdq-weight-only":
        return _int8_weight_only_qdq(model)
    return _nbits(model, options, 8, options.int8_block_size, tied)


def _fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    converted = convert_float_to_float16(
        model, keep_io_types=True, op_block_list=list(FP32_OPS), node_block_list=recurrent_nodes(model) + routing_nodes(model),
        disable_shape_infer=True,
    )  # fmt: skip
    return _drop_round_trips(converted)


def _int4(model: onnx.ModelProto, options: QuantOptions, tied: bool) -> onnx.ModelProto:
    return _int4_qdq(model, options) if options.int4_form == "QDQ" else _nbits(model, options, 4, options.block_size, tied)


def _nbits(model: onnx.ModelProto, options: QuantOptions, bits: int, block_size: int, tied: bool) -> onnx.ModelProto:
    """MatMulNBits at ``bits`` (int8 halves its block until it divides every matrix's K: a
    padded block stores zeros)."""
    from edgeseq.export.quantize_nbits import quantize_nbits

    matmuls = weight_matmuls(model)
    if bits == 8:
        block_size = int8_block_size(model, block_size)
    return quantize_nbits(model, bits, block_size, options.accuracy_level, matmuls, _embedding_gathers(model), tied)


def int8_block_size(model: onnx.ModelProto, block_size: int) -> int:
    """The int8 block ``_nbits`` uses for this graph: ``block_size`` halved until it divides
    the K of every weight matrix (16 at least)."""
    matmuls = set(weight_matmuls(model))
    inits = {t.name: t for t in model.graph.initializer}
    ks = {inits[n.input[1]].dims[0] for n in model.graph.node if n.name in matmuls}
    while block_size > 16 and any(k % block_size for k in ks):
        block_size //= 2
    return block_size


def _int4_qdq(model: onnx.ModelProto, options: QuantOptions) -> onnx.ModelProto:
    """Standard ops only, in the form TensorRT's parser takes: each weight W [K, N] whose K
    the block divides and whose N is even (int4 packs in pairs) int4 blocked along K; any
    other weight matrix int8 per output channel; the embedding table fp16. The graph is
    raised to opset 21 (int4 tensors, block_size) with onnx's version converter.

        W_int4 [K, N], scale [K/B, N] -> DequantizeLinear(axis=0, block_size=B) -> MatMul(x, .)
        E_fp16 [V, D] -> Gather(ids) -> Cast(fp32)
    """
    from onnx import version_converter

    if _opset(model) < 21:
        model = version_converter.convert_version(model, 21)
    inits = {t.name: t for t in model.graph.initializer}
    matrices = [n for n in model.graph.node if n.name in set(weight_matmuls(model))]
    blocked = {n.name for n in matrices if _blockable(inits[n.input[1]], options.block_size)}
    model = _dequantized_weights(model, blocked, lambda w, name: _int4_blocks(w, name, options.block_size))
    model = _dequantized_weights(model, set(weight_matmuls(model)), _int8_per_channel)
    return _embedding_fp16(model)


def _opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _blockable(weight: onnx.TensorProto, block_size: int) -> bool:
    """TensorRT takes int4 blocks along K only whole (it infers the block from the shapes)
    and int4 rows of even length."""
    k, n = weight.dims
    return k % block_size == 0 and n % 2 == 0


def _int4_blocks(w: np.ndarray, name: str, block: int) -> tuple[list[onnx.TensorProto], dict]:
    """Symmetric round-to-nearest int4 per block of ``block`` rows, as NVIDIA's ModelOpt
    makes it for TensorRT: scale = max|W| / 7 over the block, positive (TensorRT refuses
    the negative scales onnxruntime's quantizer gives its symmetric blocks), no zero point.

        w [K, N] -> blocks [K/B, B, N] -> scale [K/B, N] -> round(w / scale) in [-7, 7]
    """
    import ml_dtypes

    k, n = w.shape
    amax = np.abs(w.reshape(k // block, block, n)).max(axis=1)  # [K/B, N]
    scale = np.where(amax > 0, amax / 7, 1).astype(np.float32)
    q = np.clip(np.rint(w / np.repeat(scale, block, axis=0)), -8, 7).astype(ml_dtypes.int4)  # onnx packs two a byte
    tensors = [numpy_helper.from_array(q, f"{name}_int4"), numpy_helper.from_array(scale, f"{name}_scale")]
    return tensors, {"axis": 0, "block_size": block}


def _int8_per_channel(w: np.ndarray, name: str) -> tuple[list[onnx.TensorProto], dict]:
    """One symmetric int8 scale per output channel, from onnxruntime's ``quantize_data``.

    w [K, N] -> int8 [K, N], scale [N], zero point [N] (zeros)
    """
    from onnxruntime.quantization.quant_utils import quantize_data

    q_cols, scales = [], []
    for col in w.T:
        _, scale, q = quantize_data(col, onnx.TensorProto.INT8, symmetric=True)
        q_cols.append(q)
        scales.append(np.float32(scale))
    tensors = [
        numpy_helper.from_array(np.stack(q_cols, axis=1).astype(np.int8), f"{name}_int8"),
        numpy_helper.from_array(np.asarray(scales, dtype=np.float32), f"{name}_scale"),
        numpy_helper.from_array(np.zeros(len(scales), dtype=np.int8), f"{name}_zero"),
    ]
    return tensors, {"axis": 1}


def _dequantized_weights(model: onnx.ModelProto, nodes: set[str], quantize) -> onnx.ModelProto:
    """The weight matrix of each MatMul in ``nodes`` replaced by its quantized form behind a
    DequantizeLinear; ``quantize(w, name) -> (initializers: quantized, scale[, zero point],
    DequantizeLinear attributes)``. A matrix two MatMuls share is quantized once.

        W [K, N] (fp32)     becomes     W_q, scale[, zero] -> DequantizeLinear -> MatMul(x, .)
    """
    inits = {t.name: t for t in model.graph.initializer}
    replaced: dict[str, str] = {}
    new_nodes = []
    for node in model.graph.node:
        if node.name in nodes:
            w_name = node.input[1]
            if w_name not in replaced:
                tensors, attrs = quantize(numpy_helper.to_array(inits[w_name]).astype(np.float32), w_name)
                model.graph.initializer.extend(tensors)
                replaced[w_name] = f"{w_name}_dq"
                new_nodes.append(helper.make_node("DequantizeLinear", [t.name for t in tensors], [replaced[w_name]],
                                                  name=f"{w_name}_DequantizeLinear", **attrs))  # fmt: skip
            node.input[1] = replaced[w_name]
        new_nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    kept = [t for t in model.graph.initializer if t.name not in replaced]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return model


def _embedding_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """The embedding table in fp16 (where the lookup is its only reader), its rows cast back
    to fp32 after the lookup."""
    inits = {t.name: t for t in model.graph.initializer}
    readers = defaultdict(int)
    for node in model.graph.node:
        for name in node.input:
            readers[name] += 1
    new_nodes = []
    for node in model.graph.node:
        new_nodes.append(node)
        table = inits.get(node.input[0]) if node.op_type == "Gather" else None
        if table is not None and table.data_type == onnx.TensorProto.FLOAT and readers[table.name] == 1:
            table.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(table).astype(np.float16), table.name))
            rows, node.output[0] = node.output[0], f"{node.output[0]}_fp16"
            new_nodes.append(
                helper.make_node("Cast", [node.output[0]], [rows], name=f"{node.name}_fp32", to=onnx.TensorProto.FLOAT)
            )
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    return model


def _embedding_gathers(model: onnx.ModelProto) -> list[str]:
    """The lookups in the token embedding table (expert tables, 3-D, are ``quantize_experts``')."""
    return [n.name for n in model.graph.node if n.op_type == "Gather" and n.input[0] == EMBEDDING]


def _int8_weight_only_qdq(model: onnx.ModelProto) -> onnx.ModelProto:
    """Each weight matrix W [K, N] int8 per output channel (axis 1) behind a DequantizeLinear.

    W_int8 [K, N], scale [N] -> DequantizeLinear(axis=1) -> MatMul(x, .)
    """
    return _dequantized_weights(model, set(weight_matmuls(model)), _int8_per_channel)


def _drop_round_trips(model: onnx.ModelProto) -> onnx.ModelProto:
    """Remove the fp32 -> fp16 -> fp32 cast pairs the converter leaves between two fp32
    nodes (each blocked node is wrapped on its own), then clean up with onnxscript.

        a (fp32) -> Cast(fp16) -> Cast(fp32) -> b      becomes      a -> b
    """
    import onnxscript.optimizer
    from onnxscript import ir
    from onnxscript.rewriter import pattern, rewrite

    def round_trip(op, x):
        return op.Cast(op.Cast(x, to=ir.DataType.FLOAT16), to=ir.DataType.FLOAT)

    def is_fp32(context, x, **_):
        return x.dtype == ir.DataType.FLOAT

    rule = pattern.RewriteRule(round_trip, lambda op, x: op.Identity(x), is_fp32)
    optimized = ir.from_proto(onnxscript.optimizer.optimize(rewrite(model, pattern_rewrite_rules=[rule])))
    optimized.graph.sort()  # the converter appends its casts after their readers; ONNX wants producers first
    return ir.to_proto(optimized)
