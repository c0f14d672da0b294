"""Checkpoint family: mamba_ssm's ``MambaLMHeadModel``, and MatMamba's, which shares its names.

A directory holds ``config.json`` (a ``MambaConfig``: d_model, n_layer, ssm_cfg, attn_cfg, ...)
and its weights in ``model.safetensors`` or ``pytorch_model.bin``, a pickle read without running
its code (``edgeseq.families.state_dicts``).

Training checkpoints are read too: one weights file (MatMamba's trainer writes
``best_model_*.pt``: DistributedDataParallel's ``module.`` before every key) with its config
given apart (``config=FILE``, the CLI's ``--config``). The wrapper's prefixes are dropped, and a
state dict saved inside a dict (``{"model": ..., "optimizer": ..., "step": ...}``) is read from
under its key.

A config.json is recognised by its structure (an ``ssm_cfg`` block, no HF ``hidden_size``), and
before the HF families, so that a ``model_type`` tag added to it (hub uploads do) does not hand
it to a family that matches on model_type alone.

How upstream maps onto edgeseq:

- Mamba2 mixers keep their names and layout ([z, x, B, C, dt] rows of ``in_proj``).
- MHA layers split ``in_proj`` rows into q, k, v, in that order, and rename ``out_proj`` to
  ``o_proj``. ``rotary_emb_dim`` becomes ``rope_fraction = rotary_emb_dim / head_dim``: both
  rotate halves (not interleaved pairs) of the leading channels. mamba_ssm attention has no
  window, so every attention layer is global with edgeseq's default cache length.
- GatedMLP computes ``y, gate = fc1(x).chunk(2); fc2(y * silu(gate))``: the first half of
  ``fc1`` is ``up_proj``, the second ``gate_proj``; ``fc2`` is ``down_proj``.
- The weights fix what upstream derives: the vocabulary is the padded one
  (``pad_vocab_size_multiple``), the MLP width is ``d_intermediate`` as GatedMLP rounded it
  (up to a multiple of 128), and a MatMamba2 head has d_model // 32 channels whatever
  ``ssm_cfg.headdim`` says (MatMamba2 hard-codes it).
- ``residual_in_fp32`` and ``fused_add_norm`` only change rounding; edgeseq keeps the residual
  in the parameters' dtype.
- Refused, naming the option: Mamba1 layers, LayerNorm (``rms_norm: false``), an ungated or
  norm-before-gate Mamba2 norm, ``d_ssm`` != d_inner, per-channel D, MHA with a conv or fused
  MLP, non-causal MHA, a custom softmax scale, interleaved rotary.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from edgeseq.config import LayerSpec, ModelConfig
from edgeseq.errors import CheckpointError
from edgeseq.families.base import Family, lookup, peek_json, read_json, read_safetensors, register
from edgeseq.families.state_dicts import load_pickled, strip_wrapper_prefixes
from edgeseq.kinds import get_kind
from edgeseq.kinds.attention import ATTENTION, AttentionParams
from edgeseq.kinds.mamba2 import MAMBA2, Mamba2Params

NATIVE_TAG = "edgeseq"  # native config.json carries {"format": "edgeseq"}
MATMAMBA_WIDTHS = (1.0, 0.5, 0.25, 0.125)  # MatMamba's trained mrl levels 1, 2, 4, 8

# Keys the upstream constructors accept (MatMamba2 adds proj_drop_rate); any other key makes
# upstream itself fail, so it is refused rather than guessed at.
SSM_KEYS = {
    "layer", "d_state", "d_conv", "conv_init", "expand", "headdim", "d_ssm", "ngroups", "A_init_range",
    "D_has_hdim", "rmsnorm", "norm_before_gate", "dt_min", "dt_max", "dt_init_floor", "dt_limit", "bias",
    "conv_bias", "chunk_size", "use_mem_eff_path", "proj_drop_rate", "process_group", "sequence_parallel",
}  # fmt: skip
ATTN_KEYS = {
    "num_heads", "num_heads_kv", "head_dim", "mlp_dim", "qkv_proj_bias", "out_proj_bias", "softmax_scale",
    "causal", "d_conv", "rotary_emb_dim", "rotary_emb_base", "rotary_emb_interleaved",
}  # fmt: skip


@dataclass(frozen=True)
class _Layout:
    """What renaming needs beyond a tensor's name: which layers are MHA and their q/k/v rows."""

    attention_layers: frozenset[int]
    q_rows: int = 0
    kv_rows: int = 0


