"""Hugging Face ``BambaForCausalLM`` checkpoints: read only (format ``hf_bamba``).

Bamba is a Mamba2/attention hybrid: layers in ``attn_layer_indices`` are global GQA
attention, the others Mamba2, and every layer is followed by a gated MLP. Checked against
transformers' ``modeling_bamba.py`` (5.x):

- block: h += mixer(input_layernorm(h)); h += feed_forward(pre_ff_layernorm(h)), all
  RMSNorms with ``rms_norm_eps``, the Mamba2 gated norm too (grouped by
  ``mamba_n_groups``, like HF Mamba2): one eps, edgeseq's ``norm_eps``;
- the Mamba2 mixer is HF Mamba2's (same tensor layout, dt clamp, decode path);
- attention: scores scaled by head_dim^-1/2; RoPE on the leading
  ``partial_rotary_factor * head_dim`` channels with halves rotated (Llama style), which
  is edgeseq's ``rope_ref``; ``attention_bias`` puts biases on q, k, v and o;
- the MLP is down(silu(gate(x)) * up(x)); ``z_loss_coefficient`` only affects training.

Departures from transformers:

- ``attention.max_context`` (the ring every global layer allocates for decoding) is
  ``max_position_embeddings`` capped at ``MAX_CONTEXT``: Bamba declares 262144 positions,
  which would cost gigabytes of cache per stream. A longer stream raises ConfigError.
- RoPE variants other than "default" (linear, dynamic, yarn, ...), ``mlp_bias`` and
  activations other than silu are refused with a CheckpointError.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from edgeseq.config import LayerSpec, ModelConfig
from edgeseq.errors import CheckpointError
from edgeseq.families.base import Family, lookup, read_json, register
from edgeseq.families.hf_mamba2 import (
    Rules,
    check_silu,
    is_hf_dir,
    mamba_expand,
    read_dt_limit,
    read_tensors,
    renamed,
    shard_files,
)
from edgeseq.kinds.attention import ATTENTION, AttentionParams
from edgeseq.kinds.mamba2 import MAMBA2, Mamba2Params

MAX_CONTEXT = 4096  # cap on the global-attention decode ring; see the module docstring

NAMES: Rules = tuple(
    (re.compile(pattern), native)
    for pattern, native in (
        (r"model\.embed_tokens\.weight", "embedding.weight"),
        (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"layers.\1.norm.weight"),
        (r"model\.layers\.(\d+)\.pre_ff_layernorm\.weight", r"layers.\1.mlp_norm.weight"),
        (r"model\.layers\.(\d+)\.feed_forward\.(\w+_proj\.weight)", r"layers.\1.mlp.\2"),
        (r"model\.layers\.(\d+)\.(?:mamba|self_attn)\.(.+)", r"layers.\1.mixer.\2"),
        (r"model\.final_layernorm\.weight", "norm_f.weight"),
        (r"lm_head\.weight", "lm_head.weight"),
    )
)


def _rope(raw: dict[str, Any]) -> tuple[float, float]:
    """(theta, fraction). transformers forces partial_rotary_factor 0.5 unless
    rope_parameters names another; a top-level rope_theta is the older spelling."""
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise CheckpointError(f"RoPE type {kind!r} is not supported (edgeseq implements the default RoPE only)")
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    return float(theta), float(params.get("partial_rotary_factor", 0.5))


def _layers(raw: dict[str, Any], n_layer: int) -> tuple[LayerSpec, ...]:
    attn = lookup(raw, "attn_layer_indices", default=None) or []
    if any(not isinstance(i, int) or not 0 <= i < n_layer for i in attn):
        raise CheckpointError(f"attn_layer_indices {attn} name layers outside 0..{n_layer - 1}; fix config.json")
    return tuple(LayerSpec.of(ATTENTION.name if i in attn else MAMBA2.name, mlp=True) for i in range(n_layer))


def mamba_params(raw: dict[str, Any], d_model: int) -> Mamba2Params:
    """The ``mamba_*`` keys of a Bamba-style config (Bamba, Granite 4.0-H), defaults as in BambaConfig."""
    heads = lookup(raw, "mamba_n_heads", default=128)
    expand = lookup(raw, "mamba_expand", default=2)
    headdim = lookup(raw, "mamba_d_head", default="auto")
    if headdim == "auto":
        headdim = int(expand * d_model) // heads
    return Mamba2Params(
        d_state=lookup(raw, "mamba_d_state", default=256),
        headdim=headdim,
        ngroups=lookup(raw, "mamba_n_groups", default=1),
        expand=mamba_expand(d_model, heads, headdim, expand),
        d_conv=lookup(raw, "mamba_d_conv", default=4),
        chunk_size=lookup(raw, "mamba_chunk_size", default=256),
        dt_limit=read_dt_limit(raw),
        conv_bias=lookup(raw, "mamba_conv_bias", default=True),
        proj_bias=lookup(raw, "mamba_proj_bias", default=False),
    )


def read_config(raw: dict[str, Any]) -> ModelConfig:
    """ModelConfig of an HF BambaConfig dict; optional keys default as in BambaConfig."""
    check_silu(raw)
    if lookup(raw, "mlp_bias", default=False):
        raise CheckpointError("mlp_bias is not supported (edgeseq's gated MLP has no biases)")
    d_model = lookup(raw, "hidden_size")
    n_layer = lookup(raw, "num_hidden_layers")
    mamba = mamba_params(raw, d_model)
    q_heads = lookup(raw, "num_attention_heads")
    theta, fraction = _rope(raw)
    bias = lookup(raw, "attention_bias", default=False)
    attention = AttentionParams(
        n_heads=q_heads,
        n_kv_heads=lookup(raw, "num_key_value_heads", default=None) or q_heads,
        head_dim=lookup(raw, "head_dim", default=None) or d_model // q_heads,
        rope_theta=theta,
        rope_fraction=fraction,
        max_context=min(lookup(raw, "max_position_embeddings", default=262144), MAX_CONTEXT),
        qkv_bias=bias,
        out_bias=bias,
    )
    return ModelConfig(
        d_model=d_model,
        n_layer=n_layer,
        vocab_size=lookup(raw, "vocab_size"),
        layers=_layers(raw, n_layer),
        mamba=mamba,
        attention=attention,
        d_mlp=lookup(raw, "intermediate_size"),
        tie_embeddings=lookup(raw, "tie_word_embeddings", default=False),
        norm_eps=lookup(raw, "rms_norm_eps", default=1e-5),
        nested_widths=(1.0,),
    )


@register
class HFBamba(Family):
    name = "hf_bamba"
    description = "Hugging Face BambaForCausalLM (config.json + safetensors), read only"

    @classmethod
    def detect(cls, path: Path) -> bool:
        return is_hf_dir(path, "bamba", "BambaForCausalLM")

    @classmethod
    def read(cls, path: Path):
        raw = read_json(path / "config.json")
        config = read_config(raw)
        metadata = {"max_position_embeddings": lookup(raw, "max_position_embeddings", default=262144)}
        return config, renamed(read_tensors(shard_files(path)), NAMES), metadata
