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

QUANTIZED_OPS = {"int8": {"MatMulNBits"}, "int4": {"MatMulNBits"}}


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
        elif i.name == "attention_mask":
            out[i.name] = np.ones(shape, np.int64)
        elif i.name == "position":
            out[i.name] = np.full(shape, 7, dtype=np.int64)
        else:
            out[i.name] = (rng.standard_normal(shape) * 0.5).astype(np.float32)
    return out


def init_bytes(proto: onnx.ModelProto) -> int:
    return sum(numpy_helper.to_array(t).nbytes for t in proto.graph.initializer)


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("kind", ["step", "prefill"])
@pytest.mark.parametrize(
    "precision, rel_limit, size_limit", [("fp16", 0.005, 0.55), ("int8", 0.15, 0.4), ("int4", 0.6, 0.3)]
)
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
    assert sum(n.op_type == "MatMul" for n in quant.graph.node) == sum(
        n.op_type == "MatMul" for n in fp32.graph.node
    ) - len(matrices)
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
    ({"precision": "int4", "int4_form": "GPTQ"}, "unknown int4 form"),
])  # fmt: skip
def test_bad_options_are_refused(kwargs, words):
    with pytest.raises(QuantizationError, match=words):
        QuantOptions(**kwargs)


def test_quantization_is_deterministic(model):
    fp32 = build_graph(model, "prefill", "portable")
    for options in (
        QuantOptions("fp16"),
        QuantOptions("int8"),
        QuantOptions("int4"),
        QuantOptions("int4", int4_form="QDQ"),
    ):
        a = quantize_graph(fp32, options).SerializeToString()
        b = quantize_graph(fp32, options).SerializeToString()
        assert a == b, options


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


