"""Moving a decode state between nested widths, without torch.

A narrower width keeps the leading units of every layer, so its state is a slice of the
wider state along each state tensor's unit axis: the layer kinds say which entries
(``LayerKind.state_index``). Narrowing takes that slice; widening puts the state into
those entries of a zero state of the wider shape (the new heads start from nothing;
``edgeseq.runtimes.elastic`` can then replay recent tokens to fill them).

State names are the graphs' (``past.{i}.{name}``); arrays carry the batch axis first.
``position`` is the same at every width.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from edgeseq.config import ModelConfig
from edgeseq.errors import UsageError
from edgeseq.kinds import get_kind
from edgeseq.width import LayerWidth

Moves = dict[str, tuple[int, np.ndarray]]  # state input name -> (axis with batch, kept entries of the wider state)


def state_moves(config: ModelConfig, a: Sequence[LayerWidth], b: Sequence[LayerWidth]) -> Moves:
    """For each state tensor, the entries of the wider of widths ``a`` and ``b`` that the
    narrower keeps. Every layer of one must be at least as wide as the other's (nested)."""
    if len(a) != len(b):
        raise UsageError(f"widths of {len(a)} and {len(b)} layers do not belong to one model")
    wider = _at_least(config, a, b)
    if not wider and not _at_least(config, b, a):
        raise UsageError("these widths are not nested (one is wider in some layer, narrower in another)")
    wide, narrow = (a, b) if wider else (b, a)
    moves: Moves = {}
    for i, spec in enumerate(config.layers):
        for part in spec.parts:
            kind = get_kind(part)
            for name, (axis, index) in kind.state_index(config, i, wide[i][part], narrow[i][part]).items():
                moves[f"past.{i}.{name}"] = (axis + 1, index)
    return moves


def _at_least(config: ModelConfig, a: Sequence[LayerWidth], b: Sequence[LayerWidth]) -> bool:
    return all(a[i][p] >= b[i][p] for i, spec in enumerate(config.layers) for p in spec.parts)


def narrow(state: Mapping[str, np.ndarray], moves: Moves) -> dict[str, np.ndarray]:
    """The narrower width's state: each tensor's kept entries (copies)."""
    return {name: np.take(a, moves[name][1], axis=moves[name][0]) if name in moves else a.copy()
            for name, a in state.items()}  # fmt: skip


def widen(state: Mapping[str, np.ndarray], moves: Moves, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """The wider width's state (``shapes`` with the batch axis): the narrower state in the
    entries it keeps, zeros elsewhere."""
    out = {}
    for name, a in state.items():
        if name not in moves:
            out[name] = a.copy()
            continue
        axis, index = moves[name]
        wide = np.zeros(shapes[name], a.dtype)
        where = [slice(None)] * a.ndim
        where[axis] = index
        wide[tuple(where)] = a
        out[name] = wide
    return out
