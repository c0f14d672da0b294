"""The squared-ReLU MLP kind (``mlp_relu2``, Nemotron-H's MLP): its math, config, nesting,
sizing, and its ONNX graph piece against the torch model in onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgeseq.config import LayerSpec, ModelConfig
from edgeseq.errors import ConfigError
from edgeseq.export.spec import token_feeds
from edgeseq.extract import extract
from edgeseq.kinds import get_kind
from edgeseq.kinds.attention import AttentionParams
from edgeseq.kinds.mamba2 import Mamba2Params
from edgeseq.state import ModelState
from tests.conftest import random_model

KIND = "mlp_relu2"


def relu2_config() -> ModelConfig:
    """Nemotron-H-like: Mamba2, an MLP-only layer, attention without RoPE, and one block
    with a mixer and a relu2 MLP after it. Nested at 1 and 1/2."""
    layers = (
        LayerSpec.of("mamba2"),
        LayerSpec.of(mlp=KIND),
        LayerSpec.of("attention"),
        LayerSpec.of("mamba2", mlp=KIND),
        LayerSpec.of(mlp=KIND),
    )
    return ModelConfig(
        d_model=32, n_layer=len(layers), vocab_size=61, layers=layers, d_mlp_relu2=48, tie_embeddings=False,
        mamba=Mamba2Params(d_state=8, headdim=8, ngroups=2, chunk_size=4),
        attention=AttentionParams(n_heads=4, n_kv_heads=2, head_dim=8, rope_fraction=0.0, max_context=64),
        nested_widths=(1.0, 0.5),
    )  # fmt: skip


def test_block_computes_down_relu_up_squared():
    """An MLP-only layer is h + down(relu(up(rmsnorm(h)))²), written out here by hand."""
    model = random_model(relu2_config(), dtype=torch.float64)
    block = model.layers[1]
    h = torch.randn(3, 7, 32, dtype=torch.float64)
    up, down, w = block.mlp.up_proj.weight, block.mlp.down_proj.weight, block.mlp_norm.weight
    x = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + model.config.norm_eps) * w
    want = h + torch.clamp(x @ up.T, min=0) ** 2 @ down.T
    with torch.no_grad():
        got, state = block(h, {}, torch.zeros(3, dtype=torch.int64), model.widths(None)[1], step=False)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert state == {} and not hasattr(block, "norm")
    assert not torch.allclose(got, h + F.silu(x @ up.T) @ down.T, atol=1e-3)  # the activation matters


def test_config_round_trip_and_checks():
    config = relu2_config()
    assert ModelConfig.from_json(config.to_json()) == config
    assert config.to_dict()["d_mlp_relu2"] == 48
    with pytest.raises(ConfigError, match="d_mlp_relu2"):
        config.replace(d_mlp_relu2=0)
    with pytest.raises(ConfigError, match="d_mlp_relu2"):
        config.replace(d_mlp_relu2=-3)


def test_sizing_matches_the_module():
    config = relu2_config()
    kind = get_kind(KIND)
    module = kind.module(config, 1, 40)
    assert {n: tuple(p.shape) for n, p in module.named_parameters()} == kind.param_shapes(config, 1, 40)
    assert kind.matrices(config, 1) == {"up_proj.weight", "down_proj.weight"}


def test_extraction_keeps_the_leading_hidden_units():
    model = random_model(relu2_config(), dtype=torch.float64)
    sub = extract(model, 0.5)
    assert sub.config.part_size(1, KIND) == 24 and sub.layers[1].mlp.up_proj.weight.shape == (24, 32)
    assert sub.layers[1].mlp.down_proj.weight.shape == (32, 24)
    ids = torch.randint(0, 61, (2, 11))
    with torch.no_grad():
        want, _ = model(ids, width=0.5)
        torch.testing.assert_close(sub(ids)[0], want, rtol=0, atol=1e-10)
        assert not torch.allclose(model(ids)[0], want, atol=1e-3)  # the width matters


@pytest.mark.parametrize("flavor", ["portable", "opset27"])
def test_graphs_match_the_model(flavor):
    """Prefill over a nonzero past, then decode steps fed the graph's own state."""
    ort = pytest.importorskip("onnxruntime")
    from edgeseq.export.graphs import build_graph
    from edgeseq.export.spec import graph_io

    model = random_model(relu2_config(), dtype=torch.float32)
    batch, warm = int(np.random.randint(1, 4)), int(np.random.randint(1, 9))
    with torch.no_grad():
        _, state = model(torch.randint(0, 61, (batch, warm)))

    sessions = {
        kind: (graph_io(model.config, kind), ort.InferenceSession(
            build_graph(model, kind, flavor).SerializeToString(), providers=["CPUExecutionProvider"]))
        for kind in ("prefill", "step")
    }  # fmt: skip

    def run(kind, ids, state):
        io, sess = sessions[kind]
        named = state.to_named()
        feeds = token_feeds(io, ids)
        feeds |= {s.name: named[s.name.removeprefix("past.")].numpy() for s in io.inputs if s.name not in feeds}
        return dict(zip([o.name for o in io.outputs], sess.run(None, feeds)))

    ids = np.random.randint(0, 61, (batch, 9)).astype(np.int64)
    outs = run("prefill", ids, state)
    with torch.no_grad():
        want, state = model(torch.from_numpy(ids), state, last_only=True)
    np.testing.assert_allclose(outs["logits"], want.numpy(), rtol=0, atol=1e-4)
    for _ in range(4):
        ids = np.random.randint(0, 61, (batch, 1)).astype(np.int64)
        outs = run("step", ids, state)
        with torch.no_grad():
            want, state = model.step(torch.from_numpy(ids[:, 0]), state)
        np.testing.assert_allclose(outs["logits"], want.numpy(), rtol=0, atol=1e-4)
        got = {k.removeprefix("present."): torch.from_numpy(v) for k, v in outs.items() if k != "logits"}
        state = ModelState.from_named(model.config, state.to_named() | got)
