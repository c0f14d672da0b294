"""Hugging Face ``Mamba2ForCausalLM`` checkpoints: read and write (format ``hf``).

A directory with ``config.json`` (``model_type`` "mamba2") and ``model.safetensors``, or
shards listed in ``model.safetensors.index.json``. The helpers for HF directories
(detection, shards, renaming, float tags) are shared with ``hf_bamba``.

Checked against transformers' ``modeling_mamba2.py`` (5.x):

- in_proj rows are [z | x | B | C | dt] and the conv runs over [x | B | C]: the native
  layout, so every tensor is only renamed, never reshaped;
- the gated norm is RMSNorm(y * silu(z)) over ``n_groups`` groups of
  ``intermediate_size / n_groups`` channels, with ``layer_norm_epsilon`` like the block
  norms: one eps, edgeseq's ``norm_eps``;
- dt = softplus(dt + dt_bias), clamped to ``time_step_limit``;
- ``tie_word_embeddings`` ties ``lm_head`` to the embedding.

Departures from transformers:

- ``residual_in_fp32``: HF keeps the residual stream in fp32, edgeseq in the parameters'
  dtype. Identical for fp32 models; rounding-level differences in bf16/fp16.
- HF's single-token path (``selective_state_update``) does not clamp dt to
  ``time_step_limit``, its prefill path does; edgeseq clamps in both. Identical for the
  default limit (0, inf), which every published checkpoint we know of uses.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from edgeseq.config import LayerSpec, ModelConfig
from edgeseq.errors import CheckpointError
from edgeseq.families.base import Family, lookup, peek_json, read_json, read_safetensors, register
from edgeseq.kinds.mamba2 import MAMBA2, Mamba2Params
from edgeseq.model import NestedLM

Rules = tuple[tuple[re.Pattern[str], str], ...]

# (HF name, native name); the optional "backbone." also reads bare Mamba2Model checkpoints,
# "embedding." the older spelling that transformers' own load hook accepts.
NAMES: Rules = tuple(
    (re.compile(pattern), native)
    for pattern, native in (
        (r"(?:backbone\.)?embeddings?\.weight", "embedding.weight"),
        (r"(?:backbone\.)?layers\.(\d+)\.(norm\.weight|mixer\..+)", r"layers.\1.\2"),
        (r"(?:backbone\.)?norm_f\.weight", "norm_f.weight"),
        (r"lm_head\.weight", "lm_head.weight"),
    )
)


# ---- helpers shared by the HF families ------------------------------------------------
def is_hf_dir(path: Path, model_type: str, architecture: str) -> bool:
    """Whether ``path`` holds an HF config.json of this model type or architecture."""
    raw = peek_json(path)
    if raw is None:
        return False
    return raw.get("model_type") == model_type or architecture in (raw.get("architectures") or [])


def shard_files(path: Path) -> list[Path]:
    """The safetensors files of a single-file or sharded checkpoint."""
    index = path / "model.safetensors.index.json"
    if not index.is_file():
        single = path / "model.safetensors"
        if not single.is_file():
            raise CheckpointError(
                f"{path} has no model.safetensors; re-save it with save_pretrained(safe_serialization=True)"
            )
        return [single]
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index} has no weight_map; re-save the checkpoint")
    names = sorted(set(weight_map.values()))
    for name in names:
        if not isinstance(name, str) or Path(name).name != name:
            raise CheckpointError(f"{index} names a shard outside the checkpoint ({name!r}); refusing to read it")
    return [path / name for name in names]


def read_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for f in files:
        yield from read_safetensors(f).items()


def renamed(tensors: Iterable[tuple[str, torch.Tensor]], rules: Rules) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) -> (native name, tensor); names no rule knows pass through, so the
    model builder reports them as unexpected."""
    for name, t in tensors:
        for pattern, native in rules:
            match = pattern.fullmatch(name)
            if match:
                yield match.expand(native), t
                break
        else:
            yield name, t


def hf_float(value: Any, where: str) -> float:
    """A float from config.json: a number, "Infinity", null (no bound) or transformers 5's
    ``{"__float__": "Infinity"}`` tag."""
    if value is None:
        return math.inf
    if isinstance(value, dict):
        value = value.get("__float__")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise CheckpointError(f"config.json {where} holds {value!r}, not a number; fix it") from None


def read_dt_limit(raw: dict[str, Any]) -> tuple[float, float]:
    limit = lookup(raw, "time_step_limit", "dt_limit", default=None)
    if limit is None:
        return (0.0, math.inf)
    if not isinstance(limit, list | tuple) or len(limit) != 2:
        raise CheckpointError(f"config.json time_step_limit must be [low, high] (got {limit!r}); fix it")
    return (hf_float(limit[0], "time_step_limit"), hf_float(limit[1], "time_step_limit"))


def check_silu(raw: dict[str, Any]) -> None:
    act = lookup(raw, "hidden_act", default="silu")
    if act not in ("silu", "swish"):
        raise CheckpointError(f"hidden_act {act!r} is not supported (edgeseq's mixers and MLPs use silu)")


def mamba_expand(d_model: int, heads: int, headdim: int, expand: Any) -> float:
    """edgeseq's expand (heads * headdim / d_model), checked against HF's integer expand."""
    if expand is not None and int(expand * d_model) != heads * headdim:
        raise CheckpointError(
            f"config.json is inconsistent: expand * hidden_size ({expand} * {d_model}) != "
            f"num_heads * head_dim ({heads} * {headdim}); fix the config"
        )
    return heads * headdim / d_model


