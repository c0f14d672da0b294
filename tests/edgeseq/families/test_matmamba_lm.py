"""MatMamba-LM checkpoints as released (config.json + pytorch_model.bin, a 50280-row tied vocabulary,
pure MatMamba2, no MLP) and as its trainer saves them (a DDP-wrapped state dict in a .pt, config given
with --config): detection, every MatMamba width against an upstream forward written out in plain torch,
extraction, and the warning for cutting a model never trained nested."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner, Result

from edgeseq.cli import main
from edgeseq.errors import CheckpointError, UsageError
from edgeseq.extract import extract
from edgeseq.families import detect_family, load_checkpoint
from edgeseq.families.mamba_ssm import MATMAMBA_WIDTHS, MambaSsm

D_MODEL, N_LAYER, D_STATE = 64, 2, 128  # MatMamba2's default d_state (released configs leave ssm_cfg empty)
HEADDIM = D_MODEL // 32  # MatMamba2 hard-codes it
D_INNER, N_HEADS, D_CONV = 2 * D_MODEL, 2 * D_MODEL // HEADDIM, 4
VOCAB, VOCAB_PADDED = 50277, 50280  # MambaConfig's defaults: 50277 padded to a multiple of 8
FAST = {"ssm_cfg": {"chunk_size": 8}}  # the numeric tests' one change: upstream's 256 costs seconds per forward


def cli(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), env={"COLUMNS": "160"})


# ---- checkpoints as MatMamba writes them -------------------------------------------------
def released_config(**over) -> dict:
    """``json.dump(MambaConfig(n_layer=2, d_model=64).__dict__)``, as MatMamba's save_pretrained writes it."""
    cfg = {"d_model": D_MODEL, "d_intermediate": 0, "n_layer": N_LAYER, "vocab_size": VOCAB, "ssm_cfg": {},
           "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True,
           "fused_add_norm": True, "pad_vocab_size_multiple": 8, "tie_embeddings": True}  # fmt: skip
    return cfg | over


