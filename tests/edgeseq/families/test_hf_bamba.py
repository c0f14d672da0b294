"""HF Bamba checkpoints: logits match transformers' own model, prefill and cached decode."""

from __future__ import annotations

import json

import pytest

from edgeseq.errors import CheckpointError
from edgeseq.families import load_checkpoint
from edgeseq.families.hf_bamba import MAX_CONTEXT
from tests.conftest import hf_parity, randomize_

transformers = pytest.importorskip("transformers")

TOL = 1e-4  # max abs logit difference, fp32


def cache(out, position) -> dict:
    """How this family's transformers model takes its cache (and positions) back."""
    return {"past_key_values": out.past_key_values, "position_ids": position}


def bamba_kwargs(**overrides) -> dict:
    kwargs = {
        "hidden_size": 32,
        "num_hidden_layers": 4,
        "vocab_size": 53,
        "intermediate_size": 40,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "attn_layer_indices": [1],
        "mamba_n_heads": 8,
        "mamba_d_head": 8,
        "mamba_n_groups": 1,
        "mamba_d_state": 8,
        "mamba_chunk_size": 8,
        "max_position_embeddings": 512,
    }
    kwargs.update(overrides)
    return kwargs


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {
            "attn_layer_indices": [0, 2],
            "mamba_n_groups": 2,
            "attention_bias": True,
            "mamba_proj_bias": True,
            "tie_word_embeddings": True,
            "rope_parameters": {"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.5},
        },
    ],
    ids=["1attn-g1", "2attn-g2-bias-tied"],
)
def test_read_matches_transformers(tmp_path, overrides):
    hf = transformers.BambaForCausalLM(transformers.BambaConfig(**bamba_kwargs(**overrides))).eval()
    seed = randomize_(hf)
    hf.save_pretrained(tmp_path)
    ours, metadata = load_checkpoint(tmp_path)
    assert metadata["format"] == "hf_bamba"
    c = ours.config
    assert [s.mixers for s in c.layers].count(("attention",)) == len(hf.config.attn_layer_indices)
    assert all(s.mlp for s in c.layers) and c.attention.rope_fraction == 0.5
    prefill, steps = hf_parity(hf, ours, cache)
    assert prefill <= TOL, f"seed {seed}: prefill error {prefill:.2e}"
    assert max(steps) <= TOL, f"seed {seed}: decode error {max(steps):.2e} at step {steps.index(max(steps))}"


def test_decode_ring_is_capped(tmp_path):
    hf = transformers.BambaForCausalLM(transformers.BambaConfig(**bamba_kwargs(max_position_embeddings=262144)))
    hf.save_pretrained(tmp_path)
    ours, metadata = load_checkpoint(tmp_path)
    assert ours.config.attention.max_context == MAX_CONTEXT
    assert metadata["max_position_embeddings"] == 262144


@pytest.mark.parametrize(
    "change, message",
    [
        ({"mlp_bias": True}, "mlp_bias"),
        ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}, "RoPE type 'linear'"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"attn_layer_indices": [7]}, "attn_layer_indices"),
    ],
)
def test_unsupported_options_are_refused(tmp_path, change, message):
    hf = transformers.BambaForCausalLM(transformers.BambaConfig(**bamba_kwargs()))
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(CheckpointError, match=message) as e:
        load_checkpoint(tmp_path)
    assert "\n" not in str(e.value)
