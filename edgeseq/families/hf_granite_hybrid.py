"""Hugging Face ``GraniteMoeHybridForCausalLM`` checkpoints: read only (format ``hf_granite_hybrid``). Work in progress."""

from __future__ import annotations

from pathlib import Path

from edgeseq.errors import CheckpointError
from edgeseq.families.base import Family, register


@register
class HFGraniteHybrid(Family):
    name = "hf_granite_hybrid"
    description = "Hugging Face GraniteMoeHybridForCausalLM (config.json + safetensors), read only"

    @classmethod
    def detect(cls, path: Path) -> bool:
        return False

    @classmethod
    def read(cls, path: Path):
        raise CheckpointError(f"format {cls.name!r} is not readable yet")