def released_state(loud_rows: int = 0) -> dict[str, torch.Tensor]:
    """A MatMambaLMHeadModel state dict of random values (fp32); ``lm_head.weight`` is the
    embedding itself, as tie_weights leaves it. ``loud_rows`` embedding rows (ids 1..) are
    scaled up so that greedy decoding picks them."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()))

    def rand(*shape, scale=0.3):
        return torch.randn(*shape, generator=g) * scale

    emb = rand(VOCAB_PADDED, D_MODEL)
    emb[1 : 1 + loud_rows] *= 100
    sd = {"backbone.embedding.weight": emb}
    for i in range(N_LAYER):
        p = f"backbone.layers.{i}"
        sd |= {
            f"{p}.norm.weight": 1 + rand(D_MODEL, scale=0.1),
            f"{p}.mixer.in_proj.weight": rand(2 * D_INNER + 2 * D_STATE + N_HEADS, D_MODEL),  # [z, x, B, C, dt]
            f"{p}.mixer.conv1d.weight": rand(D_INNER + 2 * D_STATE, 1, D_CONV),
            f"{p}.mixer.conv1d.bias": rand(D_INNER + 2 * D_STATE),
            f"{p}.mixer.dt_bias": rand(N_HEADS, scale=1.0) - 2,
            f"{p}.mixer.A_log": torch.rand(N_HEADS, generator=g) * 1.5,
            f"{p}.mixer.D": rand(N_HEADS, scale=1.0),
            f"{p}.mixer.norm.weight": 1 + rand(D_INNER, scale=0.1),
            f"{p}.mixer.out_proj.weight": rand(D_MODEL, D_INNER),
        }
    sd["backbone.norm_f.weight"] = 1 + rand(D_MODEL, scale=0.1)
    sd["lm_head.weight"] = emb  # tied: the same tensor, as state_dict() returns it
    return sd


def write_released(path, state, config: dict | None = None):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config or released_config(**FAST), indent=4))
    torch.save(state, path / "pytorch_model.bin")
    return path


# ---- MatMambaLMHeadModel.forward(ids, mrl_level=...) in plain torch ------------------------
def upstream_logits(sd: dict[str, torch.Tensor], ids: torch.Tensor, mrl_level: int, eps=1e-5) -> torch.Tensor:
    """Logits (b, l, vocab) as MatMamba computes them at ``mrl_level``: every MatMamba2 layer keeps
    the first 2 * d_model / mrl_level channels of z and x (so the first heads of dt, A, D, the
    gated norm and out_proj), all of B and C; the recurrence is run one token at a time."""
    sd = {k: v.double() for k, v in sd.items()}
    K = 2 * (D_MODEL // mrl_level)  # MatMamba's 2 * dim_slice_idx
    H, N, (b, seq) = K // HEADDIM, D_STATE, ids.shape

    def rms(t, w):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps) * w

    x = sd["backbone.embedding.weight"][ids]  # (b, l, d)
    for i in range(N_LAYER):
        p = {k.split(f"layers.{i}.", 1)[1]: v for k, v in sd.items() if f".layers.{i}." in k}
        u = rms(x, p["norm.weight"])
        w_z, w_x, w_B, w_C, w_dt = p["mixer.in_proj.weight"].split([D_INNER, D_INNER, N, N, N_HEADS])
        z, xs, B, C, dt = (u @ w.T for w in (w_z[:K], w_x[:K], w_B, w_C, w_dt[:H]))
        conv_w, conv_b = p["mixer.conv1d.weight"], p["mixer.conv1d.bias"]
        conv_w, conv_b = torch.cat([conv_w[:K], conv_w[-2 * N :]]), torch.cat([conv_b[:K], conv_b[-2 * N :]])
        xBC = torch.cat([xs, B, C], -1).transpose(1, 2)  # (b, K + 2N, l)
        xBC = F.silu(F.conv1d(xBC, conv_w, conv_b, padding=D_CONV - 1, groups=K + 2 * N)[..., :seq]).transpose(1, 2)
        xs, B, C = xBC.split([K, N, N], -1)
        dt = F.softplus(dt + p["mixer.dt_bias"][:H])  # (b, l, h)
        A, D = -torch.exp(p["mixer.A_log"][:H]), p["mixer.D"][:H]
        X = xs.unflatten(-1, (H, HEADDIM))  # (b, l, h, p)
        h = torch.zeros(b, H, HEADDIM, N, dtype=torch.float64)
        ys = []
        for t in range(seq):
            dA = torch.exp(dt[:, t] * A)  # (b, h)
            h = h * dA[..., None, None] + torch.einsum("bh,bhp,bn->bhpn", dt[:, t], X[:, t], B[:, t])
            ys.append(torch.einsum("bhpn,bn->bhp", h, C[:, t]) + D[:, None] * X[:, t])
        y = torch.stack(ys, 1).flatten(-2)  # (b, l, K)
        y = rms(y * F.silu(z), p["mixer.norm.weight"][:K])  # gate, then normalise over the kept channels
        x = x + y @ p["mixer.out_proj.weight"][:, :K].T
    return rms(x, sd["backbone.norm_f.weight"]) @ sd["lm_head.weight"].T


# ---- 1. the released layout ----------------------------------------------------------------
@pytest.mark.parametrize("model_type", [None, "mamba2", "mamba", "matmamba"])
def test_released_layout_is_detected_and_read(tmp_path, model_type):
    """A model_type tag (hub uploads add one) must not hand the directory to an HF family."""
    config = released_config() | ({"model_type": model_type} if model_type else {})
    path = write_released(tmp_path / "lm", released_state(), config)
    assert detect_family(path) is MambaSsm
    model, metadata = load_checkpoint(path)
    c = model.config
    assert (c.vocab_size, metadata["vocab_size_unpadded"], c.tie_embeddings) == (VOCAB_PADDED, VOCAB, True)
    assert metadata["ssm_layer"] == "MatMamba2" and c.d_mlp == 0
    assert (c.mamba.headdim, c.mamba.d_state, c.mamba.ngroups) == (HEADDIM, D_STATE, 1)
    assert c.nested_widths == MATMAMBA_WIDTHS and c.nested_kinds == ("mamba2",)


def test_every_width_matches_matmamba_at_its_mrl_level(tmp_path):
    state = released_state()
    model, _ = load_checkpoint(write_released(tmp_path / "lm", state), dtype=torch.float64)
    ids = torch.randint(0, VOCAB_PADDED, (2, 11))  # not a multiple of the chunk size
    for level in (1, 2, 4, 8):
        with torch.no_grad():
            ours = model(ids, width=1 / level)[0]
        err = (ours - upstream_logits(state, ids, level)).abs().max().item()
        assert err <= 1e-9, f"width 1/{level}: max |edgeseq - upstream| = {err:.3g}"


def test_extracted_half_equals_the_full_model_at_half(tmp_path):
    """fp32, as the brief fixes: extract(0.5) against the full model run at width 0.5."""
    model, _ = load_checkpoint(write_released(tmp_path / "lm", released_state()))
    sub = extract(model, 0.5)
    assert sub.num_parameters() < model.num_parameters()
    ids = torch.randint(0, VOCAB_PADDED, (2, 13))
    with torch.no_grad():
        err = (sub(ids)[0] - model(ids, width=0.5)[0]).abs().max().item()
    assert err <= 1e-5, f"max |extracted - full at 0.5| = {err:.3g}"


def test_cli_extract_of_matmamba_is_a_trained_width(tmp_path):
    """MatMamba was trained at 1/2: extracting it warns of nothing, and the saved submodel
    gives the full model's width-1/2 logits."""
    path = write_released(tmp_path / "lm", released_state())
    result = cli("extract", str(path), "--width", "0.5", "-o", str(tmp_path / "half"))
    assert result.exit_code == 0, result.output
    assert "warning" not in result.stderr
    full, _ = load_checkpoint(path)
    half, _ = load_checkpoint(tmp_path / "half")
    ids = torch.randint(0, VOCAB_PADDED, (1, 11))
    with torch.no_grad():
        err = (half(ids)[0] - full(ids, width=0.5)[0]).abs().max().item()
    assert err <= 1e-5