@register
class MambaSsm(Family):
    name = "mamba_ssm"
    description = "mamba_ssm / MatMamba MambaLMHeadModel (config.json + pytorch_model.bin or model.safetensors)"
    reads_config_file = True
    detect_order = -1  # its configs are known by structure; HF families match on model_type alone

    @classmethod
    def detect(cls, path: Path) -> bool:
        return is_mamba_ssm_config(peek_json(path))

    @classmethod
    def read(cls, path: Path, config: Path | None = None):
        if config is None and not path.is_dir():
            raise CheckpointError(f"{path} is not a directory; give the checkpoint directory, or --config FILE with it")
        config_file = path / "config.json" if config is None else config
        raw = read_json(config_file)
        if not isinstance(raw, dict):
            raise CheckpointError(f"{config_file} must hold a JSON object; regenerate it")
        tensors = load_weights(path)
        model_config, layout, metadata = _config(raw, tensors)
        if config is not None:  # a bundle's manifest records it, so the reference can be rebuilt
            metadata["config_file"] = str(config.resolve())
        renamed = (pair for name, t in tensors.items() for pair in rename(name, t, layout))
        return model_config, renamed, metadata


def is_mamba_ssm_config(raw: dict[str, Any] | None) -> bool:
    """Whether a config.json is a mamba_ssm ``MambaConfig``: json.dump of its fields always has
    an ``ssm_cfg`` block. HF configs have ``hidden_size`` (XLNet's have none, but say d_model and
    n_layer too, so those alone count only without a model_type); native ones a format tag."""
    if raw is None or raw.get("format") == NATIVE_TAG or "hidden_size" in raw:
        return False
    if isinstance(raw.get("ssm_cfg"), dict):
        return True
    return "model_type" not in raw and "d_model" in raw and "n_layer" in raw


def rename(name: str, t: Tensor, layout: _Layout) -> Iterator[tuple[str, Tensor]]:
    """One mamba_ssm tensor -> its native tensors. Unknown names pass through unchanged,
    so that ``build_model`` reports them as unexpected."""
    if name in ("backbone.embedding.weight", "backbone.norm_f.weight"):
        yield name.removeprefix("backbone."), t
        return
    m = re.fullmatch(r"backbone\.layers\.(\d+)\.(.+)", name)
    if m is None:
        yield name, t  # lm_head.weight keeps its name
        return
    i, rest = int(m[1]), m[2]
    layer = f"layers.{i}"
    if rest == "norm2.weight":
        yield f"{layer}.mlp_norm.weight", t
    elif rest == "mlp.fc1.weight":
        up, gate = t.chunk(2, dim=0)  # rows are [value; gate]
        yield f"{layer}.mlp.up_proj.weight", up
        yield f"{layer}.mlp.gate_proj.weight", gate
    elif rest == "mlp.fc2.weight":
        yield f"{layer}.mlp.down_proj.weight", t
    elif i in layout.attention_layers and rest in ("mixer.in_proj.weight", "mixer.in_proj.bias"):
        rows = (layout.q_rows, layout.kv_rows, layout.kv_rows)
        if t.size(0) != sum(rows):
            raise CheckpointError(
                f"tensor {name} has {t.size(0)} rows but attn_cfg implies {sum(rows)} (q, k, v); "
                "fix attn_cfg in config.json or re-export the checkpoint"
            )
        kind = rest.rsplit(".", 1)[1]
        for proj, part in zip(("q_proj", "k_proj", "v_proj"), t.split(rows, dim=0)):
            yield f"{layer}.mixer.{proj}.{kind}", part
    elif i in layout.attention_layers and rest.startswith("mixer.out_proj."):
        yield f"{layer}.mixer.o_proj.{rest.rsplit('.', 1)[1]}", t
    else:
        yield f"{layer}.{rest}", t  # norm.weight and every Mamba2 mixer tensor


