"""The kinds' slicing maps: what a narrower part keeps of a wider part's weights and state."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeseq.kinds import get_kind
from edgeseq.model import slice_params
from tests.conftest import random_model, small_config


@pytest.mark.parametrize("layer, kind, kept", [(0, "mamba2", 8), (0, "mamba2", 4), (2, "attention", 4), (4, "attention", 2)])
def test_state_index_keeps_what_the_narrow_part_computes(layer, kind, kept):
    """A mixer's heads run independently given the same input: the state a narrow part builds
    over a prompt is the wide part's state sliced with the kind's ``state_index``."""
    config = small_config()  # "M M+ S+ M A": 16 mamba2 heads in 2 groups; 8 query / 4 kv heads
    block = random_model(config).layers[layer]
    k = get_kind(kind)
    size = config.part_size(layer, kind)
    module, full = block.part(kind), dict(block.part(kind).named_parameters())
    u = torch.randn(2, 9, config.d_model, dtype=torch.float64)
    position = torch.zeros(2, dtype=torch.int64)

    def run(params, width):
        zero = {n: torch.zeros(2, *s, dtype=torch.float64) for n, s in k.state_shapes(config, layer, width).items()}
        with torch.no_grad():
            return module(params, u, zero, position, width)[1]

    wide = run(full, size)
    narrow = run(slice_params(full, k.weight_index(config, layer, size, kept)), kept)
    index = k.state_index(config, layer, size, kept)
    assert set(index) == set(wide)
    for name, (axis, idx) in index.items():
        sliced = wide[name].index_select(axis + 1, torch.as_tensor(idx))  # + 1: the batch axis
        torch.testing.assert_close(sliced, narrow[name], rtol=0, atol=1e-12)
    assert any(wide[n].shape != narrow[n].shape for n in wide)  # it did narrow


def test_weight_index_of_the_mlp_keeps_the_leading_units():
    config = small_config()
    index = get_kind("mlp").weight_index(config, 1, 48, 12)
    assert {n: (a, list(i)) for n, (a, i) in index.items()} == {
        "gate_proj.weight": (0, list(range(12))), "up_proj.weight": (0, list(range(12))),
        "down_proj.weight": (1, list(range(12))),
    }  # fmt: skip
    heads = get_kind("mamba2").weight_index(config, 0, 16, 8)["A_log"][1]
    np.testing.assert_array_equal(heads, [0, 1, 2, 3, 8, 9, 10, 11])  # each of 2 groups keeps its leading heads
