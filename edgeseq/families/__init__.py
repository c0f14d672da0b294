"""Checkpoint families: one module per format (``hf``, ``hf_bamba``, ``hf_falcon_h1``,
``hf_granite_hybrid``, ``hf_nemotron_h``, ``mamba_ssm``, ``native``), each registered with ``@register`` in ``edgeseq.families.base``, which also
holds loading (``load_checkpoint``: names, shapes and values checked against the config)
and atomic writing (``save_checkpoint``)."""

from edgeseq.families.base import (  # noqa: F401
    FAMILIES,
    Family,
    build_model,
    detect_family,
    get_family,
    known_formats,
    load_checkpoint,
    lookup,
    peek_json,
    read_json,
    read_safetensors,
    register,
    save_checkpoint,
)

# Register the built-in families (import for side effects).
from edgeseq.families import (  # noqa: F401  isort: skip
    hf_bamba,
    hf_falcon_h1,
    hf_granite_hybrid,
    hf_mamba2,
    hf_nemotron_h,
    mamba_ssm,
    native,
)