# ---- the family -------------------------------------------------------------------------
def read_config(raw: dict[str, Any]) -> ModelConfig:
    """ModelConfig of an HF Mamba2Config dict; optional keys default as in Mamba2Config."""
    check_silu(raw)
    d_model = lookup(raw, "hidden_size", "d_model")
    n_layer = lookup(raw, "num_hidden_layers", "n_layer", "num_layers")
    heads, headdim = lookup(raw, "num_heads", "n_heads"), lookup(raw, "head_dim", "headdim")
    mamba = Mamba2Params(
        d_state=lookup(raw, "state_size", "d_state"),
        headdim=headdim,
        ngroups=lookup(raw, "n_groups", "ngroups", default=8),
        expand=mamba_expand(d_model, heads, headdim, lookup(raw, "expand", default=2)),
        d_conv=lookup(raw, "conv_kernel", "d_conv", default=4),
        chunk_size=lookup(raw, "chunk_size", default=256),
        dt_min=lookup(raw, "time_step_min", "dt_min", default=0.001),
        dt_max=lookup(raw, "time_step_max", "dt_max", default=0.1),
        dt_limit=read_dt_limit(raw),
        conv_bias=lookup(raw, "use_conv_bias", "conv_bias", default=True),
        proj_bias=lookup(raw, "use_bias", "proj_bias", default=False),
    )
    return ModelConfig(
        d_model=d_model,
        n_layer=n_layer,
        vocab_size=lookup(raw, "vocab_size"),
        layers=(LayerSpec.of(MAMBA2.name),) * n_layer,
        mamba=mamba,
        tie_embeddings=lookup(raw, "tie_word_embeddings", "tie_embeddings", default=False),
        norm_eps=lookup(raw, "layer_norm_epsilon", "norm_epsilon", "rms_norm_eps", default=1e-5),
        nested_widths=tuple(edgeseq_entry(raw).get("nested_widths", (1.0,))),
    )


def edgeseq_entry(raw: dict[str, Any]) -> dict[str, Any]:
    """What edgeseq keeps in an HF config.json it wrote: nested widths and metadata."""
    entry = raw.get("edgeseq")
    return entry if isinstance(entry, dict) else {}


def writable_heads(config: ModelConfig) -> int:
    """The one head count of every layer, if Mamba2Config can describe the model."""
    if any(s.parts != (MAMBA2.name,) for s in config.layers):
        raise CheckpointError(
            "format 'hf' holds pure Mamba2 models and this one has attention or MLP layers; write with --format native"
        )
    heads = sorted({config.part_size(i, MAMBA2.name) for i in range(config.n_layer)})
    if len(heads) > 1:
        raise CheckpointError(
            f"format 'hf' needs the same heads in every layer (this model has {heads}); "
            "extract at a uniform width or write with --format native"
        )
    inner = heads[0] * config.mamba.headdim
    if inner % config.d_model:
        raise CheckpointError(
            f"format 'hf' needs an integer expand but this model has {inner / config.d_model:g} "
            f"(heads * headdim / d_model = {inner}/{config.d_model}); write with --format native"
        )
    return heads[0]


def hf_config(model: NestedLM, heads: int, metadata: dict[str, Any] | None) -> dict[str, Any]:
    c, m = model.config, model.config.mamba
    lo, hi = m.dt_limit
    return {
        "architectures": ["Mamba2ForCausalLM"],
        "model_type": "mamba2",
        "hidden_size": c.d_model,
        "num_hidden_layers": c.n_layer,
        "vocab_size": c.vocab_size,
        "state_size": m.d_state,
        "head_dim": m.headdim,
        "num_heads": heads,
        "n_groups": m.ngroups,
        "expand": heads * m.headdim // c.d_model,
        "conv_kernel": m.d_conv,
        "chunk_size": m.chunk_size,
        "time_step_limit": [lo, hi],  # json writes inf as Infinity, which transformers reads
        "time_step_min": m.dt_min,
        "time_step_max": m.dt_max,
        "use_bias": m.proj_bias,
        "use_conv_bias": m.conv_bias,
        "layer_norm_epsilon": c.norm_eps,
        "tie_word_embeddings": c.tie_embeddings,
        "hidden_act": "silu",
        "residual_in_fp32": True,
        "dtype": str(model.embedding.weight.dtype).removeprefix("torch."),
        # edgeseq does not know the tokenizer; HF's defaults (0, 1, 2) would be guesses
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
        "edgeseq": {"nested_widths": list(c.nested_widths), "metadata": metadata or {}},
    }


def hf_name(native: str) -> str:
    if native == "lm_head.weight":
        return native
    return "backbone." + ("embeddings.weight" if native == "embedding.weight" else native)


@register
class HFMamba2(Family):
    name = "hf"
    description = "Hugging Face Mamba2ForCausalLM (config.json + safetensors)"
    writable = True

    @classmethod
    def detect(cls, path: Path) -> bool:
        return is_hf_dir(path, "mamba2", "Mamba2ForCausalLM")

    @classmethod
    def read(cls, path: Path):
        raw = read_json(path / "config.json")
        config = read_config(raw)
        metadata = edgeseq_entry(raw).get("metadata", {})
        return config, renamed(read_tensors(shard_files(path)), NAMES), metadata

    @classmethod
    def write(cls, model: NestedLM, path: Path, metadata: dict[str, Any] | None = None) -> None:
        heads = writable_heads(model.config)
        tensors = {hf_name(k): v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
        doc = hf_config(model, heads, metadata)
        (path / "config.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