# ---- 2. training checkpoints: one .pt, config apart -----------------------------------------
WRAPPINGS = {
    "ddp": lambda sd: {f"module.{k}": v for k, v in sd.items()},
    "ddp+compile": lambda sd: {f"module._orig_mod.{k}": v for k, v in sd.items()},
    "compile": lambda sd: {f"_orig_mod.{k}": v for k, v in sd.items()},
    "ddp-in-dict": lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}, "step": 1200,
                               "optimizer": {"state": {0: {"exp_avg": torch.zeros(2)}}, "param_groups": []}},
}  # fmt: skip


@pytest.mark.parametrize("wrapping", list(WRAPPINGS))
def test_training_checkpoint_loads_with_config(tmp_path, wrapping):
    state = released_state()
    released = write_released(tmp_path / "lm", state)
    pt = tmp_path / "run" / "best_model_mat_True_130m.pt"
    pt.parent.mkdir()
    torch.save(WRAPPINGS[wrapping](state), pt)
    model, metadata = load_checkpoint(pt, config=released / "config.json")
    assert metadata["config_file"] == str((released / "config.json").resolve())
    want, _ = load_checkpoint(released)
    got, exp = model.state_dict(), want.state_dict()
    assert got.keys() == exp.keys() and all(torch.equal(got[k], exp[k]) for k in exp)


