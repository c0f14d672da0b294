"""Hugging Face ``FalconH1ForCausalLM`` checkpoints: read only (format ``hf_falcon_h1``).

A directory with ``config.json`` (``model_type`` "falcon_h1") and ``model.safetensors``
or shards, as ``save_pretrained`` writes them. Falcon-H1 (TII) runs attention and Mamba2
side by side in every block: edgeseq's parallel mixers, ``LayerSpec.of("attention",
"mamba2", mlp=True)``. Checked against transformers' ``modeling_falcon_h1.py`` (5.x):

- block: x = input_layernorm(h); h += mamba(x) + attention(x); h += feed_forward(
  pre_ff_layernorm(h)), all RMSNorms with ``rms_norm_eps`` (the Mamba2 gated norm too);
- Mamba2: HF Mamba2's layout (in_proj rows [z | x | B | C | dt], conv over [x | B | C]),
  inner width ``mamba_d_ssm`` (or ``mamba_expand * hidden_size``) split into
  ``mamba_n_heads`` heads of ``mamba_d_head``; with ``mamba_rms_norm`` the output is
  RMSNorm(y * silu(z)) over ``mamba_n_groups`` groups (``mamba_norm_before_gate`` false),
  edgeseq's gated norm; without it (HF's default) y * silu(z), ``mamba.rmsnorm`` false. ``mamba_proj_bias`` puts a bias on in_proj, ``projectors_bias``
  on out_proj; where only one is set the other gets a zero bias (edgeseq has one switch);
- attention: GQA, scores scaled by head_dim^-1/2 (``head_dim`` or hidden_size / heads),
  RoPE over the whole head (halves rotated); ``attention_bias`` biases q, k, v and o;
- MLP: down(silu(gate(x)) * up(x)).

The μP multipliers are folded into the weights, so the model is plain edgeseq math:

- ``embedding_multiplier``: into the embedding table; with a tied head the table is
  shared, so it becomes ``ModelConfig.embedding_scale`` (the lookup is scaled) instead;
- ``lm_head_multiplier``: into the final norm's weight (logits are linear in it);
- ``ssm_in_multiplier``: into in_proj's weight (not its bias: it scales the input);
- ``ssm_multipliers`` [z, x, B, C, dt]: into in_proj's rows of each segment, weight and
  bias (HF multiplies in_proj's output by this per-row vector);
- ``ssm_out_multiplier``: into out_proj's weight and bias;
- ``attention_in_multiplier``: into q_proj, k_proj and v_proj weights (not biases);
- ``key_multiplier``: into k_proj's weight and bias (it scales k before RoPE, a rotation);
- ``attention_out_multiplier``: into o_proj's weight and bias;
- ``mlp_multipliers`` [gate, down]: into gate_proj's and down_proj's weights.

Departures from transformers:

- the folds change rounding: identical math, errors at fp32 rounding level; in bf16 HF
  rounds the unscaled products, edgeseq the scaled weights (folded in fp32 first);
- HF's single-token path does not clamp dt to ``time_step_limit``, its prefill does;
  edgeseq clamps in both (identical for the default (0, inf));
- ``attention.max_context`` is ``max_position_embeddings`` capped at ``MAX_CONTEXT``
  (as for Bamba); a longer stream raises ConfigError.

Refused with a CheckpointError: ``mamba_norm_before_gate`` true with the norm (RMSNorm(y) * silu(z)), RoPE types other
than "default", ``mlp_bias``, activations other than silu.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from edgeseq.config import LayerSpec, ModelConfig
from edgeseq.errors import CheckpointError
from edgeseq.families.base import Family, lookup, read_json, register
from edgeseq.families.hf_bamba import MAX_CONTEXT, _rope
from edgeseq.families.hf_mamba2 import (
    Rules,
    check_silu,
    is_hf_dir,
    read_dt_limit,
    read_tensors,
    renamed,
    shard_files,
)
from edgeseq.kinds.attention import ATTENTION, AttentionParams
from edgeseq.kinds.mamba2 import MAMBA2, Mamba2Params

ATTN, SSM = f"mixers.{ATTENTION.name}", f"mixers.{MAMBA2.name}"  # where a block keeps its parallel mixers

NAMES: Rules = tuple(
    (re.compile(pattern), native)
    for pattern, native in (
        (r"model\.embed_tokens\.weight", "embedding.weight"),
        (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"layers.\1.norm.weight"),
        (r"model\.layers\.(\d+)\.pre_ff_layernorm\.weight", r"layers.\1.mlp_norm.weight"),
        (r"model\.layers\.(\d+)\.feed_forward\.(\w+_proj\.weight)", r"layers.\1.mlp.\2"),
        (r"model\.layers\.(\d+)\.mamba\.(.+)", rf"layers.\1.{SSM}.\2"),
        (r"model\.layers\.(\d+)\.self_attn\.(.+)", rf"layers.\1.{ATTN}.\2"),
        (r"model\.final_layernorm\.weight", "norm_f.weight"),
        (r"lm_head\.weight", "lm_head.weight"),
    )
)


# ---- multipliers ----------------------------------------------------------------------
def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise CheckpointError(f"config.json {where} holds {value!r}, not a finite number; fix it")
    return float(value)


def _multiplier(raw: dict[str, Any], key: str) -> float:
    return _number(raw.get(key, 1.0), key)


def _multipliers(raw: dict[str, Any], key: str, n: int) -> list[float]:
    values = raw.get(key) or [1.0] * n
    if not isinstance(values, list | tuple) or len(values) != n:
        raise CheckpointError(f"config.json {key} must be a list of {n} numbers (got {values!r}); fix it")
    return [_number(v, key) for v in values]


def _scales(raw: dict[str, Any], config: ModelConfig) -> dict[str, float | torch.Tensor]:
    """Per-tensor factors (a number, or per-row factors of in_proj) by name within a block,
    plus the model-level ones; every multiplier of the module docstring lands here once."""
    m, heads = config.mamba, config.mamba.n_heads(config.d_model)
    inner, gn = heads * m.headdim, m.ngroups * m.d_state
    z, x, B, C, dt = _multipliers(raw, "ssm_multipliers", 5)
    rows = torch.cat([torch.full((n,), s) for n, s in ((inner, z), (inner, x), (gn, B), (gn, C), (heads, dt))])
    ssm_in, ssm_out = _multiplier(raw, "ssm_in_multiplier"), _multiplier(raw, "ssm_out_multiplier")
    attn_in, key = _multiplier(raw, "attention_in_multiplier"), _multiplier(raw, "key_multiplier")
    attn_out = _multiplier(raw, "attention_out_multiplier")
    gate, down = _multipliers(raw, "mlp_multipliers", 2)
    scales: dict[str, float | torch.Tensor] = {
        f"{SSM}.in_proj.weight": rows[:, None] * ssm_in,  # (rows, 1)
        f"{SSM}.in_proj.bias": rows,
        f"{SSM}.out_proj.weight": ssm_out,
        f"{SSM}.out_proj.bias": ssm_out,
        f"{ATTN}.q_proj.weight": attn_in,
        f"{ATTN}.k_proj.weight": attn_in * key,
        f"{ATTN}.k_proj.bias": key,
        f"{ATTN}.v_proj.weight": attn_in,
        f"{ATTN}.o_proj.weight": attn_out,
        f"{ATTN}.o_proj.bias": attn_out,
        "mlp.gate_proj.weight": gate,
        "mlp.down_proj.weight": down,
        "norm_f.weight": _multiplier(raw, "lm_head_multiplier"),
    }
    if not config.tie_embeddings:
        scales["embedding.weight"] = _multiplier(raw, "embedding_multiplier")
    return scales


def folded(tensors: Iterable[tuple[str, torch.Tensor]], scales: dict[str, Any]) -> Iterator[tuple[str, torch.Tensor]]:
    """Native (name, tensor) pairs with the multipliers multiplied in (in fp32 or wider)."""
    for name, t in tensors:
        scale = scales.get(re.sub(r"^layers\.\d+\.", "", name))
        if scale is None or not t.is_floating_point():
            yield name, t
            continue
        t = t.to(torch.promote_types(t.dtype, torch.float32))
        yield name, t * (scale.to(t.dtype) if isinstance(scale, torch.Tensor) else scale)


def zero_biases(raw: dict[str, Any], config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Zero in_proj or out_proj biases where HF has only the other (edgeseq's proj_bias covers both)."""
    if not config.mamba.proj_bias:
        return
    m, heads = config.mamba, config.mamba.n_heads(config.d_model)
    shapes = {}
    if not lookup(raw, "mamba_proj_bias", default=False):
        shapes["in_proj.bias"] = 2 * heads * m.headdim + 2 * m.ngroups * m.d_state + heads
    if not lookup(raw, "projectors_bias", default=False):
        shapes["out_proj.bias"] = config.d_model
    for i in range(config.n_layer):
        for name, n in shapes.items():
            yield f"layers.{i}.{SSM}.{name}", torch.zeros(n)


