"""The runner life cycle every backend shares (Polygraphy's shape, without its scripts).

    runner = SomeRunner(...)          # cheap: records what to build
    with runner:                      # activate(): the expensive build, heavy imports
        out = runner.infer(feeds)     # {name: np.ndarray} -> {name: np.ndarray}
                                      # deactivate() on exit frees the session / engine

Feeds are checked against ``runner.io`` (names, dtypes, ranks, fixed dims) before the
backend sees them, so every backend rejects a bad feed with the same one-line error; a
backend that still fails raises ``InferenceError``. Every error here is an ``EdgeseqError``.
This module imports numpy and the torch-free I/O spec only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Self

import numpy as np

from edgeseq.errors import EdgeseqError
from edgeseq.export.spec import GraphIO, TensorSpec


class RunnerNotActiveError(EdgeseqError):
    """infer() was called before activate() (or after deactivate())."""


class FeedError(EdgeseqError):
    """Feeds do not match the graph's inputs."""


class GraphIOError(EdgeseqError):
    """A built graph or engine does not have the inputs and outputs it was declared with."""


class InferenceError(EdgeseqError):
    """The backend failed to run a graph on feeds that passed the checks."""


def check_feeds(io: GraphIO, feeds: Mapping[str, np.ndarray]) -> None:
    """Raise FeedError unless ``feeds`` holds exactly ``io``'s inputs, with their dtypes,
    ranks and fixed dims, and one batch size across the inputs that have a named axis."""
    if not isinstance(feeds, Mapping):
        raise FeedError(f"feeds are a {type(feeds).__name__}; pass a dict of input name -> numpy array")
    want = {t.name for t in io.inputs}
    missing, unknown = sorted(want - feeds.keys()), sorted(feeds.keys() - want)
    if missing or unknown:
        raise FeedError(f"feeds do not match the graph inputs: missing {missing}, unexpected {unknown}")
    axes: dict[str, int] = {}
    for spec in io.inputs:
        _check_one(spec, feeds[spec.name], axes)


def _check_one(spec: TensorSpec, value: np.ndarray, axes: dict[str, int]) -> None:
    if not isinstance(value, np.ndarray):
        raise FeedError(f"feed {spec.name!r} is a {type(value).__name__}; pass a numpy array")
    if value.dtype != np.dtype(spec.dtype):
        raise FeedError(f"feed {spec.name!r} is {value.dtype}; the graph wants {spec.dtype}")
    if value.ndim != len(spec.shape):
        raise FeedError(f"feed {spec.name!r} has shape {value.shape}; the graph wants {spec.shape}")
    for got, dim in zip(value.shape, spec.shape):
        if isinstance(dim, str) and dim not in ("?", ""):
            if axes.setdefault(dim, got) != got:
                raise FeedError(f"feed {spec.name!r} has {dim} {got}, other feeds have {axes[dim]}")
        elif isinstance(dim, int) and got != dim:
            raise FeedError(f"feed {spec.name!r} has shape {value.shape}; the graph wants {spec.shape}")


def io_from_specs(inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...]) -> GraphIO:
    """The GraphIO of a built graph whose I/O was not declared: ``present.x`` pairs with
    ``past.x`` and ``present.position`` with ``position``, as ``edgeseq.export.spec`` names them."""
    names = {t.name for t in inputs}
    pairs = []
    for out in outputs:
        if out.name.startswith("present."):
            past = out.name.removeprefix("present.")
            past = past if past == "position" else f"past.{past}"
            if past in names:
                pairs.append((past, out.name))
    return GraphIO(tuple(inputs), tuple(outputs), tuple(pairs))


def check_declared(name: str, declared: GraphIO, actual: GraphIO) -> None:
    """Raise GraphIOError unless the declared inputs are the built graph's and the declared
    outputs are among its outputs, with the same dtypes."""
    want_in, got_in = {t.name: t.dtype for t in declared.inputs}, {t.name: t.dtype for t in actual.inputs}
    if want_in != got_in:
        raise GraphIOError(f"{name}: the graph's inputs {got_in} differ from the declared {want_in}; re-export")
    got_out = {t.name: t.dtype for t in actual.outputs}
    for t in declared.outputs:
        if got_out.get(t.name) != t.dtype:
            raise GraphIOError(f"{name}: the graph has no {t.dtype} output {t.name!r} (it has {got_out}); re-export")


class Runner:
    """Base of every runner. Subclasses implement ``_activate``, ``_infer`` and
    ``_deactivate`` and set ``io``; this class owns the life cycle and the feed checks."""

    def __init__(self, name: str):
        self.name = name
        self.is_active = False
        self._last_inference_s: float | None = None
        self._watchers: list[Callable[[], None]] = []

    @property
    def io(self) -> GraphIO:
        raise NotImplementedError

    @property
    def in_place_state(self) -> frozenset[str]:
        """State inputs whose present output ``infer(into=...)`` may write over the input
        itself (the graph says which); none unless the backend honours it."""
        return frozenset()

    # -- life cycle -------------------------------------------------------------------

    def activate(self) -> None:
        """Build the backend (session, engine, model on device). A no-op when active."""
        if not self.is_active:
            self._activate()
            self.is_active = True

    def deactivate(self) -> None:
        """Free what activate built. A no-op when not active."""
        if self.is_active:
            self._deactivate()
            self.is_active = False

    def infer(self, feeds: Mapping[str, np.ndarray], check: bool = True,
              into: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:  # fmt: skip
        """feeds {input name: array} -> {output name: array}, every output of ``io``.
        ``into`` {output name: array}: outputs written into these (writable, C-contiguous,
        the output's shape and dtype; a feed only for a present of ``in_place_state``) and
        returned as they are — a stream's state can then go back and forth between two
        buffers, or stay in one, with no allocation per call (backends that cannot write
        in place copy into them after the run)."""
        if not self.is_active:
            raise RunnerNotActiveError(f"runner {self.name!r} is not active; call activate() or use `with runner:`")
        if check:
            check_feeds(self.io, feeds)
        start = time.perf_counter()
        outputs = self._infer_into(dict(feeds), dict(into)) if into else self._infer(dict(feeds))
        self._last_inference_s = time.perf_counter() - start
        for watcher in self._watchers:
            watcher()
        return outputs

    def watch(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` after every successful infer (progress displays count calls)."""
        self._watchers.append(callback)

    def last_inference_time(self) -> float | None:
        """Seconds the last infer() spent in the backend (feed checks excluded)."""
        return self._last_inference_s

    def __enter__(self) -> Self:
        self.activate()
        return self

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, active={self.is_active})"

    # -- backend hooks ----------------------------------------------------------------

    def _activate(self) -> None:
        raise NotImplementedError

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _infer_into(self, feeds: dict[str, np.ndarray], into: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``_infer`` with outputs copied into ``into``'s arrays; backends that write in place override it."""
        outputs = self._infer(feeds)
        for name, array in into.items():
            np.copyto(array, outputs[name])
        return outputs | into

    def _deactivate(self) -> None:
        raise NotImplementedError
