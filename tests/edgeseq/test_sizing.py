"""The sizing model, counted from the layer kinds' parameter shapes, equals the real
extracted modules; ``inspect`` and ``plan`` share it."""

from __future__ import annotations

import math

import pytest
import torch

from edgeseq.extract import extract
from edgeseq.kinds import get_kind
from edgeseq.model import NestedLM
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
    fp = size.footprint
    assert size.params == sum(p.numel() for p in sub.parameters())
    table = sub.embedding.weight.numel()
    head = table  # the head is stored as a MatMul weight, tied or not
    projections = sum(
        p.numel() for n, p in sub.named_parameters() if p.dim() == 2 and n not in ("embedding.weight", "lm_head.weight")
    )
    assert (fp.matrix, fp.embedding) == (projections + head, table)
    assert fp.other == size.params - projections - table - (0 if config.tie_embeddings else head)
    assert size.state_bytes == sub.init_state(1).nbytes()
    assert size.weight_bytes("fp32") == 4 * (fp.matrix + fp.embedding + fp.other)
    assert (
        size.weight_bytes("int4")
        == math.ceil(fp.matrix / 2)
        + 4 * math.ceil(fp.matrix / 32)
        + math.ceil(table / 2)
        + 4 * math.ceil(table / 32)
        + 4 * fp.other
    )


@pytest.mark.parametrize("spec", ["1", "0.25,1,1,0.5,0.25"])
def test_layer_matrices_are_the_projections_a_prefill_runs(spec):
    """Per layer, (in, out) of every projection the extracted model's layer holds: what
    plan's prefill working memory counts (the head, run on the last token only, excluded)."""
    config = small_config()
    sub = extract(random_model(config, dtype=torch.float32), spec)
    fp = size_table(config, [spec])[0].footprint
    assert len(fp.layer_matrices) == len(sub.layers)
    for layer, block in zip(fp.layer_matrices, sub.layers):
        linear = sorted((p.shape[1], p.shape[0]) for n, p in block.named_parameters() if p.dim() == 2)
        assert sorted(layer) == linear
    assert fp.layer_columns == max(sum(out for _, out in layer) for layer in fp.layer_matrices)


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


def test_kind_param_shapes_are_the_modules():
    """What sizing counts per part is what the torch module holds, at every stored size."""
    config = small_config("M M+ S+ A|M+", ngroups=2)
    for sub in (NestedLM(config), extract(random_model(config), "1,0.5,0.25,0.5")):
        for i, (block, spec) in enumerate(zip(sub.layers, sub.config.layers)):
            for part in spec.parts:
                module = {n: tuple(p.shape) for n, p in block.part(part).named_parameters()}
                assert get_kind(part).param_shapes(sub.config, i, sub.config.part_size(i, part)) == module


def test_inspect_and_plan_count_alike():
    from edgeseq.targets import get_target
    from edgeseq.targets.plan import plan

    config = small_config()
    rows = plan(config, get_target("x86"), widths=["0.5"])
    (size,) = size_table(config, ["0.5"])
    assert {r.precision: r.weight_bytes for r in rows} == {r.precision: size.weight_bytes(r.precision) for r in rows}


def test_layer_pattern_and_kept_per_layer():
    config = small_config()  # "M M+ S+ M A"
    assert layer_pattern(config) == "M M+ S+ M A"
    rows = kept_per_layer(config, resolve(config, "0.5"))
    assert rows[2] == {
        "layer": 2, "mixers": ["attention"], "mlp": "mlp",
        "parts": {"attention": {"heads": 4, "heads_total": 8, "kv_heads": 2, "kv_heads_total": 4},
                  "mlp": {"d_mlp": 24, "d_mlp_total": 48}},
    }  # fmt: skip
    assert rows[0]["parts"] == {"mamba2": {"heads": 8, "heads_total": 16}}