# ---- config -------------------------------------------------------------------------------
def _check_supported(raw: dict[str, Any]) -> None:
    check_silu(raw)
    if lookup(raw, "mlp_bias", default=False):
        raise CheckpointError("mlp_bias is not supported (edgeseq's gated MLP has no biases)")
    if lookup(raw, "mamba_rms_norm", default=False) and lookup(raw, "mamba_norm_before_gate", default=True):
        raise CheckpointError(
            "mamba_norm_before_gate true (RMSNorm(y) * silu(z)) is not supported: "
            "edgeseq's gated norm is RMSNorm(y * silu(z)) (norm_before_gate false)"
        )


def _mamba(raw: dict[str, Any], d_model: int) -> Mamba2Params:
    heads = lookup(raw, "mamba_n_heads", default=128)
    inner = lookup(raw, "mamba_d_ssm", default=1024)
    if inner is None:
        inner = int(lookup(raw, "mamba_expand", default=2) * d_model)
    headdim = lookup(raw, "mamba_d_head", default="auto")
    if headdim == "auto":
        headdim = inner // heads
    if heads * headdim != inner:
        raise CheckpointError(
            f"config.json is inconsistent: mamba_n_heads * mamba_d_head ({heads} * {headdim}) != "
            f"mamba_d_ssm ({inner}); fix the config"
        )
    return Mamba2Params(
        d_state=lookup(raw, "mamba_d_state", default=256),
        headdim=headdim,
        ngroups=lookup(raw, "mamba_n_groups", default=1),
        expand=inner / d_model,
        d_conv=lookup(raw, "mamba_d_conv", default=4),
        chunk_size=lookup(raw, "mamba_chunk_size", default=256),
        dt_limit=read_dt_limit(raw),
        conv_bias=lookup(raw, "mamba_conv_bias", default=True),
        proj_bias=bool(lookup(raw, "mamba_proj_bias", default=False) or lookup(raw, "projectors_bias", default=False)),
        rmsnorm=bool(lookup(raw, "mamba_rms_norm", default=False)),
    )


