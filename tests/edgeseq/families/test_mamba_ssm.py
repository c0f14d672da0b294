"""mamba_ssm / MatMamba checkpoints: logits against transformers' Mamba2, hybrid self-consistency,
upstream MLP and MHA semantics, and every option edgeseq refuses."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from edgeseq.config import ModelConfig
from edgeseq.errors import CheckpointError
from edgeseq.families import detect_family, load_checkpoint
from edgeseq.families.mamba_ssm import MambaSsm
from edgeseq.kinds.attention import AttentionParams
from edgeseq.kinds.mamba2 import Mamba2Params
from tests.conftest import random_model

ATTN = [1, 3]  # attention layers of the hybrid below


# ---- writing checkpoints the way mamba_ssm does ---------------------------------------
def write_checkpoint(path, config: dict, state: dict[str, torch.Tensor], fmt: str):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=4))  # dt_limit's inf -> Infinity, as json.dump does
    if fmt == "bin":
        torch.save(dict(state), path / "pytorch_model.bin")
    else:  # safetensors refuses tensors that share memory (a tied lm_head): store copies
        save_file({k: v.detach().clone().contiguous() for k, v in state.items()}, path / "model.safetensors")
    return path


def mamba_ssm_config(**over) -> dict:
    ssm = {"layer": "Mamba2", "d_state": 8, "headdim": 4, "ngroups": 2, "expand": 2, "d_conv": 4, "chunk_size": 4,
           "dt_min": 0.001, "dt_max": 0.1, "dt_limit": [0.0, math.inf], "bias": False, "conv_bias": True,
           "rmsnorm": True, "norm_before_gate": False}  # fmt: skip
    ssm.update(over.pop("ssm_cfg", {}))
    cfg = {"d_model": 32, "d_intermediate": 0, "n_layer": 3, "vocab_size": 61, "ssm_cfg": ssm, "attn_layer_idx": [],
           "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
           "pad_vocab_size_multiple": 8, "tie_embeddings": True}  # fmt: skip
    cfg.update(over)
    return cfg


def native_to_mamba_ssm(model) -> dict[str, torch.Tensor]:
    """A native model's tensors under MambaLMHeadModel names (inverse of the family's rename)."""
    sd, out = model.state_dict(), {}
    for name, t in sd.items():
        if not name.startswith("layers."):
            out[name if name == "lm_head.weight" else f"backbone.{name}"] = t
            continue
        _, i, rest = name.split(".", 2)
        up = f"backbone.layers.{i}"
        if rest == "mlp_norm.weight":
            out[f"{up}.norm2.weight"] = t
        elif rest == "mlp.up_proj.weight":  # fc1 rows: [value; gate]
            out[f"{up}.mlp.fc1.weight"] = torch.cat([t, sd[f"layers.{i}.mlp.gate_proj.weight"]])
        elif rest == "mlp.down_proj.weight":
            out[f"{up}.mlp.fc2.weight"] = t
        elif rest.startswith("mixer.q_proj."):  # in_proj rows: [q; k; v]
            kind = rest.rsplit(".", 1)[1]
            qkv = [sd[f"layers.{i}.mixer.{p}.{kind}"] for p in ("q_proj", "k_proj", "v_proj")]
            out[f"{up}.mixer.in_proj.{kind}"] = torch.cat(qkv)
        elif rest.startswith("mixer.o_proj."):
            out[f"{up}.mixer.out_proj.{rest.rsplit('.', 1)[1]}"] = t
        elif not rest.startswith(("mlp.gate_proj", "mixer.k_proj", "mixer.v_proj")):
            out[f"{up}.{rest}"] = t
    if model.config.tie_embeddings:  # MambaLMHeadModel.state_dict() keeps the tied head too
        out["lm_head.weight"] = sd["embedding.weight"]
    return out


def hybrid_native(tie: bool, dtype=torch.float64):
    config = ModelConfig.from_pattern(
        "M+ A+ M+ A+",
        d_model=32,
        vocab_size=64,  # 61 padded to a multiple of 8
        d_mlp=128,  # GatedMLP rounds d_intermediate=100 up to 128
        mamba=Mamba2Params(d_state=8, headdim=4, ngroups=2, chunk_size=4),
        attention=AttentionParams(n_heads=8, n_kv_heads=4, head_dim=8, rope_fraction=0.5, qkv_bias=True, out_bias=True),
        tie_embeddings=tie,
        nested_widths=(1.0,),
    )
    return random_model(config, dtype)


def hybrid_config(**over) -> dict:
    attn = {"num_heads": 8, "num_heads_kv": 4, "head_dim": 8, "rotary_emb_dim": 4, "causal": True,
            "qkv_proj_bias": True, "out_proj_bias": True}  # fmt: skip
    attn.update(over.pop("attn_cfg", {}))
    return mamba_ssm_config(**{"n_layer": 4, "d_intermediate": 100, "attn_layer_idx": ATTN, "attn_cfg": attn, **over})


# ---- 1. independent check against transformers' Mamba2 --------------------------------
def hf_mamba2(tie: bool, ngroups: int):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Mamba2Config(
        vocab_size=64, hidden_size=32, num_hidden_layers=3, state_size=8, head_dim=4, num_heads=16, n_groups=ngroups,
        expand=2, conv_kernel=4, chunk_size=4, use_bias=False, use_conv_bias=True, layer_norm_epsilon=1e-5,
        tie_word_embeddings=tie, rms_norm=True, time_step_limit=(0.0, float("inf")),
    )  # fmt: skip
    model = transformers.Mamba2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.rand(p.shape) * 1.5)
            elif name.endswith("dt_bias"):
                p.copy_(torch.randn(p.shape) - 2)
            else:
                p.copy_(torch.randn(p.shape) * 0.3)
    return model


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("ngroups", [1, 2])
def test_logits_match_transformers_mamba2(tmp_path, fmt, tie, ngroups):
    hf = hf_mamba2(tie, ngroups)
    state = {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in hf.state_dict().items()}
    config = mamba_ssm_config(tie_embeddings=tie, ssm_cfg={"ngroups": ngroups})
    path = write_checkpoint(tmp_path / "ckpt", config, state, fmt)

    assert detect_family(path) is MambaSsm
    model, metadata = load_checkpoint(path, dtype=torch.float32)
    assert (model.config.vocab_size, metadata["vocab_size_unpadded"]) == (64, 61)
    ids = torch.randint(0, 64, (2, 11))  # not a multiple of the chunk size
    with torch.no_grad():
        expected = hf(ids, use_cache=False).logits
        logits, _ = model(ids)
    assert (logits - expected).abs().max().item() <= 1e-4


# ---- 2. hybrid checkpoints: attention, MLPs, vocab padding ----------------------------
@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
@pytest.mark.parametrize("tie", [True, False])
def test_hybrid_round_trip_logits_equal(tmp_path, fmt, tie):
    native = hybrid_native(tie)
    path = write_checkpoint(tmp_path / "ckpt", hybrid_config(tie_embeddings=tie), native_to_mamba_ssm(native), fmt)

    model, metadata = load_checkpoint(path, dtype=torch.float64)
    assert metadata["format"] == "mamba_ssm"
    assert model.config.layers == native.config.layers
    assert (model.config.d_mlp, model.config.attention.rope_fraction) == (128, 0.5)
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert torch.allclose(model(ids)[0], native(ids)[0], rtol=0, atol=1e-12)


def test_fc1_halves_are_value_then_gate(tmp_path):
    """mamba_ssm's GatedMLP: y, gate = fc1(x).chunk(2); fc2(y * silu(gate))."""
    state = native_to_mamba_ssm(hybrid_native(tie=False))
    model, _ = load_checkpoint(write_checkpoint(tmp_path / "c", hybrid_config(tie_embeddings=False), state, "bin"),
                               dtype=torch.float64)  # fmt: skip
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    for i in range(4):
        y, gate = F.linear(x, state[f"backbone.layers.{i}.mlp.fc1.weight"]).chunk(2, dim=-1)
        upstream = F.linear(y * F.silu(gate), state[f"backbone.layers.{i}.mlp.fc2.weight"])
        with torch.no_grad():
            ours, _ = model.layers[i].mlp(model.layers[i].params_at("mlp", 128), x, {}, None, 128)
        assert torch.allclose(ours, upstream, rtol=0, atol=1e-12)


