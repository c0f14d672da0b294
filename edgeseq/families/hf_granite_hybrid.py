"""Hugging Face ``GraniteMoeHybridForCausalLM`` checkpoints (IBM Granite 4.0-H): read only
(format ``hf_granite_hybrid``).

A directory with ``config.json`` (``model_type`` "granitemoehybrid") and
``model.safetensors`` or shards. Granite 4.0-H is a Mamba2/attention hybrid: ``layer_types``
names each layer "mamba" or "attention" (transformers 5 also writes "linear_attention" /
"full_attention"), and every layer is followed by an MLP. Checked against transformers'
``modeling_granitemoehybrid.py`` (5.24):

- block: h += m * mixer(input_layernorm(h)); h += m * mlp(post_attention_layernorm(h)),
  m = ``residual_multiplier``; RMSNorms with ``rms_norm_eps``, the Mamba2 gated norm too
  (grouped by ``mamba_n_groups``): one eps, edgeseq's ``norm_eps``;
- the Mamba2 mixer is Bamba's, i.e. HF Mamba2's layout: tensors are only renamed;
- attention: GQA with scores scaled by ``attention_multiplier`` (not head_dim^-1/2), biases
  on q, k, v and o with ``attention_bias``; RoPE on the whole head (Llama style, halves
  rotated) only when ``position_embedding_type`` is "rope" (Granite 4.0-H says "nope");
- the MLP: ``shared_mlp`` (input_linear rows = [gate | up], silu, output_linear) and, when
  ``num_local_experts`` > 0, ``block_sparse_moe`` added to it: a router, the top
  ``num_experts_per_tok`` logits softmaxed among themselves, experts with 3-D weights
  ([experts, 2 * intermediate_size, hidden] = [gate | up] rows, and [experts, hidden,
  intermediate_size]). Dense models map onto edgeseq's ``mlp`` kind, MoE ones onto ``moe``;
- embeddings are multiplied by ``embedding_multiplier``, logits divided by
  ``logits_scaling``; ``tie_word_embeddings`` ties ``lm_head`` to the embedding.

The multipliers are folded into weights where that is exact (up to one rounding of each
weight, done in fp32 and cast back to the checkpoint's dtype):

- ``residual_multiplier`` into every output projection that feeds the residual: mamba
  ``out_proj`` (weight and bias), attention ``o_proj`` (weight and bias), the shared MLP's
  ``down_proj`` and every expert's ``down_proj`` (the routed sum is linear in them);
- ``attention_multiplier`` into ``q_proj`` (weight and bias) as
  ``attention_multiplier * sqrt(head_dim)``, cancelling edgeseq's head_dim^-1/2 (RoPE is
  linear in q, so scaling q before it is the same);
- ``1 / logits_scaling`` into the final norm's weight (the head is linear in it; this also
  works with a tied head, which cannot carry the factor itself);
- ``embedding_multiplier`` is not folded: it becomes ``ModelConfig.embedding_scale`` (the
  looked-up rows are scaled, a tied head is not), for tied and untied heads alike.

Departures from transformers:

- ``attention.max_context`` is ``max_position_embeddings`` capped at ``hf_bamba.MAX_CONTEXT``
  (Granite 4.0-H declares 131072 positions, gigabytes of cache per stream); a longer
  stream raises ConfigError.
- The folds above round each folded weight once more than transformers does (a relative
  change of ~1e-7 in fp32).
- RoPE variants other than "default", ``position_embedding_type`` values other than
  "rope", "nope" and null, and activations other than silu are refused with a
  CheckpointError.
- The router's top-k on exactly tied logits may pick a different expert than torch.topk;
  random or trained weights make ties vanishingly rare.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from edgeseq.config import LayerSpec, ModelConfig
from edgeseq.errors import CheckpointError
from edgeseq.families.base import Family, lookup, read_json, register
from edgeseq.families.hf_bamba import MAX_CONTEXT, mamba_params
from edgeseq.families.hf_mamba2 import (
    check_silu,
    is_hf_dir,
    read_tensors,
    shard_files,
)
from edgeseq.kinds.attention import ATTENTION, AttentionParams
from edgeseq.kinds.mamba2 import MAMBA2
from edgeseq.kinds.mlp import MLP
from edgeseq.kinds.moe import MOE, MoEParams

MIXERS = {"mamba": MAMBA2.name, "linear_attention": MAMBA2.name, "attention": ATTENTION.name,
          "full_attention": ATTENTION.name}  # fmt: skip
LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")


# ---- config ------------------------------------------------------------------------------
def _rope_fraction(raw: dict[str, Any]) -> tuple[float, float]:
    """(theta, fraction): the whole head rotated with "rope", nothing otherwise."""
    kind = raw.get("position_embedding_type")
    if kind not in ("rope", "nope", None):
        raise CheckpointError(f"position_embedding_type {kind!r} is not supported (edgeseq reads 'rope' and 'nope')")
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if kind == "rope" and rope_type != "default":
        raise CheckpointError(f"RoPE type {rope_type!r} is not supported (edgeseq implements the default RoPE only)")
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    return theta, 1.0 if kind == "rope" else 0.0


def _layers(raw: dict[str, Any], n_layer: int, mlp: str) -> tuple[LayerSpec, ...]:
    types = lookup(raw, "layer_types", "layers_block_type", default=None) or ["mamba"] * n_layer
    if len(types) != n_layer or any(t not in MIXERS for t in types):
        raise CheckpointError(
            f"layer_types must name {n_layer} layers, each one of {sorted(MIXERS)} (got {types}); fix config.json"
        )
    return tuple(LayerSpec.of(MIXERS[t], mlp=mlp) for t in types)


def _attention(raw: dict[str, Any], d_model: int) -> AttentionParams:
    q_heads = lookup(raw, "num_attention_heads")
    theta, fraction = _rope_fraction(raw)
    bias = lookup(raw, "attention_bias", default=False)
    return AttentionParams(
        n_heads=q_heads,
        n_kv_heads=lookup(raw, "num_key_value_heads", default=None) or q_heads,
        head_dim=lookup(raw, "head_dim", default=None) or d_model // q_heads,
        rope_theta=theta,
        rope_fraction=fraction,
        max_context=min(lookup(raw, "max_position_embeddings", default=2048), MAX_CONTEXT),
        qkv_bias=bias,
        out_bias=bias,
    )


def read_config(raw: dict[str, Any]) -> ModelConfig:
    """ModelConfig of an HF GraniteMoeHybridConfig dict; optional keys default as there."""
    check_silu(raw)
    d_model = lookup(raw, "hidden_size")
    n_layer = lookup(raw, "num_hidden_layers")
    shared = lookup(raw, "shared_intermediate_size", default=1024)
    experts = lookup(raw, "num_local_experts", default=8) or 0
    if experts > 0:
        mlp, sections = MOE.name, {"moe": MoEParams(
            n_experts=experts, top_k=lookup(raw, "num_experts_per_tok", default=2),
            d_expert=lookup(raw, "intermediate_size", default=11008), d_shared=shared,
        )}  # fmt: skip
    else:
        mlp, sections = MLP.name, {"d_mlp": shared}
    layers = _layers(raw, n_layer, mlp)
    used = {kind for spec in layers for kind in spec.mixers}
    sections |= {"mamba": mamba_params(raw, d_model)} if MAMBA2.name in used else {}
    sections |= {"attention": _attention(raw, d_model)} if ATTENTION.name in used else {}
    return ModelConfig(
        d_model=d_model,
        n_layer=n_layer,
        vocab_size=lookup(raw, "vocab_size"),
        layers=layers,
        tie_embeddings=lookup(raw, "tie_word_embeddings", default=False),
        norm_eps=lookup(raw, "rms_norm_eps", default=1e-6),
        nested_widths=(1.0,),
        embedding_scale=float(lookup(raw, "embedding_multiplier", default=1.0)),
        **sections,
    )


# ---- tensors ------------------------------------------------------------------------------
def _multiplier(raw: dict[str, Any], key: str) -> float:
    value = lookup(raw, key, default=1.0)
    value = 1.0 if value is None else value
    if not (isinstance(value, int | float) and math.isfinite(value) and value != 0):
        raise CheckpointError(f"config.json {key} must be a non-zero number (got {value!r}); fix it")
    return float(value)


def _scaled(t: torch.Tensor, factor: float) -> torch.Tensor:
    return t if factor == 1.0 else (t.float() * factor).to(t.dtype)


def _halves(t: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[gate | up] stacked along ``axis`` -> (gate, up)."""
    if t.size(axis) % 2:
        raise CheckpointError(f"a fused gate/up weight of shape {tuple(t.shape)} has an odd row count; re-save it")
    gate, up = t.chunk(2, dim=axis)
    return gate.contiguous(), up.contiguous()


