"""Sizes counted on meta-device models equal those of real extracted modules."""

from __future__ import annotations

import math

import pytest
import torch

from edgeseq.extract import extract
from edgeseq.sizing import kept_per_layer, layer_pattern, nested_sizes, size_of, size_table, state_bytes
from edgeseq.state import ModelState
from edgeseq.width import resolve
from tests.conftest import random_model, small_config


@pytest.mark.parametrize("spec", ["1", "0.5", "0.25", "1,0.5,0.25,0.5,1", "0.25,1,1,0.5,0.25"])
def test_size_matches_real_extracted_model(spec):
    config = small_config()  # every mixer kind, grouped B/C, GQA, a global attention layer
    model = random_model(config, dtype=torch.float32)
    (size,) = size_table(config, [spec])
    sub = extract(model, spec)
    assert size.params == sum(p.numel() for p in sub.parameters())
    assert size.matrix_params == sum(p.numel() for p in sub.parameters() if p.dim() == 2)
    assert size.state_bytes == sub.init_state(1).nbytes()
    assert size.weight_bytes("fp32") == 4 * size.params
    assert size.weight_bytes("int4") == math.ceil(size.matrix_params / 2) + 4 * (size.params - size.matrix_params)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_state_bytes_follow_dtype(dtype):
    config = small_config()
    widths = resolve(config, "0.5")
    assert state_bytes(config, widths, dtype) == ModelState.zeros(config, 1, widths, dtype).nbytes()


def test_stored_row_when_no_nested_width_is_the_model():
    config = small_config().replace(nested_widths=(0.5, 0.25))
    rows = nested_sizes(config)
    assert [r.label for r in rows] == ["0.5", "0.25", "stored"]
    assert rows[-1].params == size_of(config, resolve(config, None), "x").params
    assert [r.label for r in nested_sizes(small_config())] == ["1", "0.5", "0.25"]


def test_layer_pattern_and_kept_per_layer():
    config = small_config()  # "M M+ S+ M A"
    assert layer_pattern(config) == "M M+ S+ M A"
    rows = kept_per_layer(config, resolve(config, "0.5"))
    assert rows[2] == {
        "layer": 2, "mixer": "attention", "heads": 4, "heads_total": 8,
        "kv_heads": 2, "kv_heads_total": 4, "d_mlp": 24, "d_mlp_total": 48,
    }  # fmt: skip
    assert rows[0]["d_mlp_total"] == 0 and "kv_heads" not in rows[0]
