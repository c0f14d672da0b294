"""HF Granite 4.0-H (GraniteMoeHybrid) checkpoints: logits match transformers' own model,
prefill and cached decode, dense and mixture-of-experts, with and without RoPE, with
non-trivial multipliers (folded into weights); the read model exports for a device."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from edgeseq.cli import main
from edgeseq.errors import CheckpointError
from edgeseq.families import load_checkpoint
from edgeseq.families.hf_bamba import MAX_CONTEXT
from tests.conftest import hf_parity, randomize_

transformers = pytest.importorskip("transformers")

TOL = 1e-4  # max abs logit difference, fp32


def cache(out, position) -> dict:
    """How this family's transformers model takes its cache (and positions) back."""
    return {"past_key_values": out.past_key_values, "position_ids": position}


# multipliers far from 1 so that a missed or doubled fold shows (Granite 4.0-H ships 12, 0.22, 0.0078125, 6)
MULTIPLIERS = {"embedding_multiplier": 3.0, "residual_multiplier": 0.5, "attention_multiplier": 0.3,
               "logits_scaling": 1.5}  # fmt: skip


def granite_kwargs(**overrides) -> dict:
    kwargs = {
        "hidden_size": 32,
        "num_hidden_layers": 4,
        "vocab_size": 53,
        "intermediate_size": 24,
        "shared_intermediate_size": 40,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "layer_types": ["mamba", "attention", "mamba", "attention"],
        "mamba_n_heads": 8,
        "mamba_d_head": 8,
        "mamba_n_groups": 1,
        "mamba_d_state": 8,
        "mamba_chunk_size": 8,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "position_embedding_type": "nope",
        "max_position_embeddings": 512,
        **MULTIPLIERS,
    }
    kwargs.update(overrides)
    return kwargs


def granite(path, **overrides) -> tuple[transformers.GraniteMoeHybridForCausalLM, int]:
    hf = transformers.GraniteMoeHybridForCausalLM(transformers.GraniteMoeHybridConfig(**granite_kwargs(**overrides)))
    seed = randomize_(hf.eval())
    hf.save_pretrained(path)
    return hf, seed


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"num_local_experts": 0, "position_embedding_type": "rope"},
        {
            "num_local_experts": 6,
            "num_experts_per_tok": 3,
            "position_embedding_type": "rope",
            "rope_parameters": {"rope_type": "default", "rope_theta": 500.0},
            "layer_types": ["attention", "mamba", "mamba", "attention"],
            "mamba_n_groups": 2,
            "attention_bias": True,
            "mamba_proj_bias": True,
            "tie_word_embeddings": True,
        },
        {"num_local_experts": 0, "tie_word_embeddings": True, "attention_bias": True},
    ],
    ids=["moe-nope", "dense-rope", "moe-rope-bias-tied-g2", "dense-nope-bias-tied"],
)
def test_read_matches_transformers(tmp_path, overrides):
    hf, seed = granite(tmp_path, **overrides)
    ours, metadata = load_checkpoint(tmp_path)
    assert metadata["format"] == "hf_granite_hybrid"
    c, experts = ours.config, hf.config.num_local_experts
    assert [s.mixers[0] for s in c.layers] == [
        "attention" if t == "full_attention" else "mamba2" for t in hf.config.layer_types
    ]
    assert {s.mlp for s in c.layers} == {"moe" if experts else "mlp"}
    assert c.attention.rope_fraction == (1.0 if hf.config.position_embedding_type == "rope" else 0.0)
    assert c.embedding_scale == MULTIPLIERS["embedding_multiplier"]
    if experts:
        assert (c.moe.n_experts, c.moe.top_k) == (experts, hf.config.num_experts_per_tok)
    prefill, steps = hf_parity(hf, ours, cache)
    print(f"seed {seed} {overrides}: prefill {prefill:.2e}, decode max {max(steps):.2e}")
    assert prefill <= TOL, f"seed {seed}: prefill error {prefill:.2e}"
    assert max(steps) <= TOL, f"seed {seed}: decode error {max(steps):.2e} at step {steps.index(max(steps))}"