# ---- int4 for runtimes without onnxruntime's contrib ops (TensorRT) ---------------------
def attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def dequantized(q: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Each DequantizeLinear's output, computed in numpy from its initializers."""
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    out = {}
    for n in q.graph.node:
        if n.op_type == "DequantizeLinear":
            w, scale = inits[n.input[0]].astype(np.float32), inits[n.input[1]]
            zero = inits[n.input[2]].astype(np.float32) if len(n.input) > 2 else 0
            a = attrs(n)
            if "block_size" in a:  # blocked along axis 0: scale [K / B, N]
                scale, zero = (np.repeat(v, a["block_size"], axis=0) if np.ndim(v) else v for v in (scale, zero))
            out[n.output[0]] = (w - zero) * scale  # per channel (axis 1): [N] broadcasts over rows
    return out


@pytest.mark.parametrize("kind", ["step", "prefill"])
def test_int4_for_tensorrt_is_blockwise_dequantize_linear(model, kind):
    """What TensorRT's parser takes (docs/gpu-and-tensorrt.md): standard ops only, opset 21;
    each int4 weight W [K, N] behind a DequantizeLinear with axis 0 and a block size that
    divides K, fp32 scales [K / B, N] all positive, no zero point, N even, feeding a
    MatMul's weight input; matrices the block does not divide int8 per channel; the
    embedding table fp16, cast to fp32 after the lookup."""
    fp32 = build_graph(model, kind, "portable")
    q = quantize_graph(fp32, QuantOptions("int4", block_size=32, int4_form="QDQ"))
    assert {(o.domain, o.version) for o in q.opset_import} == {("", 21)} and not any(n.domain for n in q.graph.node)
    inits = {t.name: t for t in q.graph.initializer}
    readers = {i: n for n in q.graph.node for i in n.input}
    dq = [n for n in q.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == len(weight_matmuls(fp32)) and all(readers[n.output[0]].op_type == "MatMul" for n in dq)
    assert all(readers[n.output[0]].input[1] == n.output[0] for n in dq)
    blocked = [n for n in dq if inits[n.input[0]].data_type == onnx.TensorProto.INT4]
    for n in blocked:
        (k, cols), scale = inits[n.input[0]].dims, inits[n.input[1]]
        assert attrs(n) == {"axis": 0, "block_size": 32} and len(n.input) == 2, n.name
        assert k % 32 == 0 and cols % 2 == 0 and list(scale.dims) == [k // 32, cols], n.name
        assert scale.data_type == onnx.TensorProto.FLOAT and (numpy_helper.to_array(scale) > 0).all(), n.name
    per_channel = [n for n in dq if n not in blocked]
    assert all(inits[n.input[0]].data_type == onnx.TensorProto.INT8 and attrs(n) == {"axis": 1} for n in per_channel)
    assert all(inits[n.input[0]].dims[0] % 32 for n in per_channel)  # only where the block does not divide K
    assert len(blocked) > len(per_channel) > 0  # this model has both (d_mlp = 48)
    gather = next(n for n in q.graph.node if n.op_type == "Gather" and n.input[0] in inits)
    assert inits[gather.input[0]].data_type == onnx.TensorProto.FLOAT16
    cast = readers[gather.output[0]]
    assert cast.op_type == "Cast" and attrs(cast)["to"] == onnx.TensorProto.FLOAT


def test_int4_blocks_round_each_weight_to_the_nearest_step(model):
    """scale = max|W| / 7 per block of 32 rows: every weight within half a step of its
    int4 value, and each block's largest weight at +-7 exactly."""
    fp32 = build_graph(model, "step", "portable")
    weights = {t.name: numpy_helper.to_array(t) for t in fp32.graph.initializer}
    q = quantize_graph(fp32, QuantOptions("int4", block_size=32, int4_form="QDQ"))
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    checked = 0
    for n in q.graph.node:
        if n.op_type == "DequantizeLinear" and "block_size" in attrs(n):
            w = weights[n.output[0].removesuffix("_dq")]
            values, scale = inits[n.input[0]].astype(np.float32), np.repeat(inits[n.input[1]], 32, axis=0)
            assert (np.abs(w - values * scale) <= 0.5 * scale * (1 + 1e-6)).all(), n.name
            assert np.array_equal(
                np.abs(values).reshape(-1, 32, w.shape[1]).max(axis=1), np.full((w.shape[0] // 32, w.shape[1]), 7)
            )
            checked += 1
    assert checked


@pytest.mark.parametrize("kind", ["step", "prefill"])
def test_int4_dequantize_form_runs_in_onnxruntime_as_its_weights_say(model, kind):
    """onnxruntime's DequantizeLinear reads the packed int4 blocks as intended: the graph
    equals the fp32 graph given the weights dequantized in numpy (fresh inputs, 1e-5).
    Graph optimizations off: onnxruntime would fuse DequantizeLinear + MatMul into
    MatMulNBits with int8 activations (its default accuracy level 4), 2 % away."""
    q = quantize_graph(build_graph(model, kind, "portable"), QuantOptions("int4", int4_form="QDQ"))
    plain = onnx.ModelProto.FromString(q.SerializeToString())
    values = dequantized(q)
    kept = [n for n in plain.graph.node if n.op_type != "DequantizeLinear"]
    del plain.graph.node[:]
    plain.graph.node.extend(kept)
    plain.graph.initializer.extend(numpy_helper.from_array(v.astype(np.float32), name) for name, v in values.items())
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    q_sess = ort.InferenceSession(q.SerializeToString(), options, providers=["CPUExecutionProvider"])
    plain_sess = session(plain)
    f = feeds(q_sess, 1 if kind == "step" else 9, np.random.default_rng())
    for name, a, b in zip([o.name for o in q_sess.get_outputs()], q_sess.run(None, f), plain_sess.run(None, f)):
        if a.dtype == np.float32 and np.any(b):
            assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b), name


@pytest.mark.parametrize("kind", ["step", "prefill"])
def test_int4_forms_agree_in_onnxruntime(model, kind):
    """The TensorRT form and the MatMulNBits form, on fresh random inputs: each stays close
    to fp32 and they stay close to each other (relative L2 of each output). Measured over
    24 draws (12 random models, step and prefill), 264 outputs: each form at most 0.28
    from fp32 (median 0.04), the forms at most 0.37 apart (median 0.06): their rounding
    differs (max|W|/7 against onnxruntime's signed max/8; an fp16 against an int4
    embedding). The wiring itself is held to 1e-5 by the test above."""
    fp32 = build_graph(model, kind, "portable")
    nbits = quantize_graph(fp32, QuantOptions("int4", int4_form="MatMulNBits"))
    qdq = quantize_graph(fp32, QuantOptions("int4", int4_form="QDQ"))
    sessions = [session(g) for g in (fp32, nbits, qdq)]
    f = feeds(sessions[0], 1 if kind == "step" else 9, np.random.default_rng())
    ref, a, b = (s.run(None, f) for s in sessions)
    names = [o.name for o in sessions[0].get_outputs()]
    for name, r, x, y in zip(names, ref, a, b):
        if r.dtype == np.float32 and np.any(r):
            rel = lambda u, v: float(np.linalg.norm(u - v) / np.linalg.norm(v))
            assert rel(y, r) <= 0.6 and rel(x, r) <= 0.6 and rel(y, x) <= 0.6, (name, rel(y, r), rel(x, r), rel(y, x))


@pytest.mark.parametrize("precision, form, opset", [
    ("fp32", "MatMulNBits", 18), ("fp16", "MatMulNBits", 18), ("int8", "MatMulNBits", 18),
    ("int4", "MatMulNBits", 18), ("int4", "QDQ", 21),
])  # fmt: skip
def test_the_portable_opset_is_what_the_readme_says(model, precision, form, opset):
    """README.md and docs/bundles.md: the portable graphs are opset 18 at fp32, fp16 and
    int8, and at int4 in the MatMulNBits form (packed uint8); 21 in the QDQ form (the first
    opset with int4 tensors)."""
    q = quantize_graph(build_graph(model, "step", "portable"), QuantOptions(precision, int8_preset="qdq-weight-only",
                                                                            int4_form=form))  # fmt: skip
    assert next(o.version for o in q.opset_import if o.domain == "") == opset
    onnx.checker.check_model(q)


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_quantizing_prints_no_third_party_hints(model, precision, capfd):
    """onnxruntime's quantizer logs a pre-processing hint on the root logger, which Python
    prints to stderr; it says nothing to our users, so none of it may reach them."""
    import logging

    fp32 = build_graph(model, "step", "portable")
    root = logging.getLogger()
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    root.addHandler(handler)
    try:
        quantize_graph(fp32, QuantOptions(precision))
    finally:
        root.removeHandler(handler)
    assert not [m for m in seen if "pre-processing" in m], seen
    assert "pre-processing" not in capfd.readouterr().err
    assert root.filters == []  # the filter is gone afterwards
