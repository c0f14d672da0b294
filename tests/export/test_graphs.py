"""Exported step and prefill graphs against the reference model, in onnxruntime (CPU)."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch

from edgeseq.export.graphs import build_graph
from edgeseq.export.spec import graph_io, token_feeds
from edgeseq.export.trt_plugins import PLUGINS
from edgeseq.kinds.mamba2 import Mamba2Params
from edgeseq.runtimes import plugin_ops
from edgeseq.state import ModelState
from tests.conftest import random_model, small_config

ort = pytest.importorskip("onnxruntime")

CONFIGS = {
    "hybrid-g2": lambda: small_config(),  # mamba2 (2 groups) + windowed and global GQA attention + MLPs
    "mamba-g1": lambda: small_config("M M+", ngroups=1, tie_embeddings=True),
    "parallel": lambda: small_config("A|M+ M S|M+"),  # Falcon-H1-style blocks: attention and Mamba2 side by side
    # Falcon-H1's default Mamba2 output: the gate alone, no grouped RMSNorm
    "mamba-no-norm": lambda: small_config(
        "A|M+ M", mamba=Mamba2Params(d_state=8, headdim=4, ngroups=2, chunk_size=4, rmsnorm=False)
    ),
    # Granite-style: a tied table whose looked-up rows are scaled (the head reads it unscaled)
    "scaled-embedding": lambda: small_config(
        "M+ A+", tie_embeddings=True, embedding_scale=float(np.random.uniform(2, 12))
    ),
}


def session(model_proto: onnx.ModelProto, flavor: str = "portable", plugins: str = "reference"):
    """An onnxruntime session; the tensorrt flavor's plugin nodes run the kernels' CPU twins
    (or, with plugins="kernels", the plugins' PTX on the GPU)."""
    options = ort.SessionOptions()
    if flavor == "tensorrt":
        plugin_ops.configure(options, plugins)
    return ort.InferenceSession(model_proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def feeds_from(state: ModelState, ids: np.ndarray, io) -> dict[str, np.ndarray]:
    named = state.to_named()
    feeds = token_feeds(io, ids)
    for spec in io.inputs:
        if spec.name not in feeds:
            feeds[spec.name] = named[spec.name.removeprefix("past.")].detach().numpy()
    return feeds


def check(sess, io, model, state, ids, kind, atol=1e-4):
    outs = dict(zip([o.name for o in io.outputs], sess.run(None, feeds_from(state, ids, io))))
    plugin_ops.raise_pending()
    with torch.no_grad():
        if kind == "step":
            ref, ref_state = model.step(torch.from_numpy(ids[:, 0]), state)
        else:
            ref, ref_state = model(torch.from_numpy(ids), state, last_only=True)
    np.testing.assert_allclose(outs["logits"], ref.numpy(), rtol=0, atol=atol)
    ref_named = ref_state.to_named()
    for spec in io.outputs[1:]:
        np.testing.assert_allclose(outs[spec.name], ref_named[spec.name[len("present.") :]].numpy(), rtol=0, atol=atol)
    return outs


@pytest.mark.parametrize(
    "flavor, plugins",
    [
        ("portable", None),
        ("opset27", None),
        ("contrib", None),
        ("tensorrt", "reference"),
        pytest.param("tensorrt", "kernels", marks=[pytest.mark.gpu, pytest.mark.skipif(
            not torch.cuda.is_available(), reason="the plugins' PTX needs a CUDA device")]),
    ],
)  # fmt: skip
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_graphs_match_reference_with_a_past(name, flavor, plugins):
    model = random_model(CONFIGS[name](), dtype=torch.float32)
    batch, warm = int(np.random.randint(1, 4)), int(np.random.randint(1, 12))
    with torch.no_grad():
        _, state = model(torch.randint(0, model.config.vocab_size, (batch, warm)))  # a real, nonzero past
    step_io, prefill_io = graph_io(model.config, "step"), graph_io(model.config, "prefill")
    step, prefill = (session(build_graph(model, kind, flavor), flavor, plugins) for kind in ("step", "prefill"))
    # prefill lengths below, at, and across the chunk (4) and the window (6), same session: T is dynamic
    for t in (1, 3, 4, 7, 13):
        ids = np.random.randint(0, model.config.vocab_size, (batch, t)).astype(np.int64)
        check(prefill, prefill_io, model, state, ids, "prefill")
    # steps with the graph's own state fed back
    named = state.to_named()
    for _ in range(10):
        ids = np.random.randint(0, model.config.vocab_size, (batch, 1)).astype(np.int64)
        outs = check(step, step_io, model, ModelState.from_named(model.config, named), ids, "step")
        named = {k[len("present.") :]: torch.from_numpy(v) for k, v in outs.items() if k.startswith("present.")}
        if "position" not in named:
            named["position"] = torch.zeros(batch, dtype=torch.int64)


def test_all_logits_prefill():
    model = random_model(CONFIGS["hybrid-g2"](), dtype=torch.float32)
    io = graph_io(model.config, "prefill", all_logits=True)
    sess = session(build_graph(model, "prefill", "portable", all_logits=True))
    ids = np.random.randint(0, model.config.vocab_size, (2, 9)).astype(np.int64)
    state = model.init_state(2)
    logits = sess.run(["logits"], feeds_from(state, ids, io))[0]
    with torch.no_grad():
        ref, _ = model(torch.from_numpy(ids), state)
    np.testing.assert_allclose(logits, ref.numpy(), rtol=0, atol=1e-4)


@pytest.mark.parametrize("flavor", ["portable", "opset27", "contrib", "tensorrt"])
def test_export_is_deterministic_and_flavor_ops_are_as_declared(flavor):
    model = random_model(CONFIGS["mamba-g1"](), dtype=torch.float32)
    a, b = (build_graph(model, "prefill", flavor).SerializeToString() for _ in range(2))
    assert a == b
    proto = onnx.load_from_string(a)
    ops = {n.op_type for n in proto.graph.node}
    opset = {o.domain: o.version for o in proto.opset_import}[""]
    if flavor == "portable":
        assert opset <= 18 and not ops & {"LinearAttention", "CausalConvWithState", "Einsum", "Loop", "Scan"}
    elif flavor == "opset27":
        assert opset == 27 and {"LinearAttention", "CausalConvWithState"} <= ops
    elif flavor == "contrib":  # onnxruntime's twins, C and B not expanded to the heads
        step = build_graph(model, "step", flavor)
        fused = [n for n in (*proto.graph.node, *step.graph.node) if n.domain == "com.microsoft"]
        assert opset == 21 and {n.op_type for n in fused} == {"LinearAttention", "CausalConvWithState"}
        assert "Conv" in ops and "CausalConvWithState" not in ops  # a prompt's conv: the faster plain Conv
        heads = [{a.name: a.i for a in n.attribute} for n in fused if n.op_type == "LinearAttention"]
        assert heads and all(h["q_num_heads"] == model.config.mamba.ngroups < h["kv_num_heads"] for h in heads)
    else:  # two plugin nodes per Mamba2 layer in prefill (one in the step), attributes as TensorRT's parser reads them
        step = build_graph(model, "step", flavor)
        for graph, names in ((proto, ("EdgeseqSSDChunkState", "EdgeseqSSDChunkScan")), (step, ("EdgeseqSSDStep",))):
            plugins = [n for n in graph.graph.node if n.domain == "edgeseq.trt"]
            assert sorted(n.op_type for n in plugins) == sorted(names * 2)
            for node in plugins:
                attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
                assert attrs.pop("plugin_namespace") == b"edgeseq" and attrs.pop("plugin_version") == b"1"
                assert set(attrs) == set(PLUGINS[node.op_type].attrs)
                assert len(node.input) == len(PLUGINS[node.op_type].inputs)
                assert len(node.output) == len(PLUGINS[node.op_type].outputs)
        assert "Conv" in ops and not {"Conv", "Softplus"} & {n.op_type for n in step.graph.node}
    onnx.checker.check_model(proto)


def test_blocked_weight_products_match_and_are_more_accurate():
    """split_k: every weight product summed over K in blocks; same results to rounding,
    no plain MatMul with a weight matrix longer than a block, and closer to fp64."""
    config = small_config("M M+ S+ M A", d_model=128, vocab_size=264)  # K = 128: four blocks of 32
    model = random_model(config, dtype=torch.float32)
    plain, blocked = (build_graph(model, "step", "portable", split_k=s) for s in (None, 32))
    inits = {t.name: t for t in blocked.graph.initializer}
    long_weights = [n for n in blocked.graph.node if n.op_type == "MatMul" and n.input[1] in inits
                    and len(inits[n.input[1]].dims) == 2 and inits[n.input[1]].dims[0] > 32]
    assert not long_weights
    assert any(n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]].dims) == 3
               for n in blocked.graph.node)
    io = graph_io(config, "step")
    with torch.no_grad():
        _, state = model(torch.randint(0, 264, (2, 5)))
    ids = np.random.randint(0, 264, (2, 1)).astype(np.int64)
    feeds = feeds_from(state, ids, io)
    a, b = (dict(zip([o.name for o in io.outputs], session(p).run(None, feeds))) for p in (plain, blocked))
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=0, atol=1e-4)
    m64 = copy.deepcopy(model).double()
    with torch.no_grad():
        exact, _ = m64.step(torch.from_numpy(ids[:, 0]), ModelState.from_named(config, {
            k: (v.double() if v.is_floating_point() else v) for k, v in state.to_named().items()}))
    err = {k: float(np.abs(v["logits"] - exact.numpy()).max()) for k, v in (("plain", a), ("blocked", b))}
    assert err["blocked"] <= err["plain"] * 1.5, err  # never meaningfully worse; usually better