def test_training_checkpoint_through_the_cli(tmp_path):
    state = released_state()
    config = tmp_path / "matmamba.json"
    config.write_text(json.dumps(released_config(**FAST)))
    pt = tmp_path / "best_model.pt"
    torch.save({f"module.{k}": v for k, v in state.items()}, pt)

    result = cli("inspect", str(pt), "--config", str(config), "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["format"] == "mamba_ssm" and doc["nested_widths"] == list(MATMAMBA_WIDTHS)

    result = cli("extract", str(pt), "--config", str(config), "--width", "0.25", "-o", str(tmp_path / "q"))
    assert result.exit_code == 0, result.output
    quarter, _ = load_checkpoint(tmp_path / "q")
    ids = torch.randint(0, VOCAB_PADDED, (1, 7))
    with torch.no_grad():
        err = (quarter(ids)[0].double() - upstream_logits(state, ids, 4)).abs().max().item()
    assert err <= 1e-4  # fp32 against the fp64 upstream forward

    without = cli("inspect", str(pt))
    assert without.exit_code == 2 and "--config" in without.stderr and without.stdout == ""


def test_bundle_of_a_training_checkpoint_rebuilds_its_reference(tmp_path):
    """export --config records the config in the manifest, so validation finds the source again."""
    from edgeseq.deploy.bundle import read_manifest
    from edgeseq.deploy.validation import reference_model

    config = tmp_path / "matmamba.json"
    config.write_text(json.dumps(released_config(**FAST)))
    pt = tmp_path / "best_model.pt"
    torch.save({f"module.{k}": v for k, v in released_state().items()}, pt)
    out = tmp_path / "bundle"
    args = ["--model", str(pt), "--config", str(config), "--width", "0.5", "--flavor", "portable", "--no-validate"]
    result = cli("export", *args, "-o", str(out))
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    assert manifest["reference"]["config"] == str(config.resolve())
    reference, _ = reference_model(out, manifest, "cpu")
    full, _ = load_checkpoint(pt, config=config)
    ids = torch.randint(0, VOCAB_PADDED, (1, 9))
    with torch.no_grad():
        assert torch.equal(reference(ids)[0], extract(full, 0.5)(ids)[0])


def test_config_for_a_format_that_keeps_its_own_is_refused(tmp_path):
    native = tmp_path / "native.json"
    native.write_text(json.dumps({"format": "edgeseq", "d_model": 32, "n_layer": 2}))
    pt = tmp_path / "w.pt"
    torch.save({"x": torch.zeros(1)}, pt)
    with pytest.raises(UsageError, match="--config works for format mamba_ssm only") as e:
        load_checkpoint(pt, config=native)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "payload, match",
    [
        (
            {"model": {"a.weight": torch.zeros(1)}, "state_dict": {"a.weight": torch.zeros(1)}},
            "both model and state_dict",
        ),
        ({"ema": {"a.weight": torch.zeros(1)}, "step": 3}, r"no flat state dict .*\['ema', 'step'\]"),
        ([torch.zeros(1)], "a list"),
    ],
)
def test_unreadable_training_checkpoints_are_refused(tmp_path, payload, match):
    config = tmp_path / "c.json"
    config.write_text(json.dumps(released_config()))
    torch.save(payload, tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match=match) as e:
        load_checkpoint(tmp_path / "w.pt", config=config)
    assert "\n" not in str(e.value)


# ---- 3. cutting a model never trained nested warns, and says how to measure the cost -------
def assert_untrained_warning(text: str, model: str, asked: str = "0.5") -> None:
    flat = " ".join(text.split())  # rich wraps long lines
    assert "not trained nested" in flat, text
    assert f"edgeseq eval {model} --width 1 --width {asked}" in flat, text


def test_extracting_plain_mamba2_warns(tmp_path):
    """The same tensors read as mamba_ssm's Mamba2 (ssm_cfg.layer "Mamba2"): never trained nested."""
    config = released_config(ssm_cfg={"layer": "Mamba2", "headdim": HEADDIM, "chunk_size": 8})
    path = write_released(tmp_path / "plain", released_state(), config)
    model, metadata = load_checkpoint(path)
    assert metadata["ssm_layer"] == "Mamba2" and model.config.nested_widths == (1.0,)
    result = cli("extract", str(path), "--width", "0.5", "-o", str(tmp_path / "half"))
    assert result.exit_code == 0, result.output
    assert_untrained_warning(result.stderr, str(path))


