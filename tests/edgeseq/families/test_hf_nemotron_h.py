"""HF Nemotron-H checkpoints: logits match transformers' own model, prefill and cached
decode, for both spellings of the layer list; the read model exports for a device."""

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
    return {"cache": out.cache}


KINDS = {"M": (("mamba2",), None), "*": (("attention",), None), "-": ((), "mlp_relu2")}


def nemotron_kwargs(**overrides) -> dict:
    kwargs = {
        "hidden_size": 32,
        "vocab_size": 53,
        "layers_block_type": ["linear_attention", "mlp", "full_attention", "linear_attention", "mlp"],
        "intermediate_size": 40,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "mamba_num_heads": 8,
        "mamba_head_dim": 8,
        "n_groups": 2,
        "ssm_state_size": 8,
        "chunk_size": 8,
        "max_position_embeddings": 512,
    }
    kwargs.update(overrides)
    return kwargs


def nemotron(path, **overrides):
    """A random transformers Nemotron-H saved at ``path``; (model, seed)."""
    hf = transformers.NemotronHForCausalLM(transformers.NemotronHConfig(**nemotron_kwargs(**overrides))).eval()
    seed = randomize_(hf)
    hf.save_pretrained(path)
    return hf, seed


def rewrite_config(path, change: dict, drop: tuple[str, ...] = ()) -> None:
    config = json.loads((path / "config.json").read_text())
    config = {k: v for k, v in config.items() if k not in drop}
    (path / "config.json").write_text(json.dumps({**config, **change}))


@pytest.mark.parametrize(
    "overrides, spelling",
    [
        ({}, "layers_block_type"),
        ({"layers_block_type": ["full_attention", "mlp", "linear_attention", "mlp", "linear_attention"],
          "n_groups": 1, "use_bias": True, "tie_word_embeddings": True}, "layers_block_type"),
        ({"layers_block_type": ["linear_attention", "linear_attention", "mlp", "full_attention", "mlp", "mlp"],
          "num_key_value_heads": 4, "use_conv_bias": False}, "hybrid_override_pattern"),
        ({}, "legacy type names"),
    ],
    ids=["M-*M-", "*-M-M-g1-bias-tie", "MM-*--pattern-mha", "legacy-names"],
)  # fmt: skip
def test_read_matches_transformers(tmp_path, overrides, spelling):
    hf, seed = nemotron(tmp_path, **overrides)
    letters = hf.config.hybrid_override_pattern
    if spelling == "hybrid_override_pattern":  # as older checkpoints write it
        rewrite_config(tmp_path, {"hybrid_override_pattern": letters}, drop=("layers_block_type",))
    elif spelling == "legacy type names":
        legacy = {"linear_attention": "mamba", "full_attention": "attention"}
        rewrite_config(tmp_path, {"layers_block_type": [legacy.get(t, t) for t in hf.config.layers_block_type]})
    ours, metadata = load_checkpoint(tmp_path)
    assert metadata["format"] == "hf_nemotron_h"
    c = ours.config
    assert [(s.mixers, s.mlp) for s in c.layers] == [KINDS[letter] for letter in letters]
    assert c.attention.rope_fraction == 0 and not c.tie_embeddings
    assert c.mamba.dt_limit == (hf.config.time_step_min, float("inf"))
    prefill, steps = hf_parity(hf, ours, cache)
    print(f"nemotron-h {letters} ({spelling}): prefill {prefill:.2e}, decode max {max(steps):.2e}")
    assert prefill <= TOL, f"seed {seed}: prefill error {prefill:.2e}"
    assert max(steps) <= TOL, f"seed {seed}: decode error {max(steps):.2e} at step {steps.index(max(steps))}"


