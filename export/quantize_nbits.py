"""Weight-only int8 and int4 in onnxruntime's ``MatMulNBits`` form, the embedding included.

onnxruntime's ``MatMulNBitsQuantizer`` turns each weight MatMul into a ``MatMulNBits``
(com.microsoft): W [K, N] blocked along K, ``bits`` per weight, one fp32 scale per block,
symmetric (the default zero point 2^(bits-1)), activations quantized to int8 per block
inside the op where ``accuracy_level`` is 4 (the VNNI / dot-product kernels). Its packed
weight is [N, K/B, B*bits/8] uint8 — one row per output column, which for the head is one
row per vocabulary entry: exactly the embedding table, quantized along the hidden axis.

So a tied embedding is read from the head's blocks (stored once), and an untied one is
quantized by the same tool through a throwaway MatMul on its transpose:

    ids -> GatherBlockQuantized(B [V, K/B, B*bits/8], ids, Reshape(scales, [V, K/B, 1]),
                                gather_axis=0, quantize_axis=2, bits)        [..., K/B, B]
        -> Reshape [..., K]

(quantize_axis=2: a row of the last axis is one block; the scales' trailing 1 says so.)
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

MS = "com.microsoft"


def quantize_nbits(model: onnx.ModelProto, bits: int, block_size: int, accuracy_level: int | None,
                   matmuls: list[str], gathers: list[str], tied: bool) -> onnx.ModelProto:  # fmt: skip
    """``matmuls`` (weight MatMul node names) as MatMulNBits, and the embedding ``gathers``
    (Gather node names on 2-D tables) as GatherBlockQuantized rows of N-bit blocks:
    ``tied`` ones read the head's blocks (the head is the MatMul on ``lm_head.weight.t``)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    tables: dict[str, str] = {}  # gather -> its table's transpose (untied)
    if not tied:  # each table behind a throwaway MatMul on its transpose, quantized with the rest
        model, tables = _table_matmuls(model, gathers)
    included = matmuls + [f"{w}_pack" for w in tables.values()]
    excluded = [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gather") and n.name not in included]
    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, accuracy_level=accuracy_level,
                                          op_types_to_quantize=("MatMul",), quant_axes=(("MatMul", 0),), bits=bits)  # fmt: skip
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=True,
                                     accuracy_level=accuracy_level, nodes_to_include=included,
                                     nodes_to_exclude=excluded, algo_config=config, op_types_to_quantize=("MatMul",),
                                     quant_axes=(("MatMul", 0),))  # fmt: skip
    quantizer.process()
    model = quantizer.model.model
    packed = [n for n in model.graph.node if n.op_type == "MatMulNBits"]

    def packing(weight: str) -> onnx.NodeProto | None:  # the MatMulNBits that packed ``weight``
        return next((n for n in packed if n.input[1].startswith(f"{weight}_Q")), None)

    for gather in gathers:
        source = packing("lm_head.weight.t" if tied else tables[gather])
        if source is not None:
            model = _rows_from_blocks(model, gather, source)
    throwaway = {n.name for n in model.graph.node if any(n.name.startswith(f"{w}_pack") for w in tables.values())}
    return _drop_nodes(model, throwaway)


def _table_matmuls(model: onnx.ModelProto, gathers: list[str]) -> tuple[onnx.ModelProto, dict[str, str]]:
    """A MatMul(rows, table^T) per gathered table, named ``<table>.t_pack``, for the
    quantizer to pack (its output unused); gather name -> the transpose's name."""
    inits = {t.name: t for t in model.graph.initializer}
    tables = {}
    for node in [n for n in model.graph.node if n.name in gathers]:
        table = numpy_helper.to_array(inits[node.input[0]])
        name = f"{node.input[0]}.t"
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(table.T), name))
        tables[node.name] = name
        model.graph.node.append(
            helper.make_node("MatMul", [node.output[0], name], [f"{name}_unused"], name=f"{name}_pack")
        )
    return model, tables


def _rows_from_blocks(model: onnx.ModelProto, gather: str, packed: onnx.NodeProto) -> onnx.ModelProto:
    """The Gather node ``gather`` replaced by rows of ``packed``'s (a MatMulNBits) blocks (diagram above)."""
    attrs = {a.name: helper.get_attribute_value(a) for a in packed.attribute}
    k, block, bits = attrs["K"], attrs["block_size"], attrs["bits"]
    if k % block:  # rows would carry the last block's padding; keep the table as it is
        return model
    scales_3d, shape = f"{packed.input[2]}_rows", f"{packed.input[2]}_rows_shape"
    model.graph.initializer.append(numpy_helper.from_array(np.array([attrs["N"], k // block, 1], np.int64), shape))
    new_nodes, tables = [], set()
    for node in model.graph.node:
        if node.name != gather:
            new_nodes.append(node)
            continue
        table, ids, out = node.input[0], node.input[1], node.output[0]
        n = node.name
        new_nodes += [
            helper.make_node("Reshape", [packed.input[2], shape], [scales_3d], name=f"{n}_scales"),
            helper.make_node("GatherBlockQuantized", [packed.input[1], ids, scales_3d], [f"{n}_blocks"], name=f"{n}_nbits",
                             domain=MS, gather_axis=0, quantize_axis=2, block_size=block, bits=bits),
            helper.make_node("Shape", [ids], [f"{n}_lead"], name=f"{n}_lead"),
            helper.make_node("Concat", [f"{n}_lead", f"{n}_k"], [f"{n}_shape"], name=f"{n}_shape", axis=0),
            helper.make_node("Reshape", [f"{n}_blocks", f"{n}_shape"], [out], name=f"{n}_rows"),
        ]  # fmt: skip
        model.graph.initializer.append(numpy_helper.from_array(np.array([k], np.int64), f"{n}_k"))
        tables.add(table)
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    model = _drop_unread(model, tables)
    if not any(o.domain == MS for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS, 1))
    return model


def _drop_unread(model: onnx.ModelProto, names: set[str]) -> onnx.ModelProto:
    """Remove the initializers among ``names`` that no node reads any more."""
    read = {i for n in model.graph.node for i in n.input}
    kept = [t for t in model.graph.initializer if t.name not in names or t.name in read]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return model


def _drop_nodes(model: onnx.ModelProto, names: set[str]) -> onnx.ModelProto:
    """Remove nodes ``names`` and the initializers only they read."""
    dropped = {i for n in model.graph.node if n.name in names for i in n.input}
    kept = [n for n in model.graph.node if n.name not in names]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    return _drop_unread(model, dropped)
