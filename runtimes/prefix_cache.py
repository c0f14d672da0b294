"""PrefixCache: session snapshots after prompts, keyed by their token ids. Torch-free.

    cache = PrefixCache(max_bytes=64 << 20)
    logits = session.prefill(system + turn, cache=cache)   # prefills all, stores the snapshot
    logits = session.prefill(system + turn2, cache=cache)  # restores the longest cached prefix

An entry is the session's ``snapshot()`` after prefilling a prompt from position 0, plus
that prompt's last logits; it costs ``session.state_bytes`` (+ the logits). Entries are
evicted least recently used first, so their bytes stay within ``max_bytes``. One stream
(batch 1) only.

A hit prefills only the rest of the prompt after the cached prefix: the state after
prefix + rest equals the state after the whole prompt up to the graph's rounding (the
chunked scan splits at another place); the tests bound the logits' difference.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

from edgeseq.errors import EdgeseqError

# The session calls the cache (``StreamingSession.prefill(ids, cache=...)``), so the cache
# names no session type: imports run one way, session -> prefix_cache.
StreamingSession = Snapshot = Any


class PrefixCacheError(EdgeseqError):
    """The prefix cache was used in a way it does not support."""


class PrefixCache:
    def __init__(self, max_bytes: int):
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise PrefixCacheError(f"max_bytes must be a whole number of bytes, 0 or more (got {max_bytes!r})")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[int, ...], tuple[Snapshot, np.ndarray]] = OrderedDict()
        self.hits = 0  # prefills that restored a cached prefix (whole prompt or part)
        self.misses = 0  # prefills that started from zero
        self.reused_tokens = 0  # prompt tokens not prefilled thanks to the cache

    @property
    def nbytes(self) -> int:
        """Bytes the entries hold now (at most ``max_bytes``)."""
        return sum(snap.nbytes + logits.nbytes for snap, logits in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, ids: Sequence[int]) -> bool:
        return tuple(int(i) for i in ids) in self._entries

    def longest_prefix(self, ids: Sequence[int]) -> tuple[int, ...]:
        """The longest cached key that ``ids`` starts with (``()`` when none)."""
        ids = tuple(ids)
        best: tuple[int, ...] = ()
        for key in self._entries:
            if len(best) < len(key) <= len(ids) and ids[: len(key)] == key:
                best = key
        return best

    def prefill(self, session: StreamingSession, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """``session.prefill(ids)`` from position 0, reusing the longest cached prefix; logits [V].
        Stores the snapshot after ``ids`` (evicting the least recently used entries beyond ``max_bytes``)."""
        if session.batch != 1:
            raise PrefixCacheError("the prefix cache serves one stream; open the session with batch=1")
        key = tuple(int(i) for i in np.asarray(ids).reshape(-1))
        if not key:
            raise PrefixCacheError("prefill needs at least one token")
        prefix = self.longest_prefix(key)
        if prefix:
            self.hits += 1
            self.reused_tokens += len(prefix)
            snap, logits = self._entries[prefix]
            self._entries.move_to_end(prefix)
            session.restore(snap)
            if len(prefix) == len(key):
                return logits.copy()
        else:
            self.misses += 1
            session.reset()
        logits = session.prefill(np.asarray(key[len(prefix) :], np.int64))
        self.put(key, session.snapshot(), logits)
        return logits

    def put(self, ids: Sequence[int], snapshot: Snapshot, logits: np.ndarray) -> None:
        """Keep ``snapshot`` (taken after ``ids`` from position 0) and its last logits; evict to fit."""
        key = tuple(int(i) for i in ids)
        entry = (snapshot, np.array(logits, copy=True))
        if snapshot.nbytes + entry[1].nbytes > self.max_bytes:
            return  # it alone would not fit: keep what is there
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while self.nbytes > self.max_bytes:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        """Drop every entry (the counters stay)."""
        self._entries.clear()
