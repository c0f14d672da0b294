"""The registry of layer kinds (``edgeseq.kinds.base`` says what a kind owns).

Built-in kinds: ``mamba2`` and ``attention`` (mixers), ``mlp`` (the gated MLP) and ``moe``
(a shared MLP plus routed experts). Import a module that calls ``register`` to add one.
"""

from edgeseq.kinds.base import DEFAULT_MLP, KINDS, LayerKind, by_section, get_kind, positive, register, unregister

# The built-in kinds register themselves on import.
from edgeseq.kinds import attention, mamba2, mlp, moe  # noqa: E402, F401  isort: skip

__all__ = ["DEFAULT_MLP", "KINDS", "LayerKind", "by_section", "get_kind", "positive", "register", "unregister"]