@torch.no_grad()
def test_sections_only_for_the_kinds_used(tmp_path):
    """All-Mamba (no ``layer_types``): no attention section; prefill still matches
    (transformers' cache needs an attention layer, so no decode here)."""
    hf, seed = granite(tmp_path, layer_types=None)
    ours = load_checkpoint(tmp_path)[0]
    assert ours.config.attention is None and "attention" not in ours.config.to_dict()
    prompt = torch.randint(0, 53, (2, 13))
    error = (hf(prompt, use_cache=False).logits - ours(prompt)[0]).abs().max().item()
    assert error <= TOL, f"seed {seed}: prefill error {error:.2e}"


def test_multipliers_are_folded_into_the_weights(tmp_path):
    """Each fold the module docstring names, checked on the tensors themselves."""
    granite(tmp_path, position_embedding_type="rope", attention_bias=True)
    hf = load_file(tmp_path / "model.safetensors")
    ours = load_checkpoint(tmp_path)[0].state_dict()
    m = MULTIPLIERS
    head_dim = 32 // 4
    pairs = {
        "layers.0.mixer.out_proj.weight": ("model.layers.0.mamba.out_proj.weight", m["residual_multiplier"]),
        "layers.1.mixer.o_proj.weight": ("model.layers.1.self_attn.o_proj.weight", m["residual_multiplier"]),
        "layers.1.mixer.o_proj.bias": ("model.layers.1.self_attn.o_proj.bias", m["residual_multiplier"]),
        "layers.1.mixer.q_proj.bias": ("model.layers.1.self_attn.q_proj.bias",
                                       m["attention_multiplier"] * math.sqrt(head_dim)),
        "layers.1.mixer.k_proj.weight": ("model.layers.1.self_attn.k_proj.weight", 1.0),
        "layers.0.mlp.down_proj.weight": ("model.layers.0.shared_mlp.output_linear.weight", m["residual_multiplier"]),
        "layers.0.mlp.router.weight": ("model.layers.0.block_sparse_moe.router.layer.weight", 1.0),
        "norm_f.weight": ("model.norm.weight", 1 / m["logits_scaling"]),
        "embedding.weight": ("model.embed_tokens.weight", 1.0),
    }  # fmt: skip
    for native, (name, factor) in pairs.items():
        torch.testing.assert_close(ours[native], hf[name] * factor, rtol=1e-6, atol=0, msg=native)
    gate_up, down = hf["model.layers.2.block_sparse_moe.input_linear.weight"], ours["layers.2.mlp.experts.down_proj"]
    assert ours["layers.2.mlp.experts.gate_proj"].shape == (4, 24, 32)
    assert torch.equal(ours["layers.2.mlp.experts.up_proj"], gate_up[:, 24:])
    torch.testing.assert_close(
        down, hf["model.layers.2.block_sparse_moe.output_linear.weight"] * 0.5, rtol=1e-6, atol=0
    )


def test_decode_ring_is_capped(tmp_path):
    granite(tmp_path, max_position_embeddings=131072)
    ours, metadata = load_checkpoint(tmp_path)
    assert ours.config.attention.max_context == MAX_CONTEXT
    assert metadata["max_position_embeddings"] == 131072


@pytest.mark.parametrize(
    "change, message",
    [
        ({"position_embedding_type": "alibi"}, "position_embedding_type 'alibi'"),
        ({"position_embedding_type": "rope", "rope_parameters": {"rope_type": "linear", "factor": 2.0,
                                                                  "rope_theta": 1e4}}, "RoPE type 'linear'"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"layer_types": ["mamba", "sliding_attention", "mamba", "attention"]}, "layer_types"),
        ({"layer_types": ["mamba", "attention"]}, "layer_types"),
        ({"residual_multiplier": 0}, "residual_multiplier"),
    ],
)  # fmt: skip
def test_unsupported_options_are_refused(tmp_path, change, message):
    hf = transformers.GraniteMoeHybridForCausalLM(transformers.GraniteMoeHybridConfig(**granite_kwargs()))
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(CheckpointError, match=message) as e:
        load_checkpoint(tmp_path)
    assert "\n" not in str(e.value)


@pytest.mark.slow
@pytest.mark.parametrize("experts", [4, 0], ids=["moe", "dense"])
def test_export_for_jetson(tmp_path, experts):
    """The read model exports and its bundle passes validation (fp16, the profile's default)."""
    granite(tmp_path / "model", num_local_experts=experts, position_embedding_type="rope")
    out = tmp_path / "bundle"
    args = ["export", "--model", str(tmp_path / "model"), "--target", "jetson", "--width", "1", "-o", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert {layer["mlp"] for layer in manifest["config"]["layers"]} == {"moe" if experts else "mlp"}