def test_exporting_half_of_an_hf_model_warns(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Mamba2Config(vocab_size=64, hidden_size=32, num_hidden_layers=2, state_size=8, head_dim=4,
                                    num_heads=16, n_groups=1, expand=2, chunk_size=8, tie_word_embeddings=True)  # fmt: skip
    hf = tmp_path / "hf"
    transformers.Mamba2ForCausalLM(cfg).save_pretrained(hf)
    out = tmp_path / "bundle"
    result = cli(
        "export", "--model", str(hf), "--width", "0.5", "--flavor", "portable", "--no-validate", "-o", str(out)
    )
    assert result.exit_code == 0, result.output
    assert_untrained_warning(result.stdout, str(hf))
    assert (out / "manifest.json").is_file()


# ---- 4. generate through the checkpoint's tokenizer ---------------------------------------
WORDS = ["Ġthe", "Ġworld", "Ġnested", "Ġmamba", "Ġwidth"]  # byte-level BPE tokens (Ġ: a leading space)


def write_tokenizer(path):
    """A byte-level BPE tokenizer.json (GPT-2's kind, whose ids MatMamba-LM was trained on) of under 300 ids:
    far fewer than the model's 50280 rows, as padded vocabularies have."""
    tokenizers = pytest.importorskip("tokenizers")
    tk = tokenizers.Tokenizer(tokenizers.models.BPE())
    tk.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tk.train_from_iterator(["hello world, the nested mamba width"] * 50, trainer=trainer)
    tk.save(str(path / "tokenizer.json"))
    return tk


def test_generate_prints_text_through_the_tokenizer(tmp_path):
    from edgeseq.generate import generate
    from edgeseq.tokenizer import load_tokenizer

    state = released_state()
    path = write_released(tmp_path / "lm", state)
    tk = write_tokenizer(path)
    words = [tk.token_to_id(w) for w in WORDS]
    state["backbone.embedding.weight"][words] *= 100  # greedy decoding picks these rows (the head is tied)
    torch.save(state, path / "pytorch_model.bin")
    prompt = "hello world"
    result = cli("generate", "--model", str(path), "--prompt", prompt, "-n", "6", "--temperature", "0", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)

    model, _ = load_checkpoint(path)
    tokenizer = load_tokenizer(path)
    ids = list(generate(model, prompt, 6, temperature=0, tokenizer=tokenizer))
    assert len(ids) == doc["new_tokens"] == 6 and set(ids) <= set(words), ids
    assert doc["text"] == tk.decode(ids) and doc["text"].split() == [tk.id_to_token(i)[1:] for i in ids]

    plain = cli("generate", "--model", str(path), "--prompt", prompt, "-n", "6", "--temperature", "0")
    assert plain.exit_code == 0, plain.output
    assert plain.stdout == prompt + doc["text"] + "\n"


def test_ids_past_the_tokenizer_decode_to_nothing(tmp_path):
    """A model of 50280 ids may sample one the tokenizer lacks: decoding skips it, no error."""
    from edgeseq.tokenizer import load_tokenizer

    tk = write_tokenizer(tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    tokenizer.check_vocab(VOCAB_PADDED)  # its ids fit a 50280-row model
    the, world, nested = (tk.token_to_id(w) for w in ("Ġthe", "Ġworld", "Ġnested"))
    ids = [the, VOCAB_PADDED - 1, world, tokenizer.vocab_size, nested]
    decoder = tokenizer.stream_decoder()
    text = "".join(decoder.step(i) for i in ids) + decoder.flush()
    assert text == tokenizer.decode(ids) == " the world nested"


@pytest.mark.slow
def test_export_for_jetson_validates(tmp_path):
    """The released layout (50280-row tied vocabulary) as the everyday command exports it:
    fp16 portable graphs, every graph judged against the PyTorch reference."""
    source = write_released(tmp_path / "lm", released_state(), released_config(**FAST))
    out = tmp_path / "bundle"
    result = cli("export", "--model", str(source), "--target", "jetson", "--width", "1", "-o", str(out))
    assert result.exit_code == 0, result.output
    validation = json.loads((out / "manifest.json").read_text())["validation"]
    print(f"matmamba-lm jetson export: {validation['summary']}")
    assert "portable" in validation["ran"], validation
