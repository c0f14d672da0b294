"""Deployment targets: one TOML profile per device in ``profiles/``, read into a frozen
``Target`` (memory the model may use, DRAM bandwidth, dense compute, runtime, precisions,
graph flavors). ``get_target`` takes a built-in name, one of its aliases, or the path of
a user's own profile file, checked as strictly as the shipped ones."""

from __future__ import annotations

import difflib
from functools import cache
from pathlib import Path

from edgeseq.targets.profile import (
    ProfileError,
    SizeError,
    Target,
    UnknownTargetError,
    load_profile,
    parse_bytes,
)

PROFILES = Path(__file__).parent / "profiles"

__all__ = [
    "PROFILES", "ProfileError", "SizeError", "Target", "UnknownTargetError", "all_targets", "get_target",
    "known_targets", "load_profile", "parse_bytes",
]  # fmt: skip


@cache
def _builtin() -> tuple[Target, ...]:
    return tuple(load_profile(path) for path in sorted(PROFILES.glob("*.toml")))


def all_targets() -> list[Target]:
    """The shipped profiles, sorted by name."""
    return list(_builtin())


def known_targets() -> list[str]:
    return [t.name for t in _builtin()]


def get_target(name_or_path: str | Path) -> Target:
    """A built-in name or alias, else a profile file (``*.toml`` or any existing file)."""
    text = str(name_or_path)
    for t in _builtin():
        if text == t.name or text in t.aliases:
            return t
    if text.endswith(".toml") or Path(text).is_file():
        return load_profile(text)
    names = known_targets() + [a for t in _builtin() for a in t.aliases]
    near = difflib.get_close_matches(text, names, n=1)
    hint = f" (did you mean {near[0]}?)" if near else ""
    raise UnknownTargetError(
        f"unknown target {text!r}{hint}; known targets: {', '.join(known_targets())}, or the path of a .toml profile"
    )
