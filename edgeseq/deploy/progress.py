"""What long deploy work reports to (torch-free, so the CLI can subclass it at import).

``Progress`` is called once per stage (``progress("export", "portable")``) and asked, per
validated flavor, for a counter of graph calls (``calls(flavor)`` -> ``(done, total)``
callback, or None). The base class reports nothing; the CLI's printer draws lines and a bar.
A stage lasts until the next one begins (or the work ends): ``StageClock`` times them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

CallProgress = Callable[[int, int], None]  # (candidate calls made, calls expected)
WARNING = "warning"  # a message, not a stage: it neither ends nor begins one


class Progress:
    def __call__(self, stage: str, detail: str) -> None:
        """One stage began (or a warning: stage "warning")."""

    def calls(self, flavor: str) -> CallProgress | None:
        """A (done, total) callback while ``flavor`` is validated; None draws nothing."""
        return None


@dataclass(frozen=True)
class Stage:
    name: str
    detail: str
    seconds: float


class StageClock:
    """The running stage and the seconds each finished one took."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock, self.started = clock, clock()
        self.current: tuple[str, str, float] | None = None
        self.done: list[Stage] = []

    def begin(self, name: str, detail: str) -> Stage | None:
        """Start ``name``; returns the stage this ends (None for the first)."""
        ended = self.end()
        self.current = (name, detail, self.clock())
        return ended

    def end(self) -> Stage | None:
        """End the running stage, if any, and return it with its duration."""
        if self.current is None:
            return None
        name, detail, start = self.current
        self.current = None
        self.done.append(Stage(name, detail, self.clock() - start))
        return self.done[-1]

    def total(self) -> float:
        return self.clock() - self.started
