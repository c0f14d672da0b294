"""Quantized variants of exported graphs, made with onnxruntime's own tools.

    fp16  onnxruntime.transformers.float16: weights, projections and the MLP in fp16; the
          recurrent path of every layer (conv, scan/step, attention over the cache, the
          gated norm) and every reduction stay fp32, and so do the graph's inputs and
          outputs: the state a stream carries is fp32 whatever the precision.
    int8  onnxruntime.quantization.quantize_dynamic on the weight matrices (per-channel
          symmetric int8 weights, activations quantized per call), with the per-ISA
          presets of ``edgeseq.choices.INT8_PRESETS``; for TensorRT targets, weight-only
          int8 through DequantizeLinear nodes (TensorRT's parser reads Q/DQ; its builder
          picks the kernels).
    int4  onnxruntime's MatMulNBitsQuantizer: block-wise symmetric int4 weights
          (MatMulNBits; the embedding table as GatherBlockQuantized), block size configurable.

Only the 2-D weight matrices are quantized: the embedding (int4), the projections and the
head. The numerically sensitive parameters (conv kernels, A, D, dt bias, norm weights,
biases) and the state are never quantized; neither is any MatMul whose operands are both
activations (the scan's C·B and state products).
"""

from __future__ import annotations

import logging
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgeseq.choices import INT8_PRESETS, PRECISIONS
from edgeseq.errors import EdgeseqError

# Op types the fp16 conversion leaves in fp32 wherever they are: reductions, exponentials
# and the recurrence ops of the opset-27 and TensorRT flavors.
FP32_OPS = (
    "ReduceMean", "ReduceSum", "Sqrt", "Div", "Pow", "Exp", "Softplus", "Softmax", "CumSum",
    "LinearAttention", "CausalConvWithState", "EdgeseqSSDChunkState", "EdgeseqSSDChunkScan", "EdgeseqSSDStep",
)  # fmt: skip


class QuantizationError(EdgeseqError):
    """A precision or option the quantizer cannot honour."""


@dataclass(frozen=True)
class QuantOptions:
    precision: str = "fp32"
    int8_preset: str = "avx512_vnni"
    block_size: int = 32  # int4: weights per scale
    accuracy_level: int | None = 4  # int4 on CPU: 4 = int8 activations in MatMulNBits (fastest)

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise QuantizationError(f"unknown precision {self.precision!r}; use one of {', '.join(PRECISIONS)}")
        if self.int8_preset not in INT8_PRESETS:
            raise QuantizationError(f"unknown int8 preset {self.int8_preset!r}; use one of {', '.join(INT8_PRESETS)}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise QuantizationError(f"int4 block size must be a power of two >= 16, not {self.block_size}")

    def describe(self) -> dict:
        d = {"precision": self.precision}
        if self.precision == "int8":
            d |= {"method": "weight-only Q/DQ" if self.int8_preset == "qdq-weight-only" else "onnxruntime dynamic",
                  "preset": self.int8_preset, **INT8_PRESETS[self.int8_preset]}
        if self.precision == "int4":
            d |= {"method": "onnxruntime MatMulNBits", "block_size": self.block_size, "accuracy_level": self.accuracy_level}
        if self.precision == "fp16":
            d |= {"method": "onnxruntime float16 conversion", "fp32_kept": "state path, reductions, graph I/O"}
        return d


def weight_matmuls(model: onnx.ModelProto) -> list[str]:
    """Names of the MatMul nodes whose right operand is a 2-D weight initializer."""
    inits = {t.name: t for t in model.graph.initializer}
    return [
        n.name
        for n in model.graph.node
        if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]].dims) == 2
    ]


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


def quantize_graph(model: onnx.ModelProto, options: QuantOptions) -> onnx.ModelProto:
    """A quantized copy of an fp32 step or prefill graph; the I/O signature is unchanged."""
    if options.precision == "fp32":
        return model
    logging.getLogger("onnxruntime.quantization").setLevel(logging.ERROR)  # its INFO lines per node
    model = onnx.ModelProto.FromString(model.SerializeToString())  # the tools work in place
    if options.precision == "fp16":
        return _fp16(model)
    if options.precision == "int4":
        return _int4(model, options)
    if options.int8_preset == "qdq-weight-only":
        return _int8_weight_only_qdq(model)
    return _int8_dynamic(model, options)


