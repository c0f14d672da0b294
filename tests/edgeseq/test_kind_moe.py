"""The mixture-of-experts MLP kind (``moe``, Granite 4.0-H's MLP): its math, config,
nesting, sizing, its ONNX graph piece against the torch model in onnxruntime, and its
3-D expert tables through every precision."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from edgeseq.config import LayerSpec, ModelConfig
from edgeseq.errors import ConfigError
from edgeseq.export.spec import token_feeds
from edgeseq.extract import extract
from edgeseq.kinds import get_kind
from edgeseq.kinds.attention import AttentionParams
from edgeseq.kinds.mamba2 import Mamba2Params
from edgeseq.kinds.moe import MoEParams
from edgeseq.reference import moe_ref
from edgeseq.sizing import footprint
from edgeseq.state import ModelState
from edgeseq.targets.ops import TENSORRT, unsupported_ops
from edgeseq.width import full
from tests.conftest import random_model

KIND = "moe"
VOCAB = 61


def moe_config(**overrides) -> ModelConfig:
    """Granite-like: Mamba2 and attention blocks with a MoE MLP, and an MLP-only MoE layer."""
    layers = (LayerSpec.of("mamba2", mlp=KIND), LayerSpec.of("attention", mlp=KIND), LayerSpec.of(mlp=KIND))
    kwargs = {
        "moe": MoEParams(n_experts=6, top_k=2, d_expert=16, d_shared=24),
        "mamba": Mamba2Params(d_state=8, headdim=8, ngroups=2, chunk_size=4),
        "attention": AttentionParams(n_heads=4, n_kv_heads=2, head_dim=8, rope_fraction=1.0, max_context=64),
        "nested_widths": (1.0, 0.5),
        "embedding_scale": 2.0,
        "tie_embeddings": False,
    }
    return ModelConfig(32, len(layers), VOCAB, layers, **(kwargs | overrides))


def dense_moe(x, router, gate, up, down, k):
    """Every expert on every token, weighted by a softmax over the top-k logits (zero elsewhere)."""
    logits = x @ router.T  # (n, e)
    top = logits.topk(k, dim=-1)
    weights = torch.zeros_like(logits).scatter(-1, top.indices, torch.softmax(top.values, dim=-1))
    experts = torch.stack([F.linear(F.silu(F.linear(x, g)) * F.linear(x, u), d) for g, u, d in zip(gate, up, down)])
    return torch.einsum("ne,end->nd", weights, experts)


@pytest.mark.parametrize("k", [1, 2, 5])
def test_reference_is_a_softmax_over_the_chosen_experts(k):
    e, d, f = 5, 12, 7
    x = torch.randn(3, 4, d, dtype=torch.float64)
    router = torch.randn(e, d, dtype=torch.float64)
    gate, up = torch.randn(e, f, d, dtype=torch.float64), torch.randn(e, f, d, dtype=torch.float64)
    down = torch.randn(e, d, f, dtype=torch.float64)
    got = moe_ref(x, router, gate, up, down, k)
    want = dense_moe(x.reshape(-1, d), router, gate, up, down, k).reshape(x.shape)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    if k < e:  # a softmax over all experts is a different function
        all_weights = torch.softmax(x.reshape(-1, d) @ router.T, dim=-1)
        assert not torch.allclose(got.reshape(-1, d), dense_moe(x.reshape(-1, d), router, gate, up, down, k) *
                                  all_weights.topk(k, dim=-1).values.sum(-1, keepdim=True), atol=1e-6)  # fmt: skip


def test_config_round_trip_and_checks():
    config = moe_config()
    assert ModelConfig.from_json(config.to_json()) == config
    assert config.to_dict()["moe"] == {"n_experts": 6, "top_k": 2, "d_expert": 16, "d_shared": 24}
    with pytest.raises(ConfigError, match="top_k"):
        config.replace(moe=MoEParams(n_experts=2, top_k=3))
    with pytest.raises(ConfigError, match="n_experts"):
        config.replace(moe=MoEParams(n_experts=0))
    with pytest.raises(ConfigError, match="config.moe section"):
        ModelConfig(d_model=8, n_layer=1, vocab_size=9, layers=(LayerSpec.of(mlp=KIND),))


def test_sizing_matches_the_module():
    config = moe_config()
    kind = get_kind(KIND)
    module = kind.module(config, 2, 24)
    shapes = {n: tuple(p.shape) for n, p in module.named_parameters()}
    assert shapes == kind.param_shapes(config, 2, 24)
    assert shapes["experts.gate_proj"] == (6, 16, 32) and shapes["experts.down_proj"] == (6, 32, 16)
    assert "router.weight" not in kind.matrices(config, 2) and "experts.up_proj" in kind.matrices(config, 2)
    model = random_model(config, dtype=torch.float32)
    fp = footprint(config, full(config))
    assert fp.params == model.num_parameters()
    experts = 3 * 3 * 6 * 16 * 32  # three 3-D tables a layer, three layers: counted as matrices
    assert fp.matrix >= experts + 3 * 3 * 24 * 32


def test_extraction_keeps_the_leading_shared_units_and_every_expert():
    model = random_model(moe_config(), dtype=torch.float64)
    sub = extract(model, 0.5)
    mlp = sub.layers[2].mlp
    assert sub.config.part_size(2, KIND) == 12 and mlp.gate_proj.weight.shape == (12, 32)
    assert torch.equal(mlp.experts.down_proj, model.layers[2].mlp.experts.down_proj)
    ids = torch.randint(0, VOCAB, (2, 11))
    with torch.no_grad():
        want, _ = model(ids, width=0.5)
        torch.testing.assert_close(sub(ids)[0], want, rtol=0, atol=1e-10)
        assert not torch.allclose(model(ids)[0], want, atol=1e-3)  # the width matters


def sessions_for(model, flavor="portable", precision="fp32"):
    ort = pytest.importorskip("onnxruntime")
    from edgeseq.export.graphs import build_graph
    from edgeseq.export.quantize import QuantOptions, quantize_graph
    from edgeseq.export.spec import graph_io

    out = {}
    for kind in ("prefill", "step"):
        proto = build_graph(model, kind, flavor)
        if precision != "fp32":
            proto = quantize_graph(proto, QuantOptions(**precision))
        sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        out[kind] = (graph_io(model.config, kind), sess, proto)
    return out


def run(sessions, kind, ids, state):
    io, sess, _ = sessions[kind]
    named = state.to_named()
    feeds = token_feeds(io, ids)
    feeds |= {s.name: named[s.name.removeprefix("past.")].numpy() for s in io.inputs if s.name not in feeds}
    return dict(zip([o.name for o in io.outputs], sess.run(None, feeds)))


def stream(model, sessions, batch, steps=4):
    """Prefill over a nonzero past, then decode steps fed the graph's own state: the max abs
    logit error against the torch model, and the relative L2 error of the logits."""
    with torch.no_grad():
        _, state = model(torch.randint(0, VOCAB, (batch, int(np.random.randint(1, 9)))))
    errors, rel = [], []
    ids = np.random.randint(0, VOCAB, (batch, 9)).astype(np.int64)
    outs = run(sessions, "prefill", ids, state)
    with torch.no_grad():
        want, state = model(torch.from_numpy(ids), state, last_only=True)
    for i in range(steps + 1):
        if i:
            ids = np.random.randint(0, VOCAB, (batch, 1)).astype(np.int64)
            outs = run(sessions, "step", ids, state)
            with torch.no_grad():
                want, state = model.step(torch.from_numpy(ids[:, 0]), state)
            got = {k.removeprefix("present."): torch.from_numpy(v) for k, v in outs.items() if k != "logits"}
            state = ModelState.from_named(model.config, state.to_named() | got)
        errors.append(float(np.abs(outs["logits"] - want.numpy()).max()))
        rel.append(float(np.linalg.norm(outs["logits"] - want.numpy()) / np.linalg.norm(want.numpy())))
    return max(errors), max(rel)


def trained_scale(model):
    """Matrices at a trained model's scale, std 1/sqrt(fan_in), not 0.3."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and name != "embedding.weight":
                p.mul_(1 / (0.3 * p.shape[-1] ** 0.5))
    return model


