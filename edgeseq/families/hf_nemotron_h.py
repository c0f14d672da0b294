"""Hugging Face ``NemotronHForCausalLM`` checkpoints: read only (format ``hf_nemotron_h``).

NVIDIA's Nemotron-H stacks single-purpose layers, each one residual block
h += mixer(norm(h)), where the mixer is Mamba2, attention or an MLP. The config lists
them as ``layers_block_type`` ("linear_attention" or its older name "mamba",
"full_attention" or "attention", "mlp", "moe"), older checkpoints as
``hybrid_override_pattern``, a letter per layer ("M", "*", "-", "E"). Checked against
transformers' ``modeling_nemotron_h.py`` (5.24):

- a Mamba2 layer is edgeseq's ``mamba2`` mixer: HF Mamba2's tensor layout, heads and head
  size from ``mamba_num_heads`` and ``mamba_head_dim`` (``expand`` is unused upstream and
  ignored here), the gated norm grouped by ``n_groups``, one eps (``layer_norm_epsilon``)
  for every norm;
- an attention layer is edgeseq's ``attention`` mixer without positional embedding
  (``rope_fraction`` 0), GQA, scores scaled by head_dim^-1/2, no biases (transformers
  builds q/k/v/o without them whatever ``attention_bias`` says; ``sliding_window`` is
  unused upstream too);
- an MLP layer has no mixer, only edgeseq's ``mlp_relu2`` MLP behind the block's MLP norm:
  down(relu(up(x))²), hidden size ``intermediate_size``;
- tensors are stored under ``backbone.`` (transformers renames them to ``model.`` on load;
  both are read); the multi-token-prediction tensors ``mtp.*`` are skipped, as
  transformers skips them; ``lm_head`` is never tied to the embedding (transformers ties
  nothing for this model, whatever ``tie_word_embeddings`` says).

Departures from transformers:

- dt = softplus(dt + dt_bias) is clamped below at ``time_step_min`` (transformers ignores
  ``time_step_limit`` and uses (time_step_min, inf)) in prefill *and* decode; transformers'
  single-token path does not clamp. They differ only where softplus(...) falls under
  time_step_min (1e-3 by default) in a decode step.
- ``residual_in_fp32`` is unused by transformers' model and by edgeseq: the residual stream
  stays in the parameters' dtype.
- ``attention.max_context`` (the decode ring of every attention layer) is
  ``max_position_embeddings`` capped at ``hf_bamba.MAX_CONTEXT``; a longer stream raises
  ConfigError.
- Refused with a CheckpointError: mixture-of-experts layers ("moe"/"E"), ``mlp_bias``, an
  MLP activation other than relu2 and a Mamba activation other than silu.
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
from edgeseq.families.hf_bamba import MAX_CONTEXT
from edgeseq.families.hf_mamba2 import Rules, is_hf_dir, mamba_expand, read_tensors, renamed, shard_files
from edgeseq.kinds.attention import ATTENTION, AttentionParams
from edgeseq.kinds.mamba2 import MAMBA2, Mamba2Params
from edgeseq.kinds.mlp.relu2 import RELU2_MLP

# Layer types by every name a config may give them -> the pattern letter.
LAYER_TYPES = {
    "linear_attention": "M", "mamba": "M", "M": "M",
    "full_attention": "*", "attention": "*", "*": "*",
    "mlp": "-", "-": "-",
    "moe": "E", "E": "E",
}  # fmt: skip
LAYERS = {"M": LayerSpec.of(MAMBA2.name), "*": LayerSpec.of(ATTENTION.name), "-": LayerSpec.of(mlp=RELU2_MLP.name)}

PREFIX = r"(?:backbone|model)\."
NAMES: Rules = tuple(
    (re.compile(pattern), native)
    for pattern, native in (
        (PREFIX + r"(?:embeddings|embed_tokens)\.weight", "embedding.weight"),
        (PREFIX + r"layers\.(\d+)\.norm\.weight", r"layers.\1.norm.weight"),
        (PREFIX + r"layers\.(\d+)\.mixer\.(.+)", r"layers.\1.mixer.\2"),
        (PREFIX + r"norm_f\.weight", "norm_f.weight"),
        (r"lm_head\.weight", "lm_head.weight"),
    )
)


def layer_letters(raw: dict[str, Any]) -> str:
    """The layer pattern ("M-M*-"), from ``layers_block_type`` or ``hybrid_override_pattern``."""
    types, where = lookup(raw, "layers_block_type", "layer_types", default=None), "layers_block_type"
    if types is None:  # older checkpoints: a string, a letter per layer
        pattern, where = lookup(raw, "hybrid_override_pattern", default=None), "hybrid_override_pattern"
        types = list(pattern) if isinstance(pattern, str) else None
    if not isinstance(types, list) or not types:
        raise CheckpointError("config.json lacks 'layers_block_type' (or 'hybrid_override_pattern'); add it")
    letters = [LAYER_TYPES.get(t) if isinstance(t, str) else None for t in types]
    for i, (name, letter) in enumerate(zip(types, letters)):
        if letter is None:
            raise CheckpointError(
                f"config.json {where}[{i}] is {name!r}, not a Nemotron-H layer type; use one of {sorted(LAYER_TYPES)}"
            )
        if letter == "E":
            raise CheckpointError(
                f"config.json {where}[{i}] is a mixture-of-experts layer ({name!r}); "
                "edgeseq does not read Nemotron-H MoE checkpoints"
            )
    return "".join(letters)


def _layer_names(letters: str) -> Rules:
    """Rules for the MLP layers (norm -> mlp_norm, mixer -> mlp), tried before ``NAMES``."""
    mlp = "|".join(str(i) for i, letter in enumerate(letters) if letter == "-")
    if not mlp:
        return ()
    return (
        (re.compile(PREFIX + rf"layers\.({mlp})\.norm\.weight"), r"layers.\1.mlp_norm.weight"),
        (re.compile(PREFIX + rf"layers\.({mlp})\.mixer\.(.+)"), r"layers.\1.mlp.\2"),
    )


def _check_options(raw: dict[str, Any]) -> None:
    checks = (  # key, its default, the values edgeseq computes, why
        ("mlp_hidden_act", "relu2", ("relu2",), "edgeseq's Nemotron-H MLP is relu2"),
        ("mamba_hidden_act", "silu", ("silu", "swish"), "edgeseq's Mamba2 mixer uses silu"),
        ("mlp_bias", False, (False,), "edgeseq's relu2 MLP has no biases"),
    )
    for key, default, supported, why in checks:
        value = lookup(raw, key, default=default)
        if value not in supported:
            raise CheckpointError(f"{key} {value!r} is not supported ({why})")


def _mamba(raw: dict[str, Any], d_model: int) -> Mamba2Params:
    heads, headdim = lookup(raw, "mamba_num_heads", default=128), lookup(raw, "mamba_head_dim", default=64)
    dt_min = lookup(raw, "mamba_dt_min", "time_step_min", default=0.001)
    return Mamba2Params(
        d_state=lookup(raw, "ssm_state_size", default=128),
        headdim=headdim,
        ngroups=lookup(raw, "mamba_n_groups", "n_groups", default=8),
        expand=mamba_expand(d_model, heads, headdim, None),  # upstream sizes by heads, not expand
        d_conv=lookup(raw, "mamba_d_conv", "conv_kernel", default=4),
        chunk_size=lookup(raw, "mamba_chunk_size", "chunk_size", default=128),
        dt_min=dt_min,
        dt_max=lookup(raw, "mamba_dt_max", "time_step_max", default=0.1),
        dt_limit=(float(dt_min), math.inf),  # upstream's clamp; time_step_limit is unused there
        conv_bias=lookup(raw, "mamba_conv_bias", "use_conv_bias", default=True),
        proj_bias=lookup(raw, "use_bias", default=False),
    )


def _attention(raw: dict[str, Any]) -> AttentionParams:
    q_heads = lookup(raw, "num_attention_heads", default=32)
    return AttentionParams(
        n_heads=q_heads,
        n_kv_heads=lookup(raw, "num_key_value_heads", default=8) or q_heads,
        head_dim=lookup(raw, "head_dim", "attention_head_dim", default=128),  # the second: NVIDIA's own configs
        rope_fraction=0.0,
        max_context=min(lookup(raw, "max_position_embeddings", default=4096), MAX_CONTEXT),
    )


def read_config(raw: dict[str, Any]) -> ModelConfig:
    """ModelConfig of an HF NemotronHConfig dict; optional keys default as in NemotronHConfig
    (the ``mamba_*`` spellings of older configs win over the new ones, as upstream)."""
    _check_options(raw)
    letters = layer_letters(raw)
    d_model = lookup(raw, "hidden_size")
    sections = {}  # only the kinds the model uses
    if "M" in letters:
        sections[MAMBA2.section] = _mamba(raw, d_model)
    if "*" in letters:
        sections[ATTENTION.section] = _attention(raw)
    if "-" in letters:
        sections[RELU2_MLP.section] = lookup(raw, "intermediate_size")
    return ModelConfig(
        d_model=d_model,
        n_layer=len(letters),
        vocab_size=lookup(raw, "vocab_size"),
        layers=tuple(LAYERS[letter] for letter in letters),
        tie_embeddings=False,
        norm_eps=lookup(raw, "layer_norm_epsilon", default=1e-5),
        nested_widths=(1.0,),
        sections=tuple(sections.items()),
    )


MTP = re.compile(r"(?:(?:backbone|model)\.)?mtp\.")  # multi-token-prediction heads, which transformers skips


def _without_mtp(tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    return ((name, t) for name, t in tensors if not MTP.match(name))


@register
class HFNemotronH(Family):
    name = "hf_nemotron_h"
    description = "Hugging Face NemotronHForCausalLM (config.json + safetensors), read only"

    @classmethod
    def detect(cls, path: Path) -> bool:
        return is_hf_dir(path, "nemotron_h", "NemotronHForCausalLM")

    @classmethod
    def read(cls, path: Path):
        raw = read_json(path / "config.json")
        config = read_config(raw)
        rules = _layer_names(layer_letters(raw)) + NAMES
        metadata = {"max_position_embeddings": lookup(raw, "max_position_embeddings", default=4096)}
        return config, renamed(_without_mtp(read_tensors(shard_files(path))), rules), metadata