# ---- weights ---------------------------------------------------------------------------
def load_weights(path: Path) -> dict[str, Tensor]:
    """The state dict of a weights file, or of a directory's model.safetensors (else its
    pytorch_model.bin), pickles read without running their code; wrapper prefixes dropped."""
    if path.is_file():
        file = path
    elif (path / "model.safetensors").is_file():
        file = path / "model.safetensors"
    elif (path / "pytorch_model.bin").is_file():
        file = path / "pytorch_model.bin"
    else:
        raise CheckpointError(f"{path} has neither model.safetensors nor pytorch_model.bin; put the weights there")
    tensors = read_safetensors(file) if file.suffix == ".safetensors" else load_pickled(file)
    return strip_wrapper_prefixes(tensors)


# ---- config ----------------------------------------------------------------------------
def _unsupported(option: str, value: Any, need: str) -> CheckpointError:
    return CheckpointError(f"config.json sets {option}={value!r}, which edgeseq cannot run; use one with {need}")


def _config(raw: dict[str, Any], tensors: dict[str, Tensor]) -> tuple[ModelConfig, _Layout, dict[str, Any]]:
    ssm = dict(lookup(raw, "ssm_cfg", default=None) or {})
    attn = dict(lookup(raw, "attn_cfg", default=None) or {})
    for where, cfg, known in (("ssm_cfg", ssm, SSM_KEYS), ("attn_cfg", attn, ATTN_KEYS)):
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise CheckpointError(f"config.json {where} has unknown keys {unknown}; known keys are {sorted(known)}")
    d_model = lookup(raw, "d_model", "hidden_size")
    n_layer = lookup(raw, "n_layer", "num_hidden_layers")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (d_model, n_layer)):
        raise CheckpointError(f"config.json d_model {d_model!r}, n_layer {n_layer!r} must be integers ≥ 1; fix them")
    attn_idx = lookup(raw, "attn_layer_idx", default=None) or []
    if not isinstance(attn_idx, list) or not all(isinstance(i, int) and 0 <= i < n_layer for i in attn_idx):
        raise CheckpointError(f"config.json attn_layer_idx {attn_idx} must list layers in [0, {n_layer}); fix it")
    if not lookup(raw, "rms_norm", default=True):
        raise _unsupported("rms_norm", False, "rms_norm=true (edgeseq norms are RMSNorm)")
    if lookup(raw, "bidirectional", default=False):
        raise _unsupported("bidirectional", True, "a causal (unidirectional) model")
    mamba_idx = [i for i in range(n_layer) if i not in attn_idx]
    layer_kind = _ssm_layer(ssm, tensors, mamba_idx)
    mamba = _mamba_params(ssm, d_model, layer_kind) if mamba_idx else Mamba2Params()
    attention = _attention_params(attn, d_model) if attn_idx else None
    vocab, vocab_unpadded = _vocab(raw, tensors)
    d_mlp = _d_mlp(raw, tensors)
    layers = tuple(
        LayerSpec.of(ATTENTION.name if i in attn_idx else MAMBA2.name, mlp=d_mlp > 0) for i in range(n_layer)
    )
    try:
        config = ModelConfig(
            d_model=d_model,
            n_layer=n_layer,
            vocab_size=vocab,
            layers=layers,
            mamba=mamba,
            attention=attention,
            d_mlp=d_mlp,
            tie_embeddings=bool(lookup(raw, "tie_embeddings", default=True)),
            norm_eps=lookup(raw, "norm_epsilon", "layer_norm_epsilon", default=1e-5),
        )
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"config.json holds a malformed value ({e}); fix it") from None
    if layer_kind == "MatMamba2":  # MatMamba nests the Mamba2 inner width only, never MLPs or attention
        config = config.replace(nested_kinds=(MAMBA2.name,))
        config = config.replace(nested_widths=_whole_widths(config, MATMAMBA_WIDTHS))
    else:
        config = config.replace(nested_widths=(1.0,))
    layout = _Layout(frozenset(attn_idx))
    if attention is not None:
        a = attention
        layout = _Layout(frozenset(attn_idx), q_rows=a.n_heads * a.head_dim, kv_rows=a.n_kv_heads * a.head_dim)
    return config, layout, {"vocab_size_unpadded": vocab_unpadded, "ssm_layer": layer_kind}


