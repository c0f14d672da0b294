"""Switching a stream between nested widths, and the controllers that choose the width.

An elastic bundle (``edgeseq export --elastic``) holds graphs for several nested widths
over one weight store. A ``StreamingSession`` opened on it holds every width's runners,
and ``session.set_width(w)`` moves the stream between them between two steps:

    narrower   the state keeps the leading heads/units of every layer (``edgeseq.switch``)
    wider      ``widen="zeros"``: the new heads start from a zero state;
               ``widen="replay"``: the stream goes back to a saved state (at most
               2 * ``replay`` tokens old), widens it with zeros and re-prefills the tokens
               since at the new width, so the new heads have seen the recent past

Memory stays constant: replay keeps two saved states and the tokens since the older one
(fewer than 2 * ``replay``); every ``replay`` tokens the newer becomes the older. A prompt
longer than ``replay`` is prefilled in two calls, so that a saved state falls ``replay``
tokens before its end.

A controller decides the width from what the stream measures: ``on_step(stats) -> width``
after every step. ``LatencyBudget`` keeps the widest width whose measured step time fits
a budget (which the app may change at any time).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from edgeseq.errors import EdgeseqError, UsageError
from edgeseq.switch import narrow, state_moves, widen
from edgeseq.width import find_width

if TYPE_CHECKING:
    from edgeseq.config import ModelConfig
    from edgeseq.runtimes.base import Runner
    from edgeseq.width import LayerWidth

WIDEN_POLICIES = ("zeros", "replay")
REPLAY_TOKENS = 64


@dataclass
class WidthGraphs:
    """One width of an elastic bundle: its label ("1/2"), runners and per-layer sizes."""

    label: str
    step: Runner
    prefill: Runner | None
    layer_widths: tuple[LayerWidth, ...]


@dataclass
class _Saved:
    """A state the stream may replay from, and the tokens consumed since."""

    state: dict[str, np.ndarray]
    position: np.ndarray
    tokens: list[int] = field(default_factory=list)


class Widths:
    """The widths a session switches between (widest first) and the replay record."""

    def __init__(self, config: ModelConfig, members: Sequence[WidthGraphs], replay: int = REPLAY_TOKENS):
        if replay < 1:
            raise UsageError(f"replay must be at least 1 token (got {replay})")
        self.members = {m.label: m for m in members}
        self.labels = list(self.members)  # widest first, as given
        self.config, self.replay = config, replay
        self._saved: list[_Saved] = []

    def member(self, label: str) -> WidthGraphs:
        return self.members[self.label_of(label)]

    def label_of(self, width: str | float) -> str:
        """The label of a width given as its label ("1/2") or its value (0.5, "0.5")."""
        if (label := find_width(self.labels, width)) is None:
            raise UsageError(f"width {width!r} is not in this bundle; it has {', '.join(self.labels)}")
        return label

    # -- the replay record ------------------------------------------------------------
    def start(self, state: dict[str, np.ndarray], position: np.ndarray) -> None:
        self._saved = [_Saved(_copy(state), position.copy())]

    def record(self, ids: np.ndarray, state: dict[str, np.ndarray], position: np.ndarray) -> None:
        """After a call that consumed ``ids`` [1, T] and left ``state``."""
        if not self._saved or ids.shape[0] != 1:
            self._saved = []  # batches do not replay
            return
        self._saved[-1].tokens += ids[0].tolist()
        if len(self._saved[-1].tokens) >= self.replay:
            self._saved = [self._saved[-1], _Saved(_copy(state), position.copy())]

    # -- switching --------------------------------------------------------------------
    def switch(self, state: dict[str, np.ndarray], batch: int, old: str, new: str, policy: str) -> Switch:
        """Move a stream's ``state`` from width ``old`` to ``new`` (the saved states too)."""
        if policy not in WIDEN_POLICIES:
            raise UsageError(f"widen policy {policy!r} is not one of {', '.join(WIDEN_POLICIES)}")
        a, b = self.member(old), self.member(new)
        moves = state_moves(self.config, a.layer_widths, b.layer_widths)
        wider = self.labels.index(b.label) < self.labels.index(a.label)
        shapes = _shapes(b, batch)
        move = (lambda s: widen(s, moves, shapes)) if wider else (lambda s: narrow(s, moves))
        if wider and policy == "replay" and not self._saved:
            raise EdgeseqError("replay needs the tokens of one stream (batch 1) since its last reset")
        for saved in self._saved:
            saved.state = move(saved.state)
        if not (wider and policy == "replay"):
            return Switch(b, move(state))
        oldest, tokens = self._saved[0], [t for s in self._saved for t in s.tokens]
        self._saved = [_Saved(_copy(oldest.state), oldest.position.copy())]  # the replay records itself from here
        return Switch(b, oldest.state, oldest.position, tokens)


