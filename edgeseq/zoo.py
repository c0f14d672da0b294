"""Built-in models, addressable by name; ``mamba2-tiny`` is the default.

A built-in model ships as a native checkpoint under ``edgeseq/models/<name>/``. Until its
trained weights are present, the name builds the same architecture from a fixed seed
(metadata ``trained: false``), so every command works on a fresh clone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from edgeseq.config import ModelConfig
from edgeseq.errors import CheckpointError
from edgeseq.families import load_checkpoint
from edgeseq.kinds.attention import AttentionParams
from edgeseq.kinds.mamba2 import Mamba2Params
from edgeseq.model import NestedLM

DEFAULT_MODEL = "mamba2-tiny"
BYTE_VOCAB = 264  # 256 byte values + BOS, EOS, PAD, padded to a multiple of 8
NESTED = (1.0, 0.5, 0.25, 0.125)

BUILTIN: dict[str, ModelConfig] = {
    "mamba2-tiny": ModelConfig.from_pattern(
        "M M M M M M",
        d_model=384,
        vocab_size=BYTE_VOCAB,
        mamba=Mamba2Params(d_state=64, headdim=32, ngroups=1, expand=2, d_conv=4, chunk_size=64),
        nested_widths=NESTED,
    ),
    "hybrid-tiny": ModelConfig.from_pattern(
        "M+ M+ M+ S+ M+ M+ M+ S+",
        window=256,
        d_model=256,
        vocab_size=BYTE_VOCAB,
        d_mlp=512,
        mamba=Mamba2Params(d_state=64, headdim=32, ngroups=1, expand=2, d_conv=4, chunk_size=64),
        attention=AttentionParams(n_heads=8, n_kv_heads=8, head_dim=32, rope_theta=10000.0, max_context=4096),
        nested_widths=NESTED,
    ),
}


def builtin_dir(name: str) -> Path:
    return Path(__file__).parent / "models" / name


def load_model(
    source: str | None = None, format: str | None = None, dtype=torch.float32, config: str | Path | None = None
) -> tuple[NestedLM, dict[str, Any]]:
    """(model, metadata) for a built-in name, or a checkpoint directory in any known format;
    with ``config``, a weights file or directory read with that config file (``--config``)."""
    source = source or DEFAULT_MODEL
    if config is not None and source in BUILTIN and not Path(source).exists():
        raise CheckpointError(f"built-in model {source!r} has its own config; drop --config")
    if source in BUILTIN and format in (None, "native"):
        shipped = builtin_dir(source)
        if (shipped / "model.safetensors").is_file():
            model, metadata = load_checkpoint(shipped, "native", dtype)
            return model, {**metadata, "name": source}
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = NestedLM(BUILTIN[source]).to(dtype)
        return model, {"format": "builtin", "name": source, "trained": False}
    path = Path(source)
    if source in BUILTIN and not path.exists():
        raise CheckpointError(f"built-in model {source!r} is native only; drop --format {format}")
    if not path.exists():
        raise CheckpointError(
            f"{source!r} is neither a model directory nor a built-in model ({', '.join(sorted(BUILTIN))})"
        )
    model, metadata = load_checkpoint(path, format, dtype, config)
    return model, {**metadata, "name": path.name}


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over every tensor of the state dict (name, dtype, shape, bytes), whatever the
    file format: a bundle records it so that validation can tell the source model changed."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
