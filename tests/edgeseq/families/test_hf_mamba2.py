"""HF Mamba2 checkpoints: logits match transformers' own model, prefill and cached decode,
in both directions (read transformers' checkpoints, write ones transformers loads)."""

from __future__ import annotations

import json

import pytest
import torch

from edgeseq.errors import CheckpointError
from edgeseq.extract import extract
from edgeseq.families import load_checkpoint, save_checkpoint
from edgeseq.families.hf_mamba2 import read_config
from tests.conftest import hf_parity, random_model, randomize_, small_config

transformers = pytest.importorskip("transformers")

TOL = 1e-4  # max abs logit difference, fp32


def cache(out, position) -> dict:
    """How this family's transformers model takes its cache (and positions) back."""
    return {"cache_params": out.cache_params}


def hf_model(n_groups: int, **overrides) -> transformers.Mamba2ForCausalLM:
    kwargs = {
        "hidden_size": 16,
        "num_hidden_layers": 2,
        "vocab_size": 53,
        "state_size": 8,
        "head_dim": 4,
        "num_heads": 8,
        "n_groups": n_groups,
        "expand": 2,
        "conv_kernel": 4,
        "chunk_size": 8,
    }
    kwargs.update(overrides)
    return transformers.Mamba2ForCausalLM(transformers.Mamba2Config(**kwargs)).eval()


@pytest.mark.parametrize("n_groups, tie, bias", [(1, True, False), (2, False, True)], ids=["g1-tied", "g2-untied-bias"])
def test_read_matches_transformers(tmp_path, n_groups, tie, bias):
    hf = hf_model(n_groups, tie_word_embeddings=tie, use_bias=bias)
    seed = randomize_(hf)
    hf.save_pretrained(tmp_path)
    ours, metadata = load_checkpoint(tmp_path)
    assert metadata["format"] == "hf"
    assert ours.config.mamba.ngroups == n_groups and ours.config.tie_embeddings == tie
    prefill, steps = hf_parity(hf, ours, cache)
    assert prefill <= TOL, f"seed {seed}: prefill error {prefill:.2e}"
    assert max(steps) <= TOL, f"seed {seed}: decode error {max(steps):.2e} at step {steps.index(max(steps))}"


def test_sharded_checkpoint_reads_like_one_file(tmp_path):
    hf = hf_model(2)
    randomize_(hf)
    hf.save_pretrained(tmp_path / "one")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="8KB")
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    one, _ = load_checkpoint(tmp_path / "one")
    sharded, _ = load_checkpoint(tmp_path / "sharded", format="hf")
    a, b = one.state_dict(), sharded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@torch.no_grad()
def test_time_step_limit_is_read_and_applied(tmp_path):
    # prefill only: transformers' decode path ignores time_step_limit (see the module docstring)
    hf = hf_model(1, time_step_limit=(0.01, 0.2))
    randomize_(hf)
    hf.save_pretrained(tmp_path)
    ours, _ = load_checkpoint(tmp_path)
    assert ours.config.mamba.dt_limit == pytest.approx((0.01, 0.2))
    prompt = torch.randint(0, 53, (2, 13))
    assert (hf(prompt).logits - ours(prompt)[0]).abs().max().item() <= TOL


def test_config_aliases_and_float_tags():
    raw = {
        "hidden_size": 16,
        "num_hidden_layers": 3,
        "vocab_size": 11,
        "state_size": 8,
        "head_dim": 4,
        "num_heads": 8,
        "n_groups": 2,
        "time_step_limit": [0.0, {"__float__": "Infinity"}],
    }
    config = read_config(raw)
    assert config.mamba.n_heads(config.d_model) == 8 and config.mamba.dt_limit == (0.0, float("inf"))
    assert [s.parts for s in config.layers] == [("mamba2",)] * 3 and not config.tie_embeddings
    with pytest.raises(CheckpointError, match="inconsistent"):
        read_config({**raw, "expand": 3})
    with pytest.raises(CheckpointError, match="'state_size'"):
        read_config({k: v for k, v in raw.items() if k != "state_size"})


# ---- writing --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "width, tie, expand", [("0.5", False, 1), ("1", True, 2)], ids=["half-expand1", "full-expand2-tied"]
)
def test_written_checkpoint_loads_in_transformers(tmp_path, width, tie, expand):
    nested = random_model(small_config("M M M", tie_embeddings=tie), dtype=torch.float32)
    ours = extract(nested, width)
    save_checkpoint(ours, tmp_path / "hf", format="hf", metadata={"note": "round trip"})
    hf = transformers.Mamba2ForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.expand == expand and hf.config.tie_word_embeddings == tie
    prefill, steps = hf_parity(hf, ours, cache, steps=16)
    assert prefill <= TOL and max(steps) <= TOL, (prefill, max(steps))
    back, metadata = load_checkpoint(tmp_path / "hf")
    assert metadata == {"format": "hf", "note": "round trip"}
    assert back.config.nested_widths == ours.config.nested_widths  # kept in config.json's "edgeseq" entry
    a, b = ours.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "pattern, width, reason",
    [
        ("M M M", "0.25", "integer expand"),  # 4 heads * 4 / 32 = expand 0.5
        ("M M M", "1,0.5,0.5", "same heads in every layer"),
        ("M M+ A", "1", "pure Mamba2"),
    ],
)
def test_unwritable_models_are_refused(tmp_path, pattern, width, reason):
    model = extract(random_model(small_config(pattern), dtype=torch.float32), width)
    with pytest.raises(CheckpointError, match=reason) as e:
        save_checkpoint(model, tmp_path / "hf", format="hf")
    assert "--format native" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "hf").exists()


def test_detection_leaves_native_and_other_models_alone(tmp_path):
    model = random_model(small_config("M M"), dtype=torch.float32)
    save_checkpoint(model, tmp_path / "native")
    assert load_checkpoint(tmp_path / "native")[1]["format"] == "native"
    (tmp_path / "bamba").mkdir()
    (tmp_path / "bamba" / "config.json").write_text(json.dumps({"model_type": "bamba"}))
    from edgeseq.families.hf_mamba2 import HFMamba2

    assert not HFMamba2.detect(tmp_path / "bamba")
