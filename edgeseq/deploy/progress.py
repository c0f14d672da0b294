"""What long deploy work reports to (torch-free, so the CLI can subclass it at import).

``Progress`` is called once per stage (``progress("export", "portable")``) and asked, per
validated flavor, for a counter of graph calls (``calls(flavor)`` -> ``(done, total)``
callback, or None). The base class reports nothing; the CLI's printer draws lines and a bar.
"""

from __future__ import annotations

from collections.abc import Callable

CallProgress = Callable[[int, int], None]  # (candidate calls made, calls expected)


class Progress:
    def __call__(self, stage: str, detail: str) -> None:
        """One stage began (or a warning: stage "warning")."""

    def calls(self, flavor: str) -> CallProgress | None:
        """A (done, total) callback while ``flavor`` is validated; None draws nothing."""
        return None