def upstream_mha(x, w_in, b_in, w_out, b_out, h, hkv, d, rot, base=10000.0):
    """mamba_ssm MHA (causal, flash_attn non-interleaved rotary) in plain torch. x (b, l, e)."""
    q, kv = F.linear(x, w_in, b_in).split([h * d, 2 * hkv * d], dim=-1)
    q = q.unflatten(-1, (h, d))
    k, v = kv.unflatten(-1, (2, hkv, d)).unbind(-3)  # "(two hkv d)"
    inv_freq = 1.0 / base ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot)
    freqs = torch.outer(torch.arange(x.size(1), dtype=torch.float32), inv_freq).to(x.dtype)  # (l, rot/2)
    cos, sin = (torch.cat([f, f], -1)[:, None, :] for f in (freqs.cos(), freqs.sin()))  # (l, 1, rot)

    def rotary(t):
        r1, r2 = t[..., :rot].chunk(2, dim=-1)
        return torch.cat([t[..., :rot] * cos + torch.cat([-r2, r1], -1) * sin, t[..., rot:]], dim=-1)

    q, k = rotary(q), rotary(k)
    k, v = (t.repeat_interleave(h // hkv, dim=2) for t in (k, v))
    ctx = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    return F.linear(ctx.transpose(1, 2).flatten(-2), w_out, b_out)


def test_mha_in_proj_rows_are_q_k_v(tmp_path):
    state = native_to_mamba_ssm(hybrid_native(tie=True))
    model, _ = load_checkpoint(write_checkpoint(tmp_path / "c", hybrid_config(), state, "bin"), dtype=torch.float64)
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    st = model.init_state(2)
    for i in ATTN:
        p = f"backbone.layers.{i}.mixer"
        w_in, b_in, w_out, b_out = (state[f"{p}.{n}_proj.{k}"] for n in ("in", "out") for k in ("weight", "bias"))
        upstream = upstream_mha(x, w_in, b_in, w_out, b_out, h=8, hkv=4, d=8, rot=4)
        with torch.no_grad():
            ours, _ = model.layers[i].mixer(model.layers[i].params_at("attention", 8), x, st.layers[i], st.position, 8)
        assert torch.allclose(ours, upstream, rtol=0, atol=1e-10)


def test_matmamba2_without_layer_key(tmp_path):
    """MatMamba builds MatMamba2 when ssm_cfg has no "layer" and fixes headdim to d_model // 32."""
    config = ModelConfig.from_pattern(
        "M M", d_model=64, vocab_size=64, mamba=Mamba2Params(d_state=8, headdim=2, ngroups=1, chunk_size=8)
    )
    native = random_model(config)
    cfg = mamba_ssm_config(d_model=64, n_layer=2, ssm_cfg={"headdim": 64, "ngroups": 1, "chunk_size": 8})
    del cfg["ssm_cfg"]["layer"]
    model, metadata = load_checkpoint(write_checkpoint(tmp_path / "c", cfg, native_to_mamba_ssm(native), "bin"),
                                      dtype=torch.float64)  # fmt: skip
    assert metadata["ssm_layer"] == "MatMamba2"
    assert model.config.mamba.headdim == 2
    assert model.config.nested_widths == (1.0, 0.5, 0.25, 0.125)
    ids = torch.randint(0, 64, (1, 10))
    with torch.no_grad():
        for width in model.config.nested_widths:
            assert torch.allclose(model(ids, width=width)[0], native(ids, width=width)[0], rtol=0, atol=1e-12)


# ---- 3. detection ----------------------------------------------------------------------
def test_detection_leaves_hf_and_native_alone(tmp_path):
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / "config.json").write_text(json.dumps(mamba_ssm_config()))
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "mamba2", "hidden_size": 32, "num_hidden_layers": 2}))
    native = tmp_path / "native"
    native.mkdir()
    (native / "config.json").write_text(json.dumps({"format": "edgeseq", "d_model": 32, "n_layer": 2}))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    xlnet = tmp_path / "xlnet"  # an HF config that also says d_model and n_layer
    xlnet.mkdir()
    (xlnet / "config.json").write_text(json.dumps({"model_type": "xlnet", "d_model": 32, "n_layer": 2}))
    assert MambaSsm.detect(ours)
    assert not any(MambaSsm.detect(p) for p in (hf, native, broken, xlnet, tmp_path / "absent"))