def read_config(raw: dict[str, Any]) -> ModelConfig:
    """ModelConfig of an HF FalconH1Config dict; optional keys default as in FalconH1Config."""
    _check_supported(raw)
    d_model = lookup(raw, "hidden_size")
    n_layer = lookup(raw, "num_hidden_layers")
    q_heads = lookup(raw, "num_attention_heads")
    theta, _ = _rope(raw)  # Falcon-H1 rotates the whole head whatever partial_rotary_factor says
    bias = lookup(raw, "attention_bias", default=False)
    attention = AttentionParams(
        n_heads=q_heads,
        n_kv_heads=lookup(raw, "num_key_value_heads", default=None) or q_heads,
        head_dim=lookup(raw, "head_dim", default=None) or d_model // q_heads,
        rope_theta=theta,
        rope_fraction=1.0,
        max_context=min(lookup(raw, "max_position_embeddings", default=8192), MAX_CONTEXT),
        qkv_bias=bias,
        out_bias=bias,
    )
    tied = lookup(raw, "tie_word_embeddings", default=False)
    scale = _multiplier(raw, "embedding_multiplier") if tied else 1.0
    if scale <= 0:
        raise CheckpointError(f"embedding_multiplier {scale:g} with tied embeddings is not supported; it must be > 0")
    return ModelConfig(
        d_model=d_model,
        n_layer=n_layer,
        vocab_size=lookup(raw, "vocab_size"),
        layers=(LayerSpec.of(ATTENTION.name, MAMBA2.name, mlp=True),) * n_layer,
        mamba=_mamba(raw, d_model),
        attention=attention,
        d_mlp=lookup(raw, "intermediate_size"),
        tie_embeddings=tied,
        norm_eps=lookup(raw, "rms_norm_eps", default=1e-5),
        nested_widths=(1.0,),
        embedding_scale=scale,
    )


@register
class HFFalconH1(Family):
    name = "hf_falcon_h1"
    description = "Hugging Face FalconH1ForCausalLM (config.json + safetensors), read only"

    @classmethod
    def detect(cls, path: Path) -> bool:
        return is_hf_dir(path, "falcon_h1", "FalconH1ForCausalLM")

    @classmethod
    def read(cls, path: Path):
        raw = read_json(path / "config.json")
        config = read_config(raw)
        tensors = folded(renamed(read_tensors(shard_files(path)), NAMES), _scales(raw, config))
        metadata = {"max_position_embeddings": lookup(raw, "max_position_embeddings", default=8192)}
        return config, itertools.chain(tensors, zero_biases(raw, config)), metadata
