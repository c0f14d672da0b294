"""A layer kind added from outside the package: this module is the whole kind (config
section, nesting, torch module, graph piece, sizing) plus its ``register`` call, and it
runs through extract -> export (portable) -> validate with nothing else changed.

The kind: a squared-ReLU MLP, down(relu(up(x))^2) (the MLP of Nemotron-H), nested by its
hidden units.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgeseq.config import LayerSpec, ModelConfig
from edgeseq.errors import ConfigError
from edgeseq.extract import extract
from edgeseq.kinds import LayerKind, positive, register, unregister
from edgeseq.kinds.mamba2 import Mamba2Params
from tests.conftest import random_model


class Relu2Module(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.up = nn.Linear(d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, p, x, state, position, kept, mask=None):
        return F.linear(F.relu(F.linear(x, p["up.weight"])).square(), p["down.weight"]), state

    step = forward


class Relu2MLP(LayerKind):
    name = "relu2_mlp"
    role = "mlp"
    section = "d_relu2"  # its hidden size at full width, a top-level config.json key
    size_key = "d_relu2"

    def parse_section(self, value: Any) -> int:
        return 0 if value is None else value

    def check_section(self, value: int) -> None:
        positive("config.d_relu2", value)

    def full_size(self, config, i: int) -> int:
        return config.d_relu2

    def weight_index(self, config, i, size, kept):
        rows = np.arange(kept)
        return {"up.weight": (0, rows), "down.weight": (1, rows)}

    def module(self, config, i, size):
        return Relu2Module(config.d_model, size)

    def graph(self, g, flavor, config, i, size, weights, prefix, x, past, position, mask, rank):
        """down(relu(up(x))^2): MatMul, Relu, Mul, MatMul."""
        hidden = g.op("Relu", g.linear(x, g.matrix(weights, prefix, "up")))
        return g.linear(g.op("Mul", hidden, hidden), g.matrix(weights, prefix, "down")), {}

    def param_shapes(self, config, i, size):
        return {"up.weight": (size, config.d_model), "down.weight": (config.d_model, size)}

    def matrices(self, config, i):
        return frozenset({"up.weight", "down.weight"})


@pytest.fixture
def relu2():
    kind = register(Relu2MLP)
    yield kind
    unregister(kind.name)


def relu2_config() -> ModelConfig:
    layers = (LayerSpec.of("mamba2", mlp="relu2_mlp"), LayerSpec.of("mamba2"), LayerSpec.of("mamba2", mlp="relu2_mlp"))
    return ModelConfig(d_model=32, n_layer=3, vocab_size=264, layers=layers, d_relu2=48, tie_embeddings=True,
                       mamba=Mamba2Params(d_state=8, headdim=8, ngroups=1, chunk_size=8),
                       nested_widths=(1.0, 0.5))  # fmt: skip


def test_config_and_extraction(relu2):
    config = relu2_config()
    assert ModelConfig.from_json(config.to_json()) == config
    with pytest.raises(ConfigError, match="d_relu2"):
        config.replace(d_relu2=0)
    model = random_model(config, dtype=torch.float64)
    sub = extract(model, 0.5)
    assert sub.config.part_size(0, "relu2_mlp") == 24 and sub.layers[0].mlp.up.weight.shape == (24, 32)
    ids = torch.randint(0, 264, (2, 19))
    want, _ = model(ids, width=0.5)
    torch.testing.assert_close(sub(ids)[0], want, rtol=0, atol=1e-10)
    assert not torch.allclose(model(ids)[0], want, atol=1e-3)  # the width matters


def test_extract_export_validate(relu2, tmp_path):
    from edgeseq.deploy.pipeline import ExportRequest, export_bundle
    from edgeseq.deploy.validation import run_validation
    from edgeseq.families import save_checkpoint
    from edgeseq.width import WidthSpec

    model = random_model(relu2_config(), dtype=torch.float32)
    with torch.no_grad():  # a calm model: logits of order 1, as a trained one has
        for name, p in model.named_parameters():
            if name.endswith(("proj.weight", "up.weight", "down.weight")):
                p.mul_(0.5)
    save_checkpoint(model, tmp_path / "ckpt", "native")
    req = ExportRequest(model=str(tmp_path / "ckpt"), target="x86", width=WidthSpec.parse("0.5"), output=tmp_path / "b",
                        flavor="portable", precision="fp32", steps=32, long_steps=256, prompts=2,
                        heldout=(2, 64), reference_device="cpu")  # fmt: skip
    manifest = export_bundle(req)
    assert manifest["validation"]["ran"]["portable"]["passed"]
    assert [layer["mixers"] for layer in manifest["config"]["layers"]] == [["mamba2"]] * 3
    assert manifest["config"]["layers"][0]["sizes"] == {"mamba2": 4, "relu2_mlp": 24}
    outcome = run_validation(tmp_path / "b", None, 32, 256, "cpu", None, None, None, None, heldout=(2, 64))
    assert outcome["passed"] and outcome["flavors"]["portable"]["passed"]
