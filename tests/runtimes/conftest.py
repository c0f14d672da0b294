"""Tiny hand-made ONNX graphs for runner mechanics (no exporter involved)."""

from __future__ import annotations

import pytest


def add_graph() -> bytes:
    """c = a + b, all float32 [batch, 3]."""
    from onnx import TensorProto, helper

    a, b, c = (helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 3]) for n in "abc")
    graph = helper.make_graph([helper.make_node("Add", ["a", "b"], ["c"])], "add", [a, b], [c])
    return _serialize(graph)


def counter_graph() -> bytes:
    """A stateful toy with the export spec's names and a vocabulary of 2:

        input_ids [B, T] int64 --Cast--ReduceSum(axis 1)--> s [B, 1]
        present.0.ssm = past.0.ssm + s          [B, 1] float32
        logits = Concat(present.0.ssm, -present.0.ssm)   [B, 2]
    """
    from onnx import TensorProto, helper

    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])
    past = helper.make_tensor_value_info("past.0.ssm", TensorProto.FLOAT, ["batch", 1])
    present = helper.make_tensor_value_info("present.0.ssm", TensorProto.FLOAT, ["batch", 1])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    nodes = [
        helper.make_node("Cast", ["input_ids"], ["idsf"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["idsf", "axes"], ["s"], keepdims=1),
        helper.make_node("Add", ["past.0.ssm", "s"], ["present.0.ssm"]),
        helper.make_node("Neg", ["present.0.ssm"], ["neg"]),
        helper.make_node("Concat", ["present.0.ssm", "neg"], ["logits"], axis=1),
    ]
    graph = helper.make_graph(nodes, "counter", [ids, past], [logits, present], initializer=[axes])
    return _serialize(graph)


def _serialize(graph) -> bytes:
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every onnxruntime and TensorRT 10 parser
    onnx.checker.check_model(model)
    return model.SerializeToString()


@pytest.fixture
def add_onnx() -> bytes:
    pytest.importorskip("onnx")
    return add_graph()


@pytest.fixture
def counter_onnx() -> bytes:
    pytest.importorskip("onnx")
    return counter_graph()