@pytest.mark.parametrize("model_type", ["mamba2", "mamba", "bamba"])
def test_a_model_type_tag_does_not_hide_a_mamba_ssm_config(tmp_path, model_type):
    """Hub uploads may add model_type to MambaConfig's json; its ssm_cfg block still tells, and
    mamba_ssm is asked before the HF families that match on model_type alone."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type, **mamba_ssm_config()}))
    assert detect_family(tmp_path) is MambaSsm
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type, "hidden_size": 32, "ssm_cfg": {}}))
    assert not MambaSsm.detect(tmp_path)  # an HF config (hidden_size) stays with the HF families


def test_a_weights_file_without_config_asks_for_one(tmp_path):
    path = write_checkpoint(tmp_path / "c", mamba_ssm_config(), {"x": torch.zeros(1)}, "bin")
    with pytest.raises(CheckpointError, match="--config FILE") as e:
        load_checkpoint(path / "pytorch_model.bin")
    assert "\n" not in str(e.value)


# ---- 4. what edgeseq refuses -----------------------------------------------------------
REFUSED = [
    ("rms_norm", {"rms_norm": False}),
    ("ssm_cfg.layer", {"ssm_cfg": {"layer": "Mamba1"}}),
    ("ssm_cfg.norm_before_gate", {"ssm_cfg": {"norm_before_gate": True}}),
    ("ssm_cfg.rmsnorm", {"ssm_cfg": {"rmsnorm": False}}),
    ("ssm_cfg.d_ssm", {"ssm_cfg": {"d_ssm": 32}}),
    ("ssm_cfg.D_has_hdim", {"ssm_cfg": {"D_has_hdim": True}}),
    ("learnable_init_states", {"ssm_cfg": {"learnable_init_states": True}}),
    ("attn_cfg.d_conv", {"attn_cfg": {"d_conv": 4}}),
    ("attn_cfg.mlp_dim", {"attn_cfg": {"mlp_dim": 64}}),
    ("attn_cfg.causal", {"attn_cfg": {"causal": False}}),
    ("attn_cfg.softmax_scale", {"attn_cfg": {"softmax_scale": 0.5}}),
    ("attn_cfg.rotary_emb_interleaved", {"attn_cfg": {"rotary_emb_interleaved": True}}),
]


@pytest.mark.parametrize("option,change", REFUSED, ids=[r[0] for r in REFUSED])
def test_unrepresentable_options_are_refused(tmp_path, option, change):
    state = native_to_mamba_ssm(hybrid_native(tie=True, dtype=torch.float32))
    path = write_checkpoint(tmp_path / "c", hybrid_config(**change), state, "safetensors")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert option in str(e.value) and "\n" not in str(e.value)


def test_mha_without_causal_is_refused(tmp_path):
    """MHA defaults to causal=False; mamba_ssm hybrids must say causal: true."""
    cfg = hybrid_config()
    del cfg["attn_cfg"]["causal"]
    path = write_checkpoint(tmp_path / "c", cfg, native_to_mamba_ssm(hybrid_native(True, torch.float32)), "bin")
    with pytest.raises(CheckpointError, match="attn_cfg.causal"):
        load_checkpoint(path)


def test_vocab_that_disagrees_with_padding_is_refused(tmp_path):
    cfg = hybrid_config(pad_vocab_size_multiple=1)  # 61 rows expected, 64 stored
    path = write_checkpoint(tmp_path / "c", cfg, native_to_mamba_ssm(hybrid_native(True, torch.float32)), "bin")
    with pytest.raises(CheckpointError, match="pad_vocab_size_multiple"):
        load_checkpoint(path)


def test_missing_weights_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(mamba_ssm_config()))
    with pytest.raises(CheckpointError, match="neither model.safetensors nor pytorch_model.bin"):
        load_checkpoint(tmp_path)


def test_wrapped_state_dict_is_unwrapped(tmp_path):
    """A training checkpoint ({"model": state_dict, "step": ...}) is read from under "model";
    a wrapper without a known key is refused, naming what it holds."""
    native = hybrid_native(True, torch.float32)
    state = native_to_mamba_ssm(native)
    path = write_checkpoint(tmp_path / "c", hybrid_config(), {}, "bin")
    torch.save({"model": state, "step": 3}, path / "pytorch_model.bin")
    model, _ = load_checkpoint(path)
    assert all(torch.equal(v, native.state_dict()[k]) for k, v in model.state_dict().items())
    torch.save({"weights": state, "step": 3}, path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"no flat state dict .*\['step', 'weights'\]"):
        load_checkpoint(path)


def test_mamba1_weights_without_layer_key_are_refused(tmp_path):
    """mamba_ssm builds Mamba1 when ssm_cfg has no "layer"; Mamba1 mixers have no dt_bias."""
    state = {k: v for k, v in native_to_mamba_ssm(hybrid_native(True, torch.float32)).items() if "dt_bias" not in k}
    cfg = hybrid_config()
    del cfg["ssm_cfg"]["layer"]
    with pytest.raises(CheckpointError, match="Mamba1"):
        load_checkpoint(write_checkpoint(tmp_path / "c", cfg, state, "bin"))


@pytest.mark.parametrize(
    "key, value", [("d_model", 0), ("n_layer", "4"), ("attn_layer_idx", [7]), ("attn_layer_idx", 1)]
)
def test_malformed_sizes_are_refused(tmp_path, key, value):
    cfg = hybrid_config(**{key: value})
    path = write_checkpoint(tmp_path / "c", cfg, native_to_mamba_ssm(hybrid_native(True, torch.float32)), "bin")
    with pytest.raises(CheckpointError, match=key) as e:
        load_checkpoint(path)
    assert "\n" not in str(e.value)


def test_matmamba_keeps_its_mlp_and_attention_whole_when_extracted(tmp_path):
    """MatMamba nests only the Mamba2 inner width: at width 1/2 its GatedMLPs and MHA layers
    stay whole, so the submodel is the full model with half of every Mamba2 layer's heads."""
    from edgeseq.extract import extract

    d, P, N, k, H = 64, 2, 8, 4, 64  # MatMamba2: headdim = d_model // 32, expand 2 -> 64 heads
    config = ModelConfig.from_pattern(
        "M+ A+ M+", d_model=d, vocab_size=64, d_mlp=128,
        mamba=Mamba2Params(d_state=N, headdim=P, ngroups=1, chunk_size=8),
        attention=AttentionParams(n_heads=8, n_kv_heads=4, head_dim=8, rope_fraction=0.5, qkv_bias=True, out_bias=True),
    )  # fmt: skip
    native = random_model(config)
    attn = {"num_heads": 8, "num_heads_kv": 4, "head_dim": 8, "rotary_emb_dim": 4, "causal": True,
            "qkv_proj_bias": True, "out_proj_bias": True}  # fmt: skip
    cfg = mamba_ssm_config(d_model=d, n_layer=3, d_intermediate=100, attn_layer_idx=[1], attn_cfg=attn,
                           ssm_cfg={"layer": "MatMamba2", "headdim": P, "ngroups": 1, "chunk_size": 8, "d_state": N})  # fmt: skip
    model, metadata = load_checkpoint(write_checkpoint(tmp_path / "c", cfg, native_to_mamba_ssm(native), "bin"),
                                      dtype=torch.float64)  # fmt: skip
    assert metadata["ssm_layer"] == "MatMamba2" and model.config.nested_kinds == ("mamba2",)

    sub = extract(model, 0.5)

    def mamba_params(h: int) -> int:  # in_proj, conv1d (+bias), dt_bias/A_log/D, gated norm, out_proj
        return (2 * h * P + 2 * N + h) * d + (h * P + 2 * N) * (k + 1) + 3 * h + h * P + h * P * d

    removed = 2 * (mamba_params(H) - mamba_params(H // 2))
    assert sub.num_parameters() == model.num_parameters() - removed
    full_sd, sub_sd = model.state_dict(), sub.state_dict()
    for name in full_sd:
        if ".mlp." in name or name.startswith("layers.1."):
            assert torch.equal(sub_sd[name], full_sd[name]), name  # MLPs and the attention layer: whole
    ids = torch.randint(0, 64, (2, 21))
    with torch.no_grad():
        want = model(ids, width=0.5)[0]
        torch.testing.assert_close(sub(ids)[0], want, rtol=0, atol=1e-10)
        halved = native(ids, width=0.5)[0]  # edgeseq's own nesting halves MLPs and attention too
    assert (halved - want).abs().max() > 1e-2