def _fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    converted = convert_float_to_float16(
        model, keep_io_types=True, op_block_list=list(FP32_OPS), node_block_list=recurrent_nodes(model),
        disable_shape_infer=True,
    )  # fmt: skip
    return _drop_round_trips(converted)


def _int8_dynamic(model: onnx.ModelProto, options: QuantOptions) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    preset = INT8_PRESETS[options.int8_preset]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "int8.onnx"
        quantize_dynamic(
            model, out, op_types_to_quantize=["MatMul"], nodes_to_quantize=weight_matmuls(model),
            weight_type=QuantType.QInt8, per_channel=preset["per_channel"], reduce_range=preset["reduce_range"],
            extra_options={"MatMulConstBOnly": True},
        )  # fmt: skip
        return onnx.load(out)


def _int4(model: onnx.ModelProto, options: QuantOptions) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    config = DefaultWeightOnlyQuantConfig(
        block_size=options.block_size, is_symmetric=True, accuracy_level=options.accuracy_level,
        op_types_to_quantize=("MatMul", "Gather"), quant_axes=(("MatMul", 0), ("Gather", 1)),
    )  # fmt: skip
    quantizer = MatMulNBitsQuantizer(
        model, bits=4, block_size=options.block_size, is_symmetric=True, accuracy_level=options.accuracy_level,
        nodes_to_include=weight_matmuls(model) + _embedding_gathers(model), algo_config=config,
        op_types_to_quantize=("MatMul", "Gather"), quant_axes=(("MatMul", 0), ("Gather", 1)),
    )  # fmt: skip
    quantizer.process()
    return quantizer.model.model


def _embedding_gathers(model: onnx.ModelProto) -> list[str]:
    inits = {t.name for t in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "Gather" and n.input[0] in inits]


def _int8_weight_only_qdq(model: onnx.ModelProto) -> onnx.ModelProto:
    """Each weight matrix W [K, N] becomes int8 per output channel (axis 1) behind a
    DequantizeLinear; onnxruntime's quantize_data computes the symmetric scales.

        W_int8 [K, N], scale [N] -> DequantizeLinear(axis=1) -> MatMul(x, .)
    """
    from onnxruntime.quantization.quant_utils import quantize_data

    inits = {t.name: t for t in model.graph.initializer}
    targets = set(weight_matmuls(model))
    replaced: dict[str, str] = {}
    new_nodes = []
    for node in model.graph.node:
        if node.name in targets:
            w_name = node.input[1]
            if w_name not in replaced:
                w = numpy_helper.to_array(inits[w_name]).astype(np.float32)
                q_cols, scales = [], []
                for col in w.T:  # one symmetric int8 scale per output channel
                    _, scale, q = quantize_data(col, onnx.TensorProto.INT8, symmetric=True)
                    q_cols.append(q)
                    scales.append(np.float32(scale))
                q_name, s_name, z_name = f"{w_name}_int8", f"{w_name}_scale", f"{w_name}_zero"
                model.graph.initializer.extend([
                    numpy_helper.from_array(np.stack(q_cols, axis=1).astype(np.int8), q_name),
                    numpy_helper.from_array(np.asarray(scales, dtype=np.float32), s_name),
                    numpy_helper.from_array(np.zeros(len(scales), dtype=np.int8), z_name),
                ])  # fmt: skip
                out = f"{w_name}_dq"
                new_nodes.append(helper.make_node("DequantizeLinear", [q_name, s_name, z_name], [out],
                                                  name=f"{w_name}_DequantizeLinear", axis=1))
                replaced[w_name] = out
            node.input[1] = replaced[w_name]
        new_nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    kept = [t for t in model.graph.initializer if t.name not in replaced]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return model


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
    return onnxscript.optimizer.optimize(rewrite(model, pattern_rewrite_rules=[rule]))
