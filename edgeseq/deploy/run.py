"""Streaming text from a bundle, without PyTorch (``edgeseq run``).

The bundle is opened by ``StreamingSession.from_bundle``: the runtime that streams the
flavor here, on the execution providers and threads of the bundle's target profile, and
the bundle's tokenizer (its ``tokenizer.json``, else bytes)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeseq.errors import UsageError
from edgeseq.runtimes.elastic import LatencyBudget, StepStats
from edgeseq.runtimes.session import StreamingSession, sample

__all__ = ["BudgetSchedule", "sample", "stream_text"]

clock = time.perf_counter  # what steps are timed with (tests put a fake clock here)


@dataclass(frozen=True)
class BudgetSchedule:
    """A latency budget that may change at given decode steps: "40" or "40,10@200" (40 ms,
    then 10 ms from the 200th generated token on)."""

    changes: tuple[tuple[int, float], ...]  # (from token, budget ms), by token

    @classmethod
    def parse(cls, text: str) -> BudgetSchedule:
        changes = []
        for i, part in enumerate(p.strip() for p in str(text).split(",")):
            ms, _, at = part.partition("@")
            try:
                change = (int(at) if at else 0, float(ms))
            except ValueError:
                change = None
            if change is None or change[1] <= 0 or change[0] < 0 or (i == 0) != (change[0] == 0):
                raise UsageError(f"--latency-budget-ms {text!r}: give MS, then optional MS@TOKEN changes "
                                 "(e.g. 40,10@200), each MS above 0")  # fmt: skip
            changes.append(change)
        return cls(tuple(sorted(changes)))

    def at(self, token: int) -> float:
        return [ms for start, ms in self.changes if start <= token][-1]


def stream_text(bundle: Path, prompt: str, n: int, temperature: float, top_k: int, seed, flavor, threads,
                emit: Callable[[str], None], width: str | None = None, budget: BudgetSchedule | None = None,
                widen: str = "replay") -> dict:  # fmt: skip
    """Stream ``n`` tokens after ``prompt``. ``width``: one width of an elastic bundle;
    ``budget``: switch between all its widths to keep each step within it."""
    if width is not None and budget is not None:
        raise UsageError("give --width (one width) or --latency-budget-ms (the widths that fit), not both")
    widths = None if budget is not None else [width] if width is not None else _widest(bundle)
    with StreamingSession.from_bundle(bundle, flavor, threads=threads, widths=widths) as session:
        session.tokenizer.check_vocab(session.vocab_size)
        if budget is not None and session.widths is None:
            raise UsageError(f"{bundle} streams one width; --latency-budget-ms needs an elastic bundle "
                             "(edgeseq export --elastic)")  # fmt: skip
        return _stream(session, prompt, n, temperature, top_k, seed, emit, budget, widen)


def _widest(bundle: Path) -> list[str] | None:
    from edgeseq.deploy.bundle import bundle_widths, read_manifest

    return bundle_widths(read_manifest(bundle, verify=False))[:1]


def _stream(session: StreamingSession, prompt: str, n: int, temperature: float, top_k: int, seed,
            emit: Callable[[str], None], budget: BudgetSchedule | None = None, widen: str = "replay") -> dict:  # fmt: skip
    rng = np.random.default_rng(seed)
    decoder = session.tokenizer.stream_decoder(after=session.tokenizer.prompt_ids(prompt))
    control = None if budget is None else LatencyBudget(session.widths.labels, budget.at(0))
    switches: list[dict] = []
    emit(prompt)
    logits = session.prefill_text(prompt)
    produced, t0 = 0, time.perf_counter()  # decode speed: the prompt's prefill is not timed
    for _ in range(n):
        token = sample(logits, temperature, top_k, rng)
        if token in session.tokenizer.eos_ids:
            break
        produced += 1
        emit(decoder.step(token))
        start = clock()
        logits = session.step(token)
        if control is not None:
            control.budget_ms = budget.at(produced)
            width = control.on_step(StepStats(produced, session.width, (clock() - start) * 1e3))
            if width != session.width:
                switches.append({"token": produced, "from": session.width, "to": width, "budget_ms": control.budget_ms})
                replayed = session.set_width(width, widen)
                logits = logits if replayed is None else replayed
    emit(decoder.flush())
    seconds = time.perf_counter() - t0
    stats = {
        "new_tokens": produced,
        "tokens_per_s": produced / seconds if seconds else float("nan"),
        "flavor": session.flavor,
        "providers": ",".join(session.step_runner.providers_used),
        "tokenizer": session.tokenizer.kind,
        "width": session.width,
    }
    if control is not None:
        stats |= {"switches": switches, "step_ms": control.mean_ms}
    return stats