def _ssm_layer(ssm: dict[str, Any], tensors: dict[str, Tensor], mamba_idx: list[int]) -> str | None:
    """ "Mamba2" or "MatMamba2" (None without SSM layers). Without a "layer" key mamba_ssm
    builds Mamba1 and MatMamba builds MatMamba2; the weights tell which (Mamba2 has dt_bias)."""
    kind = ssm.pop("layer", None)
    if not mamba_idx:
        return None
    if kind is None:
        if f"backbone.layers.{mamba_idx[0]}.mixer.dt_bias" not in tensors:
            raise CheckpointError(
                "config.json has no ssm_cfg.layer and the weights are Mamba1, which edgeseq cannot run; "
                'use a Mamba2 checkpoint (ssm_cfg.layer "Mamba2")'
            )
        kind = "MatMamba2"
    if kind not in ("Mamba2", "MatMamba2"):
        raise _unsupported("ssm_cfg.layer", kind, 'ssm_cfg.layer "Mamba2" (edgeseq runs Mamba2 layers only)')
    return kind


def _mamba_params(ssm: dict[str, Any], d_model: int, kind: str) -> Mamba2Params:
    for option, ok, need in (
        ("rmsnorm", True, "ssm_cfg.rmsnorm=true (the gated RMSNorm)"),
        ("norm_before_gate", False, "ssm_cfg.norm_before_gate=false (edgeseq gates, then normalises)"),
        ("D_has_hdim", False, "ssm_cfg.D_has_hdim=false (one D per head)"),
    ):
        value = ssm.get(option, ok)
        if value != ok:
            raise _unsupported(f"ssm_cfg.{option}", value, need)
    expand = ssm.get("expand", 2)
    d_ssm = ssm.get("d_ssm")
    if d_ssm is not None and d_ssm != expand * d_model:
        raise _unsupported("ssm_cfg.d_ssm", d_ssm, f"d_ssm unset or equal to d_inner ({expand * d_model})")
    ngroups = ssm.get("ngroups", 1)
    if kind == "MatMamba2" and ngroups != 1:
        raise _unsupported("ssm_cfg.ngroups", ngroups, "ngroups=1 (MatMamba2 slices B and C as one group)")
    if kind == "MatMamba2" and expand != 2:
        raise _unsupported("ssm_cfg.expand", expand, "expand=2 (MatMamba2 slices 2 * d_model inner channels)")
    headdim = d_model // 32 if kind == "MatMamba2" and isinstance(d_model, int) else ssm.get("headdim", 64)
    return Mamba2Params(
        d_state=ssm.get("d_state", 128),
        headdim=headdim,
        ngroups=ngroups,
        expand=expand,
        d_conv=ssm.get("d_conv", 4),
        chunk_size=ssm.get("chunk_size", 256),
        dt_min=ssm.get("dt_min", 0.001),
        dt_max=ssm.get("dt_max", 0.1),
        dt_limit=_dt_limit(ssm.get("dt_limit", (0.0, math.inf))),
        conv_bias=bool(ssm.get("conv_bias", True)),
        proj_bias=bool(ssm.get("bias", False)),
    )


def _dt_limit(value: Any) -> tuple[float, float]:
    try:
        lo, hi = value
        return float(lo), math.inf if hi is None else float(hi)
    except (TypeError, ValueError):
        raise CheckpointError(f"config.json ssm_cfg.dt_limit {value!r} must be [low, high]; fix it") from None


