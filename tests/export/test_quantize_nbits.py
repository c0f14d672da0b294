"""The MatMulNBits forms read the embedding as rows of N-bit blocks: a tied table from the
head's own blocks (stored once), an untied one packed the same way."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from edgeseq.export.graphs import build_graph
from edgeseq.export.quantize import QuantOptions, quantize_graph
from tests.conftest import random_model, small_config

ort = pytest.importorskip("onnxruntime")


def rows_exposed(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, onnx.NodeProto]:
    """A copy with the embedding lookup's output as an extra graph output, and that lookup."""
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    gbq = next(n for n in proto.graph.node if n.op_type == "GatherBlockQuantized")
    rows = next(n for n in proto.graph.node if gbq.output[0] in n.input and n.op_type == "Reshape")
    proto.graph.output.append(helper.make_tensor_value_info(rows.output[0], onnx.TensorProto.FLOAT, None))
    return proto, gbq


def dequantized_rows(proto: onnx.ModelProto, gbq: onnx.NodeProto, ids: np.ndarray) -> np.ndarray:
    """The rows ``ids`` of the packed table, dequantized in numpy: (q - 2^(bits-1)) * scale."""
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    attrs = {a.name: helper.get_attribute_value(a) for a in gbq.attribute}
    scales_of = next(n for n in proto.graph.node if n.output[0] == gbq.input[2])  # Reshape(scales, [N, K/B, 1])
    packed, scales = inits[gbq.input[0]], inits[scales_of.input[0]]  # [N, K/B, B*bits/8], [N, K/B]
    if attrs["bits"] == 4:  # two a byte, low nibble first
        q = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(*packed.shape[:2], -1)
    else:
        q = packed
    w = (q.astype(np.float32) - 2 ** (attrs["bits"] - 1)) * scales[..., None]
    return w.reshape(w.shape[0], -1)[ids]


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("precision, limit", [("int8", 0.05), ("int4", 0.6)])
@pytest.mark.parametrize("kind", ["step", "prefill"])
def test_embedding_rows_come_from_nbit_blocks(tied, precision, limit, kind):
    config = small_config("M M+", d_model=64, vocab_size=200, tie_embeddings=tied)
    model = random_model(config, dtype=torch.float32)
    fp32 = build_graph(model, kind, "contrib")
    quant = quantize_graph(fp32, QuantOptions(precision), tied=tied)
    names = {t.name for t in quant.graph.initializer}
    assert "embedding.weight" not in names and not any(n.name.endswith("_pack") for n in quant.graph.node)
    exposed, gbq = rows_exposed(quant)
    heads = [n.input[1] for n in quant.graph.node if n.op_type == "MatMulNBits" and n.input[1].startswith("lm_head")]
    # tied: the head's own blocks (nothing stored twice); untied: the table's own
    assert len(heads) == 1 and (gbq.input[0] == heads[0]) == tied
    assert tied or gbq.input[0].startswith("embedding.weight.t")
    rng = np.random.default_rng()
    batch, t = int(rng.integers(1, 4)), 1 if kind == "step" else int(rng.integers(2, 9))
    ids = rng.integers(0, config.vocab_size, (batch, t))
    sess = ort.InferenceSession(exposed.SerializeToString(), providers=["CPUExecutionProvider"])
    ref = ort.InferenceSession(fp32.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {}
    for i in ref.get_inputs():
        shape = [batch if d == "batch" else t if isinstance(d, str) else d for d in i.shape]
        feeds[i.name] = (ids if i.name == "input_ids" else np.ones(shape, np.int64) if i.type == "tensor(int64)"
                         else (rng.standard_normal(shape) * 0.5).astype(np.float32))  # fmt: skip
    if kind == "step":
        feeds["input_ids"] = ids[:, :1]
    out = sess.run(None, feeds)
    rows = out[-1].reshape(-1, config.d_model)
    want = dequantized_rows(quant, gbq, feeds["input_ids"].reshape(-1))
    np.testing.assert_allclose(rows, want, rtol=0, atol=1e-6)  # the wiring: exactly the packed rows
    table = model.embedding.weight.detach().numpy()[feeds["input_ids"].reshape(-1)]
    assert np.linalg.norm(rows - table) <= limit * np.linalg.norm(table)  # and close to the fp32 table
    logits, fp32_logits = out[0], ref.run(None, feeds)[0]
    assert np.linalg.norm(logits - fp32_logits) <= limit * np.linalg.norm(fp32_logits)