@torch.no_grad()
def test_prefill_clamps_dt_at_time_step_min(tmp_path):
    """transformers clamps dt from below at time_step_min, not at time_step_limit's low end;
    heads pushed far under it show the clamp in the logits."""
    hf = transformers.NemotronHForCausalLM(transformers.NemotronHConfig(**nemotron_kwargs(time_step_min=0.05)))
    seed = randomize_(hf.eval())
    for layer in hf.model.layers:
        if hasattr(layer.mixer, "dt_bias"):
            layer.mixer.dt_bias[::2] = -12.0  # softplus ~ 6e-6, far under 0.05
    hf.save_pretrained(tmp_path)
    ours, _ = load_checkpoint(tmp_path)
    prompt = torch.randint(0, 53, (2, 13))
    error = (hf(prompt).logits - ours(prompt)[0]).abs().max().item()
    assert error <= TOL, f"seed {seed}: prefill error {error:.2e}"
    unclamped = load_checkpoint(tmp_path)[0]
    for block in unclamped.layers:
        if hasattr(block, "mixer") and hasattr(block.mixer, "dt_limit"):
            block.mixer.dt_limit = (0.0, float("inf"))
    assert (hf(prompt).logits - unclamped(prompt)[0]).abs().max().item() > 10 * TOL  # the clamp matters


def test_older_config_spellings_read_the_same(tmp_path):
    """NVIDIA's first configs: the letter pattern, ``mamba_*`` keys, ``attention_head_dim``."""
    nemotron(tmp_path, n_groups=4, conv_kernel=3, chunk_size=16, use_conv_bias=False, time_step_min=0.002)
    new = load_checkpoint(tmp_path)[0].config
    old_keys = {"n_groups": "mamba_n_groups", "conv_kernel": "mamba_d_conv", "chunk_size": "mamba_chunk_size",
                "use_conv_bias": "mamba_conv_bias", "time_step_min": "mamba_dt_min", "head_dim": "attention_head_dim"}  # fmt: skip
    raw = json.loads((tmp_path / "config.json").read_text())
    raw = {old_keys.get(k, k): v for k, v in raw.items() if k != "layers_block_type"}
    raw |= {"hybrid_override_pattern": "M-*M-", "num_hidden_layers": 5}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    old = load_checkpoint(tmp_path)[0].config
    assert old == new
    assert (new.mamba.ngroups, new.mamba.d_conv, new.mamba.chunk_size, new.mamba.conv_bias) == (4, 3, 16, False)
    assert new.mamba.dt_limit[0] == 0.002 and new.attention.head_dim == 8


def test_mtp_tensors_are_skipped_and_context_capped(tmp_path):
    nemotron(tmp_path, max_position_embeddings=262144)
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "model.safetensors")
    save_file({**tensors, "mtp.layers.0.norm.weight": torch.ones(32)}, tmp_path / "model.safetensors")
    ours, metadata = load_checkpoint(tmp_path)
    assert ours.config.attention.max_context == MAX_CONTEXT
    assert metadata["max_position_embeddings"] == 262144


def test_sections_only_for_the_kinds_used(tmp_path):
    nemotron(tmp_path, layers_block_type=["mlp", "linear_attention", "mlp"])
    config = load_checkpoint(tmp_path)[0].config
    assert config.attention is None and config.mamba.ngroups == 2 and config.d_mlp_relu2 == 40
    assert "attention" not in config.to_dict()


@pytest.mark.slow
def test_export_for_jetson(tmp_path):
    nemotron(tmp_path / "model")
    out = tmp_path / "bundle"
    args = ["export", "--model", str(tmp_path / "model"), "--target", "jetson", "--width", "1", "-o", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert [layer["mlp"] for layer in manifest["config"]["layers"]] == [None, "mlp_relu2", None, None, "mlp_relu2"]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"layers_block_type": ["linear_attention", "moe", "full_attention", "linear_attention", "mlp"]},
         r"layers_block_type\[1\] is a mixture-of-experts layer \('moe'\)"),
        ({"layers_block_type": None, "hybrid_override_pattern": "M-E*M"},
         r"hybrid_override_pattern\[2\] is a mixture-of-experts layer \('E'\)"),
        ({"layers_block_type": ["linear_attention", "sliding_attention", "mlp"]}, "'sliding_attention'"),
        ({"layers_block_type": None}, "layers_block_type"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"mlp_hidden_act": "gelu"}, "mlp_hidden_act 'gelu'"),
        ({"mamba_hidden_act": "gelu"}, "mamba_hidden_act 'gelu'"),
    ],
)  # fmt: skip
def test_unsupported_options_are_refused(tmp_path, change, message):
    transformers.NemotronHForCausalLM(transformers.NemotronHConfig(**nemotron_kwargs())).save_pretrained(tmp_path)
    rewrite_config(tmp_path, change)
    with pytest.raises(CheckpointError, match=message) as e:
        load_checkpoint(tmp_path)
    assert "\n" not in str(e.value)