def _attention_params(attn: dict[str, Any], d_model: int) -> AttentionParams:
    if "num_heads" not in attn:
        raise CheckpointError("config.json attn_cfg lacks num_heads; add it (attention layers need it)")
    n_heads = attn["num_heads"]
    head_dim = attn.get("head_dim") or (d_model // n_heads if isinstance(n_heads, int) and n_heads > 0 else 0)
    rules = (
        ("d_conv", 0, "attn_cfg.d_conv=0 (no conv before attention)"),
        ("mlp_dim", 0, "attn_cfg.mlp_dim=0 (no MLP fused into in_proj)"),
        ("causal", True, "attn_cfg.causal=true (MHA defaults to non-causal)"),
        ("rotary_emb_interleaved", False, "attn_cfg.rotary_emb_interleaved=false"),
    )
    defaults = {"d_conv": 0, "mlp_dim": 0, "causal": False, "rotary_emb_interleaved": False}
    for option, ok, need in rules:
        value = attn.get(option, defaults[option])
        if value != ok:
            raise _unsupported(f"attn_cfg.{option}", value, need)
    scale = attn.get("softmax_scale")
    if scale is not None and not (head_dim and math.isclose(scale, head_dim**-0.5, rel_tol=1e-6)):
        raise _unsupported("attn_cfg.softmax_scale", scale, "softmax_scale unset (1/sqrt(head_dim))")
    rot = attn.get("rotary_emb_dim", 0)
    return AttentionParams(
        n_heads=n_heads,
        n_kv_heads=attn.get("num_heads_kv") or n_heads,
        head_dim=head_dim,
        rope_theta=float(attn.get("rotary_emb_base", 10000.0)),
        rope_fraction=rot / head_dim if head_dim else 0.0,
        qkv_bias=bool(attn.get("qkv_proj_bias", True)),
        out_bias=bool(attn.get("out_proj_bias", True)),
    )


def _vocab(raw: dict[str, Any], tensors: dict[str, Tensor]) -> tuple[int, int]:
    """(padded vocab from the weights, vocab_size from config.json)."""
    emb = tensors.get("backbone.embedding.weight")
    if emb is None or emb.dim() != 2:
        raise CheckpointError("checkpoint lacks a 2-D backbone.embedding.weight; re-export it from MambaLMHeadModel")
    vocab, multiple = lookup(raw, "vocab_size"), lookup(raw, "pad_vocab_size_multiple", default=1)
    if not (isinstance(vocab, int) and isinstance(multiple, int) and vocab > 0 and multiple > 0):
        raise CheckpointError(
            f"config.json vocab_size {vocab!r}, pad_vocab_size_multiple {multiple!r} must be integers ≥ 1; fix them"
        )
    padded = -(-vocab // multiple) * multiple
    if emb.size(0) != padded:
        raise CheckpointError(
            f"backbone.embedding.weight has {emb.size(0)} rows but vocab_size {vocab} padded to a multiple of "
            f"{multiple} is {padded}; fix vocab_size or pad_vocab_size_multiple in config.json"
        )
    return padded, vocab


def _d_mlp(raw: dict[str, Any], tensors: dict[str, Tensor]) -> int:
    """GatedMLP hidden size as stored (upstream rounds d_intermediate up), 0 for none."""
    d_intermediate = lookup(raw, "d_intermediate", default=0) or 0
    if d_intermediate == 0:
        return 0
    fc1 = next((t for n, t in tensors.items() if n.endswith(".mlp.fc1.weight")), None)
    if fc1 is None:
        raise CheckpointError(f"config.json has d_intermediate={d_intermediate} but no MLP weights exist; fix it")
    return fc1.size(0) // 2


def _whole_widths(config: ModelConfig, widths: tuple[float, ...]) -> tuple[float, ...]:
    """Those of ``widths`` that keep a whole number of every layer's nesting units."""
    units = {
        get_kind(part).units(config, i, config.part_size(i, part))[0]
        for i, spec in enumerate(config.layers) for part in spec.parts if config.is_nested(part)
    }  # fmt: skip
    return tuple(w for w in widths if all(w * u >= 1 and float(w * u).is_integer() for u in units)) or (1.0,)