def native_tensors(tensors: Iterable[tuple[str, torch.Tensor]], config: ModelConfig,
                   raw: dict[str, Any]) -> Iterator[tuple[str, torch.Tensor]]:  # fmt: skip
    """(HF name, tensor) -> (native name, tensor), multipliers folded (module docstring);
    names nothing here knows pass through, so the model builder reports them."""
    residual = _multiplier(raw, "residual_multiplier")
    head_dim = config.attention.head_dim if config.attention is not None else 1
    q_scale = _multiplier(raw, "attention_multiplier") * math.sqrt(head_dim)
    logits = _multiplier(raw, "logits_scaling")
    for name, t in tensors:
        if name == "model.embed_tokens.weight":
            yield "embedding.weight", t
        elif name == "model.norm.weight":
            yield "norm_f.weight", _scaled(t, 1.0 / logits)
        elif name == "lm_head.weight":
            yield name, t
        elif match := LAYER.fullmatch(name):
            yield from _layer_tensors(f"layers.{match[1]}.", match[2], t, residual, q_scale)
        else:
            yield name, t


def _layer_tensors(out: str, rest: str, t: torch.Tensor, residual: float, q_scale: float):
    mixer = re.fullmatch(r"(?:mamba|self_attn)\.(.+)", rest)
    if rest == "input_layernorm.weight":
        yield f"{out}norm.weight", t
    elif rest == "post_attention_layernorm.weight":
        yield f"{out}mlp_norm.weight", t
    elif mixer:
        param = mixer[1]
        if param.startswith(("out_proj.", "o_proj.")):
            t = _scaled(t, residual)
        elif param.startswith("q_proj."):
            t = _scaled(t, q_scale)
        yield f"{out}mixer.{param}", t
    elif rest == "shared_mlp.input_linear.weight":
        gate, up = _halves(t, 0)
        yield from ((f"{out}mlp.gate_proj.weight", gate), (f"{out}mlp.up_proj.weight", up))
    elif rest == "shared_mlp.output_linear.weight":
        yield f"{out}mlp.down_proj.weight", _scaled(t, residual)
    elif rest in ("block_sparse_moe.input_linear.weight", "block_sparse_moe.experts.gate_up_proj"):
        gate, up = _halves(t, 1)
        yield from ((f"{out}mlp.experts.gate_proj", gate), (f"{out}mlp.experts.up_proj", up))
    elif rest in ("block_sparse_moe.output_linear.weight", "block_sparse_moe.experts.down_proj"):
        yield f"{out}mlp.experts.down_proj", _scaled(t, residual)
    elif rest in ("block_sparse_moe.router.layer.weight", "block_sparse_moe.router.weight"):
        yield f"{out}mlp.router.weight", t
    else:
        yield f"model.layers.{out.split('.')[1]}.{rest}", t


@register
class HFGraniteHybrid(Family):
    name = "hf_granite_hybrid"
    description = "Hugging Face GraniteMoeHybridForCausalLM (config.json + safetensors), read only"

    @classmethod
    def detect(cls, path: Path) -> bool:
        return is_hf_dir(path, "granitemoehybrid", "GraniteMoeHybridForCausalLM")

    @classmethod
    def read(cls, path: Path):
        raw = read_json(path / "config.json")
        config = read_config(raw)
        metadata = {"max_position_embeddings": lookup(raw, "max_position_embeddings", default=2048)}
        return config, native_tensors(read_tensors(shard_files(path)), config, raw), metadata
