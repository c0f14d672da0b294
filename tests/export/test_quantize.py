"""Quantized graphs: what each precision touches, what it leaves alone, and how close the
results stay to the fp32 graph, in onnxruntime on the CPU."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from edgeseq.choices import FLAVORS, INT8_PRESETS
from edgeseq.export.graphs import build_graph
from edgeseq.export.quantize import QuantizationError, QuantOptions, quantize_graph, recurrent_nodes, weight_matmuls
from edgeseq.runtimes import plugin_ops
from tests.conftest import random_model, small_config

ort = pytest.importorskip("onnxruntime")

QUANTIZED_OPS = {"int8": {"DynamicQuantizeMatMul", "MatMulInteger"}, "int4": {"MatMulNBits"}}


@pytest.fixture(scope="module")
def model():
    config = small_config("M M+ S+ M A", d_model=64, vocab_size=264, tie_embeddings=True)
    model = random_model(config, dtype=torch.float32)
    with torch.no_grad():  # matrices at a trained model's scale, std 1/sqrt(fan_in), not 0.3
        for name, p in model.named_parameters():
            if p.dim() == 2 and name != "embedding.weight":
                p.mul_(1 / (0.3 * p.shape[1] ** 0.5))
    return model


def session(proto: onnx.ModelProto):
    """A CPU session; plugin nodes (the tensorrt flavor) run the kernels' twins."""
    options = ort.SessionOptions()
    if any(n.domain == "edgeseq.trt" for n in proto.graph.node):
        plugin_ops.configure(options, "reference")
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def feeds(sess, tokens: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    out = {}
    for i in sess.get_inputs():
        shape = [2 if isinstance(d, str) and d == "batch" else tokens if isinstance(d, str) else d for d in i.shape]
        if i.name == "input_ids":
            out[i.name] = rng.integers(0, 256, shape).astype(np.int64)
        elif i.name == "position":
            out[i.name] = np.full(shape, 7, dtype=np.int64)
        else:
            out[i.name] = (rng.standard_normal(shape) * 0.5).astype(np.float32)
    return out


def init_bytes(proto: onnx.ModelProto) -> int:
    return sum(numpy_helper.to_array(t).nbytes for t in proto.graph.initializer)


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("kind", ["step", "prefill"])
@pytest.mark.parametrize("precision, rel_limit, size_limit", [("fp16", 0.005, 0.55), ("int8", 0.15, 0.4), ("int4", 0.6, 0.3)])
def test_quantized_graph_keeps_its_io_and_stays_close(model, flavor, kind, precision, rel_limit, size_limit):
    fp32 = build_graph(model, kind, flavor)
    quant = quantize_graph(fp32, QuantOptions(precision, int8_preset="avx2"))
    # the I/O signature (names, dtypes) is unchanged: the state a stream carries stays fp32
    sig = lambda p: [(v.name, v.type.tensor_type.elem_type) for v in (*p.graph.input, *p.graph.output)]
    assert sig(quant) == sig(fp32)
    ops = {n.op_type for n in quant.graph.node}
    assert QUANTIZED_OPS.get(precision, set()) & ops or precision == "fp16"
    assert init_bytes(quant) <= size_limit * init_bytes(fp32)
    rng = np.random.default_rng()
    ref_sess, q_sess = session(fp32), session(quant)
    f = feeds(ref_sess, 1 if kind == "step" else 9, rng)
    ref, out = ref_sess.run(None, f), q_sess.run(None, f)
    plugin_ops.raise_pending()
    for name, r, o in zip([o.name for o in ref_sess.get_outputs()], ref, out):
        assert o.dtype == r.dtype and o.shape == r.shape, name
        # relative L2 over the whole output. Random weights, 24 draws: int8 median 0.035 (max 0.06), int4
        # median 0.20 with a tail to 0.4; a wrong axis or scale gives >= 1.
        if r.dtype == np.float32 and np.any(r):
            rel = float(np.linalg.norm(o - r) / np.linalg.norm(r))
            assert rel <= rel_limit, (name, rel)


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_only_weight_matrices_are_quantized(model, precision):
    fp32 = build_graph(model, "step", "portable")
    matrices = weight_matmuls(fp32)
    quant = quantize_graph(fp32, QuantOptions(precision))
    quantized = [n for n in quant.graph.node if n.op_type in QUANTIZED_OPS[precision]]
    assert len(quantized) == len(matrices)  # every projection and the head, nothing else
    # the scan's activation x activation products (C . state) are untouched float MatMuls
    assert sum(n.op_type == "MatMul" for n in quant.graph.node) == sum(n.op_type == "MatMul" for n in fp32.graph.node) - len(matrices)
    # numerically sensitive parameters stay fp32 and bit-identical
    before = {t.name: numpy_helper.to_array(t) for t in fp32.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in quant.graph.initializer}
    sensitive = [k for k in before if any(s in k for s in ("conv1d", "A_log", ".D", "dt_bias", "norm"))]
    assert sensitive
    for k in sensitive:
        assert after[k].dtype == np.float32 and np.array_equal(after[k], before[k]), k


def test_fp16_keeps_the_recurrence_in_fp32(model):
    fp32 = build_graph(model, "step", "portable")
    kept = set(recurrent_nodes(fp32))
    assert kept and not kept & set(weight_matmuls(fp32))
    half = quantize_graph(fp32, QuantOptions("fp16"))
    big = [t for t in half.graph.initializer if len(t.dims) == 2 and np.prod(t.dims) >= 64 * 64]
    assert big and all(t.data_type == onnx.TensorProto.FLOAT16 for t in big)  # the matrices halve
    # no past.* input is rounded to fp16 on its way into the recurrence
    consumers = {n.input[0]: n for n in half.graph.node if n.op_type == "Cast"}
    assert not [name for name, n in consumers.items() if name.startswith("past.")]


def test_int8_weight_only_qdq_for_tensorrt(model):
    fp32 = build_graph(model, "step", "portable")
    q = quantize_graph(fp32, QuantOptions("int8", int8_preset="qdq-weight-only"))
    dq = [n for n in q.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == len(weight_matmuls(fp32))
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    for n in dq:
        w, scale = inits[n.input[0]], inits[n.input[1]]
        assert w.dtype == np.int8 and scale.shape == (w.shape[1],)  # per output channel
        assert np.abs(w).max() <= 127


@pytest.mark.parametrize("kwargs, words", [
    ({"precision": "int3"}, "unknown precision"),
    ({"precision": "int8", "int8_preset": "sse"}, "unknown int8 preset"),
    ({"precision": "int4", "block_size": 24}, "power of two"),
])  # fmt: skip
def test_bad_options_are_refused(kwargs, words):
    with pytest.raises(QuantizationError, match=words):
        QuantOptions(**kwargs)


def test_quantization_is_deterministic(model):
    fp32 = build_graph(model, "prefill", "portable")
    for precision in ("fp16", "int8", "int4"):
        a = quantize_graph(fp32, QuantOptions(precision)).SerializeToString()
        b = quantize_graph(fp32, QuantOptions(precision)).SerializeToString()
        assert a == b, precision


@pytest.mark.parametrize("preset", INT8_PRESETS)
def test_every_int8_preset_quantizes_and_stays_close(model, preset):
    """A target profile may name any preset; each must give a graph that runs and stays close."""
    fp32 = build_graph(model, "step", "portable")
    quant = quantize_graph(fp32, QuantOptions("int8", int8_preset=preset))
    assert {n.op_type for n in quant.graph.node} & (QUANTIZED_OPS["int8"] | {"DequantizeLinear"})
    ref_sess, q_sess = session(fp32), session(quant)
    f = feeds(ref_sess, 1, np.random.default_rng())
    for r, o in zip(ref_sess.run(None, f), q_sess.run(None, f)):
        if r.dtype == np.float32 and np.any(r):
            rel = float(np.linalg.norm(o - r) / np.linalg.norm(r))
            assert rel <= 0.15, rel  # the int8 limit above