@dataclass
class Switch:
    """Where a switch leaves a stream: the width's graphs and state; after a replay, the
    saved position and the tokens to prefill from there."""

    member: WidthGraphs
    state: dict[str, np.ndarray]
    position: np.ndarray | None = None
    replay: list[int] | None = None


def _copy(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v.copy() for k, v in state.items()}


def _shapes(member: WidthGraphs, batch: int) -> dict[str, tuple[int, ...]]:
    return {t.name: tuple(batch if isinstance(d, str) else d for d in t.shape) for t in member.step.io.inputs}


def open_widths(root: Path, manifest: dict, flavor: str, placement, widths: Sequence[str] | None = None
                ) -> list[WidthGraphs]:  # fmt: skip
    """Active runners of a bundle's widths (``widths``: which, None: all; widest first)."""
    from edgeseq.deploy.bundle import bundle_widths, width_view
    from edgeseq.deploy.runtimes import open_runner
    from edgeseq.width import LayerWidth

    views = [width_view(manifest, w) for w in (bundle_widths(manifest) if widths is None else widths)]
    opened: list[WidthGraphs] = []
    try:
        for view in views:
            step, prefill = (open_runner(root, view, flavor, kind, placement) for kind in ("step", "prefill"))
            opened.append(WidthGraphs(view["width"], step, prefill, tuple(map(LayerWidth.of, view["layer_widths"]))))
            step.activate()
            prefill.activate()
    except BaseException:
        for member in opened:
            member.step.deactivate()
            member.prefill.deactivate()
        raise
    return opened


# ---- controllers ------------------------------------------------------------------------
@dataclass(frozen=True)
class StepStats:
    """What a stream measured at its last step."""

    tokens: int  # tokens decoded so far (this one included)
    width: str  # the width that decoded it
    step_ms: float  # its wall time


class WidthController(Protocol):
    def on_step(self, stats: StepStats) -> str:
        """The width for the next step (the current one to stay)."""
        ...


class LatencyBudget:
    """Keep the widest width whose measured step time fits ``budget_ms``.

    Step times are averaged per width (exponentially, over about ``settle`` steps). After
    ``settle`` steps at a width: narrower by one width if its average is over the budget;
    wider by one if the wider width's last average fits, or was never measured, or was
    measured more than ``probe_every`` steps ago (conditions change). ``budget_ms`` may be
    changed at any time; the next decision uses it."""

    def __init__(self, widths: Sequence[str], budget_ms: float, settle: int = 8, probe_every: int = 256):
        if not widths:
            raise UsageError("a latency budget needs at least one width")
        if budget_ms <= 0 or settle < 1:
            raise UsageError(f"the latency budget must be positive (got {budget_ms} ms)")
        self.widths = list(widths)  # widest first
        self.budget_ms, self.settle, self.probe_every = float(budget_ms), settle, probe_every
        self.mean_ms: dict[str, float] = {}
        self._measured_at: dict[str, int] = {}
        self._steps_here = 0

    def on_step(self, stats: StepStats) -> str:
        w, alpha = stats.width, 2.0 / (self.settle + 1)
        self.mean_ms[w] = stats.step_ms if self._steps_here == 0 else alpha * stats.step_ms + (1 - alpha) * self.mean_ms[w]
        self._measured_at[w] = stats.tokens
        self._steps_here += 1
        if self._steps_here < self.settle:
            return w
        i = self.widths.index(w)
        if self.mean_ms[w] > self.budget_ms and i + 1 < len(self.widths):
            return self._go(self.widths[i + 1])
        if i > 0:
            wider = self.widths[i - 1]
            known = self.mean_ms.get(wider)
            stale = stats.tokens - self._measured_at.get(wider, -10**9) > self.probe_every
            if known is None or known <= self.budget_ms or stale:
                return self._go(wider)
        return w

    def _go(self, width: str) -> str:
        self._steps_here = 0
        return width
