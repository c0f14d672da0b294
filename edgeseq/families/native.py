"""edgeseq's own format: ``config.json`` (the ModelConfig plus a format tag and metadata)
and ``model.safetensors`` under the native weight names."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from edgeseq.config import ModelConfig
from edgeseq.families.base import Family, peek_json, read_json, read_safetensors, register
from edgeseq.model import NestedLM

FORMAT_TAG = "edgeseq"


@register
class Native(Family):
    name = "native"
    description = "config.json + model.safetensors written by edgeseq"
    writable = True

    @classmethod
    def detect(cls, path: Path) -> bool:
        raw = peek_json(path)
        return raw is not None and raw.get("format") == FORMAT_TAG

    @classmethod
    def read(cls, path: Path):
        raw = dict(read_json(path / "config.json"))
        raw.pop("format", None)
        metadata = raw.pop("metadata", {}) or {}
        config = ModelConfig.from_dict(raw)
        return config, read_safetensors(path / "model.safetensors").items(), metadata

    @classmethod
    def write(cls, model: NestedLM, path: Path, metadata: dict[str, Any] | None = None) -> None:
        tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(tensors, path / "model.safetensors", metadata={"format": FORMAT_TAG})
        doc = {"format": FORMAT_TAG, **model.config.to_dict(), "metadata": metadata or {}}
        (path / "config.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")

