"""edgeseq: deploy nested state-space models (MatMamba-style) to edge devices.

Data flows one way: checkpoint -> family loader -> config + nested model -> extract(width)
-> quantize -> export -> runner -> validate -> bundle.
"""

from edgeseq.config import LayerSpec, ModelConfig
from edgeseq.errors import CheckpointError, ConfigError, EdgeseqError, WidthError
from edgeseq.kinds.attention import AttentionParams
from edgeseq.kinds.mamba2 import Mamba2Params
from edgeseq.width import WidthSpec

__version__ = "0.1.0"

__all__ = [
    "AttentionParams",
    "CheckpointError",
    "ConfigError",
    "EdgeseqError",
    "LayerSpec",
    "Mamba2Params",
    "ModelConfig",
    "WidthError",
    "WidthSpec",
    "__version__",
]
