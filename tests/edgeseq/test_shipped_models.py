"""The trained models that ship in the package, checked against their own metadata."""

from __future__ import annotations

import json

import pytest
import torch

from edgeseq.data import SAMPLE_DIR, load_sample
from edgeseq.evaluate import bits_per_byte
from edgeseq.zoo import BUILTIN, builtin_dir, load_model

SHIPPED = [name for name in BUILTIN if (builtin_dir(name) / "model.safetensors").is_file()]


def test_both_models_and_the_sample_ship():
    assert sorted(SHIPPED) == sorted(BUILTIN)
    info = json.loads((SAMPLE_DIR / "heldout.json").read_text())
    assert load_sample().size == info["tokens"]
    assert (SAMPLE_DIR / "heldout.u16").stat().st_size <= 2 * 1_000_000 + 4  # <= 1 MB of text as uint16


@pytest.mark.parametrize("name", SHIPPED)
def test_eval_on_a_slice_matches_metadata(name):
    model, meta = load_model(name)
    assert meta["trained"] is True and meta["steps"] > 0
    assert meta["sample"]["sha256"] == json.loads((SAMPLE_DIR / "heldout.json").read_text())["sha256"]
    tokens = load_sample()[: meta["slice_tokens"] + 1]
    for width, recorded in meta["eval"].items():
        measured = bits_per_byte(model, tokens, float(width), segments=4)
        assert abs(measured - recorded["slice_bpb"]) <= 0.01, (width, measured, recorded)


@pytest.mark.parametrize("name", SHIPPED)
def test_recorded_quality_claims(name):
    """Wider is never worse, and the narrowest width beats the order-2 byte n-gram."""
    _, meta = load_model(name)
    by_width = sorted((float(w), r["heldout_bpb"]) for w, r in meta["eval"].items())
    bpbs = [b for _, b in by_width]
    assert all(a >= b for a, b in zip(bpbs, bpbs[1:])), by_width
    assert bpbs[0] < meta["ngram_order2_bpb"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_weights_are_fp16_and_load_as_fp32(name):
    from safetensors import safe_open

    with safe_open(builtin_dir(name) / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    model, _ = load_model(name, dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in model.parameters())
