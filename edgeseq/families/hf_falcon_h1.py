"""Hugging Face ``FalconH1ForCausalLM`` checkpoints: read only (format ``hf_falcon_h1``). Work in progress."""

from __future__ import annotations

from pathlib import Path

from edgeseq.errors import CheckpointError
from edgeseq.families.base import Family, register


@register
class HFFalconH1(Family):
    name = "hf_falcon_h1"
    description = "Hugging Face FalconH1ForCausalLM (config.json + safetensors), read only"

    @classmethod
    def detect(cls, path: Path) -> bool:
        return False

    @classmethod
    def read(cls, path: Path):
        raise CheckpointError(f"format {cls.name!r} is not readable yet")
