"""HF Falcon-H1 checkpoints: logits match transformers' own model (μP multipliers folded
into the weights), prefill and cached decode; the read model exports for a device."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from edgeseq.cli import main
from edgeseq.errors import CheckpointError
from edgeseq.families import load_checkpoint
from edgeseq.families.hf_bamba import MAX_CONTEXT
from tests.conftest import hf_parity, randomize_

transformers = pytest.importorskip("transformers")

TOL = 1e-4  # max abs logit difference, fp32


def cache(out, position) -> dict:
    """How this family's transformers model takes its cache (and positions) back."""
    return {"cache": out.cache, "position_ids": position}


def random_multipliers() -> dict:
    """Fresh μP multipliers in [0.4, 2) (non-trivial, so a missing fold shows in the logits)."""

    def draw(n: int = 1) -> list[float]:
        return (0.4 + 1.6 * torch.rand(n)).tolist()

    single = ["embedding_multiplier", "lm_head_multiplier", "key_multiplier", "attention_in_multiplier",
              "attention_out_multiplier", "ssm_in_multiplier", "ssm_out_multiplier"]  # fmt: skip
    return {k: draw()[0] for k in single} | {"ssm_multipliers": draw(5), "mlp_multipliers": draw(2)}


def falcon_kwargs(**overrides) -> dict:
    kwargs = {
        "hidden_size": 32,
        "num_hidden_layers": 3,
        "vocab_size": 53,
        "intermediate_size": 40,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "mamba_d_ssm": 64,
        "mamba_n_heads": 8,
        "mamba_d_head": "auto",
        "mamba_n_groups": 1,
        "mamba_d_state": 8,
        "mamba_chunk_size": 8,
        "mamba_rms_norm": True,  # the gated norm; tests below also run HF's default (False: the gate alone)
        "mamba_norm_before_gate": False,
        "max_position_embeddings": 512,
    }
    kwargs.update(overrides)
    return kwargs


def falcon(tmp_path, **overrides) -> tuple[object, int]:
    """A random transformers Falcon-H1 saved to ``tmp_path``; (model, weight seed)."""
    hf = transformers.FalconH1ForCausalLM(transformers.FalconH1Config(**falcon_kwargs(**overrides))).eval()
    seed = randomize_(hf)
    hf.save_pretrained(tmp_path)
    return hf, seed


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {
            "mamba_n_groups": 2,
            "mamba_d_ssm": None,  # mamba_expand * hidden_size
            "mamba_expand": 2,
            "attention_bias": True,
            "mamba_proj_bias": True,  # in_proj bias only: out_proj gets a zero one
            "tie_word_embeddings": True,
            "head_dim": 16,  # not hidden_size / heads
            "rope_parameters": {"rope_type": "default", "rope_theta": 500.0},
        },
        {"projectors_bias": True, "mamba_conv_bias": False, "num_key_value_heads": 4},
        {"mamba_rms_norm": False, "mamba_n_groups": 2},  # HF's default: y * silu(z), no norm
    ],
    ids=["base", "g2-bias-tied-headdim", "outbias-noconvbias-mha", "no-mamba-norm"],
)
def test_read_matches_transformers(tmp_path, overrides):
    multipliers = random_multipliers()
    hf, seed = falcon(tmp_path, **overrides, **multipliers)
    ours, metadata = load_checkpoint(tmp_path)
    assert metadata["format"] == "hf_falcon_h1"
    c = ours.config
    assert all(s.mixers == ("attention", "mamba2") and s.mlp for s in c.layers)
    assert c.attention.rope_fraction == 1.0
    assert c.tie_embeddings == hf.config.tie_word_embeddings
    expected_scale = multipliers["embedding_multiplier"] if c.tie_embeddings else 1.0
    assert c.embedding_scale == pytest.approx(expected_scale)
    prefill, steps = hf_parity(hf, ours, cache)
    where = f"seed {seed}, multipliers {multipliers}"
    print(f"falcon-h1 {overrides}: prefill {prefill:.2e}, decode max {max(steps):.2e}")
    assert prefill <= TOL, f"{where}: prefill error {prefill:.2e}"
    assert max(steps) <= TOL, f"{where}: decode error {max(steps):.2e} at step {steps.index(max(steps))}"


def test_decode_ring_is_capped(tmp_path):
    falcon(tmp_path, max_position_embeddings=262144)
    ours, metadata = load_checkpoint(tmp_path)
    assert ours.config.attention.max_context == MAX_CONTEXT
    assert metadata["max_position_embeddings"] == 262144


@pytest.mark.slow
def test_export_for_jetson(tmp_path):
    falcon(tmp_path / "model", mamba_rms_norm=False, **random_multipliers())  # HF's default Mamba2 output
    out = tmp_path / "bundle"
    args = ["export", "--model", str(tmp_path / "model"), "--target", "jetson", "--width", "1", "-o", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    validation = json.loads((out / "manifest.json").read_text())["validation"]
    print(f"falcon-h1 jetson export: {validation['summary']}")
    assert "portable" in validation["ran"], validation  # the graphs onnxruntime runs here were checked


@pytest.mark.parametrize(
    "change, message",
    [
        ({"mamba_norm_before_gate": True}, "mamba_norm_before_gate true"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}, "RoPE type 'linear'"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"ssm_multipliers": [1.0, 1.0]}, "ssm_multipliers"),
        ({"key_multiplier": None}, "key_multiplier"),
        ({"mamba_d_head": 5}, "mamba_n_heads \\* mamba_d_head"),
        ({"tie_word_embeddings": True, "embedding_multiplier": -1.0}, "embedding_multiplier"),
    ],
)
def test_unsupported_options_are_refused(tmp_path, change, message):
    transformers.FalconH1ForCausalLM(transformers.FalconH1Config(**falcon_kwargs())).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(CheckpointError, match=message) as e:
        load_checkpoint(tmp_path)
    assert "\n" not in str(e.value)
