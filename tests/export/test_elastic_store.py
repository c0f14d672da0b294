"""The elastic weight store (``edgeseq.export.elastic``): the shipped mamba2-tiny at
widths 1, 1/2, 1/4, 1/8 in one weights.data no bigger than 1.1x the width-1 bundle's, each
width's graphs computing what its own graphs compute; tensors that are no prefix stay whole."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from edgeseq.deploy.bundle import INLINE_BYTES, write_graphs
from edgeseq.export.elastic import share_prefixes
from edgeseq.export.genai import decoder_graph
from edgeseq.export.graphs import SPLIT_K, build_graph
from edgeseq.extract import extract

ort = pytest.importorskip("onnxruntime")

WIDTHS = ["1", "1/2", "1/4", "1/8"]


def _session(path):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options)


def _feeds(session, kind: str, rng) -> dict[str, np.ndarray]:
    t = 1 if kind == "step" else int(rng.integers(2, 70))
    feeds = {}
    for spec in session.get_inputs():
        if spec.name == "input_ids":
            feeds[spec.name] = rng.integers(0, 264, (2, t))
        elif spec.name == "attention_mask":
            feeds[spec.name] = np.ones((2, t), np.int64)
        else:
            shape = [2 if isinstance(d, str) or d is None else d for d in spec.shape]
            feeds[spec.name] = (rng.standard_normal(shape) * 0.5).astype(np.float32)
    return feeds


@pytest.fixture(scope="module")
def tiny_graphs():
    from edgeseq.zoo import load_model

    full = load_model("mamba2-tiny")[0]
    graphs = {}
    for w in WIDTHS:
        model = extract(full, w).float().eval()
        step = build_graph(model, "step", "contrib", split_k=SPLIT_K, tied_once=True)
        prefill = build_graph(model, "prefill", "contrib", tied_once=True)
        graphs[w] = {"contrib.step.onnx": step, "contrib.prefill.onnx": prefill,
                     "contrib.decoder.onnx": decoder_graph(step, prefill)}  # fmt: skip
    return graphs


def test_mamba2_tiny_store_holds_every_width_in_little_more_than_the_widest(tiny_graphs, tmp_path):
    own = {}
    for w, files in tiny_graphs.items():
        (tmp_path / f"own{w.replace('/', '_')}").mkdir()
        own[w] = write_graphs(tmp_path / f"own{w.replace('/', '_')}", files)
    widest = {k: copy.deepcopy(v) for k, v in tiny_graphs["1"].items()}
    narrower = {f"{w.replace('/', '_')}.{k}": copy.deepcopy(v) for w in WIDTHS[1:] for k, v in tiny_graphs[w].items()}
    shared = share_prefixes(widest, narrower, INLINE_BYTES)
    (tmp_path / "elastic").mkdir()
    size = write_graphs(tmp_path / "elastic", {**widest, **narrower}, shared.blobs)
    assert size <= 1.1 * own["1"] and sum(own.values()) > 1.8 * own["1"], (size, own)
    assert shared.restored > 0 and shared.prefixes > 0 and shared.alone < shared.restored // 4
    rng = np.random.default_rng()
    for w in WIDTHS:
        for kind in ("step", "prefill"):
            name = f"contrib.{kind}.onnx"
            mine = _session(tmp_path / "elastic" / (name if w == "1" else f"{w.replace('/', '_')}.{name}"))
            theirs = _session(tmp_path / f"own{w.replace('/', '_')}" / name)
            feeds = _feeds(mine, kind, rng)
            for a, b in zip(mine.run(None, feeds), theirs.run(None, feeds)):
                assert np.abs(a - b).max() <= 1e-5, (w, kind)


def _matmul_graph(weight: np.ndarray) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, weight.shape[0]])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, weight.shape[1]])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y],
                              [numpy_helper.from_array(weight, "w")])  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_columns_become_a_prefix_and_strangers_stay_whole(tmp_path):
    """A [32, 64] MatMul weight whose narrower widths keep columns {even} and {0 mod 4}
    (nested, not leading): the store holds one copy; a narrower tensor of other values is
    stored on its own; every graph computes what it did."""
    rng = np.random.default_rng()
    full = rng.standard_normal((32, 64)).astype(np.float32)
    widest = {"a.onnx": _matmul_graph(full)}
    narrower = {"b.onnx": _matmul_graph(full[:, ::2].copy()), "c.onnx": _matmul_graph(full[:, ::4].copy()),
                "d.onnx": _matmul_graph(rng.standard_normal((32, 16)).astype(np.float32))}  # fmt: skip
    before = {k: copy.deepcopy(v) for k, v in {**widest, **narrower}.items()}
    shared = share_prefixes(widest, narrower, 64)
    assert (shared.restored, shared.alone) == (3, 1) and len(shared.blobs) == 1
    assert sorted(shared.blobs[0][1]) == [16 * 32 * 4, 32 * 32 * 4, 64 * 32 * 4]
    size = write_graphs(tmp_path, {**widest, **narrower}, shared.blobs)
    assert size < full.nbytes + 16 * 32 * 4 + 2 * 64  # the full matrix once, the stranger once (and alignment)
    x = rng.standard_normal((1, 32)).astype(np.float32)
    for name, proto in before.items():
        (tmp_path / f"before.{name}").write_bytes(proto.SerializeToString())
        got = _session(tmp_path / name).run(None, {"x": x})[0]
        np.testing.assert_array_equal(got, _session(tmp_path / f"before.{name}").run(None, {"x": x})[0])