@pytest.mark.parametrize("flavor", ["portable", "opset27"])
def test_graphs_match_the_model(flavor):
    model = random_model(moe_config(), dtype=torch.float32)
    error, _ = stream(model, sessions_for(model, flavor), batch=int(np.random.randint(1, 4)))
    print(f"{flavor}: max abs logit error {error:.2e}")
    assert error <= 1e-4


@pytest.mark.parametrize(
    "options, rel_limit",
    [
        ({"precision": "fp16"}, 0.02),
        ({"precision": "int8", "int8_preset": "avx2"}, 0.2),
        ({"precision": "int8", "int8_preset": "qdq-weight-only"}, 0.2),
        ({"precision": "int4"}, 0.6),
        ({"precision": "int4", "int4_form": "QDQ"}, 0.6),
    ],
    ids=["fp16", "int8", "int8-qdq", "int4", "int4-qdq"],
)
def test_quantized_moe_graphs_run_and_stay_close(options, rel_limit):
    """No expert table is left fp32 (in the step graph's 3-D form nor the prefill graph's
    2-D one), the router stays fp32, and the logits stay near the torch model's."""
    model = trained_scale(random_model(moe_config(), dtype=torch.float32))
    sessions = sessions_for(model, precision=options)
    for kind in ("prefill", "step"):
        proto = sessions[kind][2]
        inits = {t.name: t for t in proto.graph.initializer}
        experts = [t for name, t in inits.items() if "experts." in name]
        assert experts
        assert not [
            t.name
            for t in experts
            if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) >= 2 and np.prod(t.dims) > 16 * 16
        ], kind  # fmt: skip  (scales are small)
        routers = [t for name, t in inits.items() if name.startswith("layers.") and "router" in name]
        assert len(routers) == 3 and all(t.data_type == onnx.TensorProto.FLOAT for t in routers)
    step = sessions["step"][2]
    tables = {t.name: t for t in step.graph.initializer if "experts." in t.name}
    want = {"int8": [onnx.TensorProto.INT8], "int4": [onnx.TensorProto.INT4, onnx.TensorProto.INT8]}
    for dtype in want.get(options["precision"], []):  # int4: gate/up in blocks, down (in = 16 < block) int8
        assert [n for n, t in tables.items() if t.data_type == dtype], dtype
    if options.get("int4_form") == "QDQ" or options.get("int8_preset") == "qdq-weight-only":
        assert unsupported_ops(step, TENSORRT) == []  # what TensorRT's parser takes
    elif options["precision"] == "int4":
        assert "GatherBlockQuantized" in {n.op_type for n in step.graph.node}  # reads only the chosen experts
    _, rel = stream(model, sessions, batch=2)
    print(f"{options}: max relative L2 logit error {rel:.2e}")
    assert rel <= rel_limit


def test_int8_expert_rows_dequantize_to_the_weights():
    from edgeseq.export.quantize_experts import _int8_rows

    w = np.random.randn(3, 5, 16).astype(np.float32)
    q, scale = _int8_rows(w)
    assert q.dtype == np.int8 and scale.shape == (3, 5, 1) and np.abs(q).max() == 127
    assert np.all(np.abs(q * scale - w) <= scale / 2 + 1e-7)
    assert numpy_helper.from_array(q).data_type == onnx.TensorProto.INT8
