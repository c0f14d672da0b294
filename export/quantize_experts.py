"""Quantized expert tables: the 3-D weights [experts, out, in] that a mixture-of-experts
step graph reads with a Gather of each token's chosen experts (``edgeseq.kinds.moe``).

onnxruntime's quantizers only know 2-D MatMul weights, so ``edgeseq.export.quantize`` calls
this first for int8 and int4 (fp16's converter handles the tables as they are):

    int8  per expert and output row, symmetric (scale = max|row| / 127); the chosen
          experts' rows are gathered, then dequantized:
              Gather(W_int8 [e, o, i], experts) -> Cast(fp32) -> Mul(Gather(scale [e, o, 1], experts))
    int4  in blocks of ``block_size`` along ``in``, scale = max|block| / 7 (as the QDQ form
          of 2-D weights), the graph raised to opset 21. ONNX has no Gather on int4 tensors:
          with onnxruntime's contrib ops (the MatMulNBits form) one op gathers the chosen
          experts' blocks and dequantizes them,
              GatherBlockQuantized(W_int4 [e, o, i], experts, scale [e, o, i/B])
          with standard ops only (the QDQ form, TensorRT) the table is dequantized whole,
          as rows [e*o, i] (TensorRT takes block-wise scales of rank <= 2), and the Gather
          reads it (a step then reads every expert's int4 weights):
              W_int4 [e*o, i], scale [e*o, i/B] -> DequantizeLinear(axis=1, block_size=B)
                -> Reshape [e, o, i] -> Gather(experts)
          A table whose ``in`` the block does not divide takes the int8 form.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


def expert_gathers(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Gather nodes that read a 3-D float initializer along axis 0: expert tables."""
    inits = {t.name: t for t in model.graph.initializer}
    return [
        n for n in model.graph.node
        if n.op_type == "Gather" and n.input[0] in inits and len(inits[n.input[0]].dims) == 3
        and inits[n.input[0]].data_type == onnx.TensorProto.FLOAT
        and next((a.i for a in n.attribute if a.name == "axis"), 0) == 0
    ]  # fmt: skip


def quantize_expert_tables(model: onnx.ModelProto, precision: str, block_size: int, contrib: bool = False
                           ) -> onnx.ModelProto:  # fmt: skip
    """``model`` with every expert table in int8 or int4 (module docstring); others untouched.
    ``contrib``: int4 tables gathered by onnxruntime's ``GatherBlockQuantized``."""
    if precision not in ("int8", "int4") or not expert_gathers(model):
        return model
    if precision == "int4" and _opset(model) < 21:
        from onnx import version_converter

        model = version_converter.convert_version(model, 21)
    if contrib and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    inits = {t.name: t for t in model.graph.initializer}
    gathers = {n.name for n in expert_gathers(model)}  # builder and optimizer name every node
    blocked = {}  # table name -> its dequantized name (int4)
    scaled = {}  # table name -> (int8 name, scale name)
    new_nodes = []
    for node in model.graph.node:
        if node.name not in gathers:
            new_nodes.append(node)
            continue
        table = node.input[0]
        w = numpy_helper.to_array(inits[table]).astype(np.float32)
        if precision == "int4" and w.shape[-1] % block_size == 0 and contrib:
            if table not in blocked:
                blocked[table] = f"{table}_int4"
                q, scale = _int4_blocks(w, block_size)
                model.graph.initializer.extend(
                    [numpy_helper.from_array(q, f"{table}_int4"), numpy_helper.from_array(scale, f"{table}_scale")]
                )
            new_nodes.append(helper.make_node(
                "GatherBlockQuantized", [f"{table}_int4", node.input[1], f"{table}_scale"], list(node.output),
                name=f"{node.name}_int4", domain="com.microsoft", gather_axis=0, quantize_axis=2,
                block_size=block_size, bits=4,
            ))  # fmt: skip
            continue
        if precision == "int4" and w.shape[-1] % block_size == 0:
            if table not in blocked:
                blocked[table] = f"{table}_dq"
                q, scale = _int4_blocks(w, block_size)
                rows = w.shape[0] * w.shape[1]  # 2-D for TensorRT: block-wise scales of rank <= 2
                model.graph.initializer.extend([
                    numpy_helper.from_array(q.reshape(rows, -1), f"{table}_int4"),
                    numpy_helper.from_array(scale.reshape(rows, -1), f"{table}_scale"),
                    numpy_helper.from_array(np.asarray(w.shape, dtype=np.int64), f"{table}_shape"),
                ])  # fmt: skip
                new_nodes += [
                    helper.make_node("DequantizeLinear", [f"{table}_int4", f"{table}_scale"], [f"{table}_rows"],
                                     name=f"{table}_DequantizeLinear", axis=1, block_size=block_size),
                    helper.make_node("Reshape", [f"{table}_rows", f"{table}_shape"], [blocked[table]],
                                     name=f"{table}_Reshape"),
                ]  # fmt: skip
            node.input[0] = blocked[table]
            new_nodes.append(node)
            continue
        if table not in scaled:
            scaled[table] = (f"{table}_int8", f"{table}_rowscale")
            q, scale = _int8_rows(w)
            model.graph.initializer.extend(
                [numpy_helper.from_array(q, scaled[table][0]), numpy_helper.from_array(scale, scaled[table][1])]
            )
        new_nodes += _gather_then_dequantize(node, *scaled[table])
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    kept = [t for t in model.graph.initializer if t.name not in blocked and t.name not in scaled]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return model


def _gather_then_dequantize(node: onnx.NodeProto, q: str, scale: str) -> list[onnx.NodeProto]:
    """Gather(table, idx) -> y   becomes   Cast(Gather(q, idx)) * Gather(scale, idx) -> y."""
    idx, out, name = node.input[1], node.output[0], node.name
    return [
        helper.make_node("Gather", [q, idx], [f"{out}_int8"], name=f"{name}_int8", axis=0),
        helper.make_node("Gather", [scale, idx], [f"{out}_scale"], name=f"{name}_scale", axis=0),
        helper.make_node("Cast", [f"{out}_int8"], [f"{out}_fp32"], name=f"{name}_cast", to=onnx.TensorProto.FLOAT),
        helper.make_node("Mul", [f"{out}_fp32", f"{out}_scale"], [out], name=f"{name}_dequantize"),
    ]


def _int8_rows(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """w [e, o, i] -> int8 [e, o, i] in [-127, 127], scale [e, o, 1] = max|row| / 127."""
    amax = np.abs(w).max(axis=-1, keepdims=True)
    scale = np.where(amax > 0, amax / 127, 1).astype(np.float32)
    return np.clip(np.rint(w / scale), -127, 127).astype(np.int8), scale


def _int4_blocks(w: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """w [e, o, i] -> int4 [e, o, i] in [-7, 7], scale [e, o, i/B] = max|block| / 7."""
    import ml_dtypes

    e, o, i = w.shape
    amax = np.abs(w.reshape(e, o, i // block, block)).max(axis=-1)  # [e, o, i/B]
    scale = np.where(amax > 0, amax / 7, 1).astype(np.float32)
    q = np.clip(np.rint(w / np.repeat(scale, block, axis=-1)), -7, 7).astype(ml_dtypes.int4)
    return q, scale


def _opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
